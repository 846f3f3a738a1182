"""What autotune shows and saves: the plan table, plots, and the final summary."""
from __future__ import annotations

from pathlib import Path

from rich.table import Table

from pipeline.autotune.plan import PlanRow
from pipeline.autotune.space import width


def short(cand: dict) -> str:
    s = f"d{width(cand)} L{cand['n_layers']} h{cand['n_heads']}×{cand['head_dim']} kv/{cand['kv_ratio']} T{cand['seq_len']} mb{cand['micro_batch']}"
    if cand.get("n_experts"):
        s += f" moe{cand['n_experts']}k{cand['top_k']}"
    if cand.get("activation_checkpointing"):
        s += " ckpt"
    if cand.get("pos_encoding") == "nope":
        s += " nope"
    return s


def plan_table(rows: list[PlanRow], top: int = 10, chosen: PlanRow | None = None) -> Table:
    """The best `top` feasible rows, and the chosen one (marked *) wherever it ranks: a measured
    candidate as good as an unmeasured favourite is chosen over it (`measured_instead`)."""
    t = Table(title="Best candidates (predicted)")
    for col in ("#", "config", "params", "tokens", "tok/param", "epochs", "tok/s", "memory", "loss", "measured"):
        t.add_column(col, justify="right" if col not in ("config",) else "left")
    feasible = [r for r in rows if r.feasible]
    shown = list(enumerate(feasible[:top]))
    if chosen is not None and all(r.key != chosen.key for _, r in shown):
        shown += [(i, r) for i, r in enumerate(feasible) if r.key == chosen.key]
    for i, r in shown:
        mark = "*" if chosen is not None and r.key == chosen.key else ""
        t.add_row(f"{mark}{i + 1}", short(r.candidate), f"{r.params / 1e6:.2f}M", f"{r.tokens / 1e6:.1f}M",
                  f"{r.tokens_per_param:.1f}", f"{r.epochs:.2f}", f"{r.tokens_per_s:,.0f}",
                  f"{r.memory_bytes / 2**20:,.0f} MiB" + (" fsdp" if r.parallel == "fsdp" else ""),
                  f"{r.predicted_loss:.4f}", "yes" if r.measured else "")
    return t


def plan_text(rows: list[PlanRow], top: int = 10, chosen: PlanRow | None = None) -> str:
    from rich.console import Console

    console = Console(width=140, record=True, file=open("/dev/null", "w"))
    console.print(plan_table(rows, top, chosen))
    return console.export_text()


def plots(folder: Path, measured: list[tuple[float, float]], rows: list[PlanRow], chosen: PlanRow,
          loss_trace: list | None) -> list[Path]:
    """PNG plots: measured vs predicted tokens/s, the candidate frontier, the full run's loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    if measured:
        fig, ax = plt.subplots(figsize=(5, 5))
        xs, ys = zip(*measured)
        ax.scatter(xs, ys)
        lim = [0, max(xs + ys) * 1.1]
        ax.plot(lim, lim, "k--", lw=1)
        ax.set(xlabel="measured tokens/s", ylabel="predicted tokens/s (leave-one-out)",
               title="Throughput model")
        out.append(folder / "throughput_fit.png")
        fig.savefig(out[-1], dpi=100, bbox_inches="tight")
        plt.close(fig)
    feasible = [r for r in rows if r.feasible]
    if feasible:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.scatter([r.params for r in feasible], [r.predicted_loss for r in feasible], s=8, alpha=0.5)
        ax.scatter([chosen.params], [chosen.predicted_loss], color="red", s=60, label="chosen")
        ax.set(xscale="log", xlabel="parameters", ylabel="predicted loss (law units)",
               title="Candidate frontier")
        ax.legend()
        out.append(folder / "frontier.png")
        fig.savefig(out[-1], dpi=100, bbox_inches="tight")
        plt.close(fig)
    if loss_trace:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([p[0] for p in loss_trace], [p[1] for p in loss_trace])
        ax.set(xlabel="seconds", ylabel="train loss", title="Full run")
        out.append(folder / "loss_curve.png")
        fig.savefig(out[-1], dpi=100, bbox_inches="tight")
        plt.close(fig)
    return out
