"""The headline: for the same budget, hardware and data, validation bpb of
(a) the autotuned model, (b) the predecessor's fixed-table configuration for that budget
(its data share applied), (c) a nanochat-style depth heuristic (tokens ≈ 10.5 × params), (d) the best of a hand grid,
each trained for the same wall-clock by the same engine and evaluated on the same split.

Two comparisons, each with its own arms file and table:
- `quality`: every arm trains eagerly (sessions 1-11's headline; autotune's full run is held eager
  with `--set train.compile=false`, so the comparison stays one of choices);
- `quality_compiled` (`--compiled`): the product as it ships on CPU, whose full run compiles
  (search_spaces/cpu.yaml, compile_full_run), against the other arms trained with the same engine
  settings: compiled, at the CPU space's micro-batch. The grid's points then differ from the
  space's candidates in shape only, so the comparison is one of choice alone.

Every arm trains at the engine's default precision, `auto`, which on a CPU with bf16 instructions
(AVX512-BF16, AMX) is bf16 autocast (session 16). Those comparisons are kept apart from the fp32
ones measured before, under the names `quality_bf16` and `quality_compiled_bf16`, so that no
table mixes a bf16 arm with an fp32 one; `fp32_autotune_bpb` in them is the same budget's autotune
from the fp32 table, for the precision's own effect."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import tempfile
from pathlib import Path

import yaml

from benchmarks.common import RESULTS, save

GOAL = "autotune ≤ 0.90 × table and ≤ 1.02 × the best hand-grid point"
# ../shared/docs/field-facts.md: target hours → (layers, width, data share)
TABLE = [(0.01, 1, 64, None), (0.1, 4, 256, 0.05), (0.5, 12, 512, 0.10), (1, 20, 768, 0.20),
         (3, 30, 768, 0.30), (6, 30, 768, 0.50), (12, 30, 768, 0.70), (float("inf"), 30, 768, 0.90)]


def table_config(hours: float, vocab: int) -> dict:
    for limit, layers, width, share in TABLE:
        if hours < limit:
            break
    return {"model": {"vocab_size": vocab, "d_model": width, "n_layers": layers, "n_heads": 16 if width >= 256 else 4,
                      "n_kv_heads": 4 if width >= 256 else 1, "ffn_hidden": 1024, "max_seq_len": 256,
                      "rope_theta": 1e5, "norm_eps": 1e-6},
            "train": {"lr": 1e-3, "warmup_frac": 0.01, "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95,
                      "batch_tokens": 8192, "micro_batch": 16, "seq_len": 256, "data_fraction": share or 0.001}}


def nanochat_config(seconds: float, data, vocab: int) -> tuple[dict, list]:
    """Largest depth whose tokens-at-10.5×-params fit the time, from a short measured trial per depth."""
    from model.config import ModelConfig, param_counts
    from pipeline.autotune.calibrate import run_candidate

    choices = {"n_heads": [1], "head_dim": [64], "n_layers": [1], "kv_ratio": [1], "ffn_ratio": [4.0],
               "n_experts": [0], "top_k": [2], "pos_encoding": ["rope"], "activation_checkpointing": [False],
               "seq_len": [256], "micro_batch": [16], "compile": [False], "precision": ["auto"]}
    rules = {"batch_tokens": 8192, "lr": 0.003, "lr_ref_width": 128, "warmup_frac": 0.02, "schedule": "linear"}
    space = {"name": "nanochat", "choices": choices, "rules": rules}
    best, trace = 1, []
    for depth in range(1, 9):
        cand = {k: v[0] for k, v in choices.items()} | {"n_heads": depth, "n_layers": depth}
        m = run_candidate(cand, {"space": space, "data_folder": str(data.folder), "window_s": 4, "max_steps": 12,
                                 "full_seconds": seconds, "unique_tokens": data.unique_train_tokens})
        cfg = ModelConfig(vocab_size=vocab, d_model=64 * depth, n_layers=depth, n_heads=depth, ffn_hidden=256 * depth)
        n = param_counts(cfg)["active_non_embedding"] + vocab * cfg.d_model
        affordable = m["tokens_per_s"] * seconds
        trace.append({"depth": depth, "params": n, "tokens_per_s": round(m["tokens_per_s"]),
                      "affordable_tokens": round(affordable), "wanted_tokens": round(10.5 * n)})
        if affordable >= 10.5 * n:
            best = depth
    d = best
    return ({"model": {"vocab_size": vocab, "d_model": 64 * d, "n_layers": d, "n_heads": d, "ffn_hidden": 256 * d,
                       "max_seq_len": 256},
             "train": {"lr": 0.003 * 128 / (64 * d), "batch_tokens": 8192, "micro_batch": 16, "seq_len": 256}}, trace)


# (d) a hand grid: what an engineer would try on a few CPU cores, nanochat's conventions
# (head_dim 64 or 32, MHA, FFN 4 × width, lr 0.003 × 128 / width, 8k-token batches, context 256).
# d128-L4 and d192-L3 were added (session 14) once the compiled 30-minute runs put the grid's best at
# its largest points (d128-L3, d192-L2): a grid whose best sits on its edge would flatter autotune.
GRID = {"d64-L1": (64, 1, 1), "d64-L2": (64, 2, 2), "d128-L1": (128, 1, 2), "d128-L2": (128, 2, 2),
        "d128-L3": (128, 3, 2), "d192-L2": (192, 2, 3), "d128-L4": (128, 4, 2), "d192-L3": (192, 3, 3),
        # one deeper than the 30-minute winner: on 2 bf16 cores it reaches about the data cap
        # (12.7 epochs) at the deadline, where autotune's d192-L3 stops early (session 25)
        "d192-L4": (192, 4, 3),
        # d192-L4 then sat on the grid's edge at 30 minutes in bf16, the flattering case above, so a
        # wider and a deeper point go past it, and one past the wider one once it won (session 27)
        "d256-L3": (256, 3, 4), "d192-L5": (192, 5, 3), "d256-L4": (256, 4, 4)}


def grid_config(name: str, vocab: int) -> dict:
    width, layers, heads = GRID[name]
    return {"model": {"vocab_size": vocab, "d_model": width, "n_layers": layers, "n_heads": heads,
                      "ffn_hidden": 4 * width, "max_seq_len": 256},
            "train": {"lr": 0.003 * 128 / width, "batch_tokens": 8192, "micro_batch": 16, "seq_len": 256,
                      # no warmup: what the stored grid runs had (until the engine started the
                      # schedule at the first step, the default 2% warmup passed during start-up),
                      # and what the CPU space uses
                      "warmup_frac": 0.0}}


def _cpu_space_micro_batch() -> int:
    from pipeline.autotune.space import default_space_path, load_space

    (mb,) = load_space(default_space_path("cpu")).choices["micro_batch"]
    return mb


def cold_compile_env(out: Path) -> dict:
    """The environment an arm runs in: its own, empty inductor cache, so every compiled arm pays
    the compile a user's first run pays. With the shared default cache a later arm skipped the C++
    kernel builds an earlier arm of the same width had paid for: on a Zen 3 2-core VM (session 18)
    autotune's d128-L2 full run compiled in 22.3 s and the d128-L2 grid run right after it, its
    whole graph cached, in 3.5 s: 2% of a 15-minute budget."""
    return {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(out / "inductor-cache")}


def _train(cfg: dict, minutes: float, out: Path, seed: int = 0, compiled: bool = False,
           tokens: int | None = None) -> dict:
    """One fixed configuration trained for `minutes` (or to `tokens`, whichever comes first)."""
    cfg["train"]["seed"] = seed
    if compiled:  # the engine settings autotune's full run uses on CPU; only the choice differs
        cfg["train"] |= {"compile": True, "micro_batch": _cpu_space_micro_batch()}
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.yaml").write_text(yaml.safe_dump(cfg))
    started = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "pipeline.train", "--config", str(out / "run.yaml"),
                          "--minutes", str(minutes), "--out", str(out / "run")]
                         + (["--tokens", str(tokens)] if tokens else []), capture_output=True, text=True,
                         env=cold_compile_env(out))
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-2000:])
    result = json.loads((out / "run" / "summary.json").read_text())["result"]
    return {"bpb": round(result["final_val_bpb"], 4), "tokens": result["tokens"],
            "compute_dtype": result.get("compute_dtype", "fp32"),
            "wall_over_budget": round((time.monotonic() - started) / (minutes * 60), 4), "choice": cfg["model"],
            "stopped": result.get("stopped", "")} | ({"token_cap": tokens} if tokens else {})


def data_cap(model: dict, data) -> int:
    """The most tokens worth training `model` (a grid config's model section) on `data`: the cap
    autotune's full run stops at (`ScalingLaw.useful_tokens`, by the model's size)."""
    from model.config import ModelConfig
    from pipeline.autotune.plan import token_cap

    return token_cap(ModelConfig(**model), data.unique_train_tokens)


def run_arm(arm: str, minutes: float, data, vocab: int, tmp: Path, seed: int = 0, compiled: bool = False) -> dict:
    """One arm of the comparison, trained for `minutes` of wall-clock; `compiled`: its run compiles
    (autotune as it ships on CPU; the other arms with train.compile set)."""
    if arm == "autotune":
        started = time.monotonic()
        auto = subprocess.run([sys.executable, "-m", "pipeline.autotune", "--minutes", str(minutes), "--yes",
                               "--out", str(tmp / "auto"), "--model-name", "bench-quality",
                               # the training seed only: autotune's --seed also reseeds the data split
                               "--set", f"train.seed={seed}"]
                              + ([] if compiled else ["--set", "train.compile=false"]),
                              capture_output=True, text=True, env=cold_compile_env(tmp))
        if auto.returncode != 0:
            raise RuntimeError(auto.stderr[-2000:])
        from benchmarks.deadline import data_limited, parts_s

        state = json.loads((tmp / "auto" / "pipeline.json").read_text())
        return {"bpb": round(state["stages"]["train"]["val_bpb"], 4), "tokens": state["stages"]["train"]["tokens"],
                "compute_dtype": state["stages"]["train"].get("compute_dtype", "fp32"),
                "choice": state["stages"]["plan"]["chosen"],
                "wall_over_budget": round((time.monotonic() - started) / (minutes * 60), 4),
                "timings_s": {k: round(v, 1) for k, v in state["timings"].items()},
                "parts_s": parts_s(state), "data_limited": data_limited(state)}  # stopped early at the data's useful tokens
    if arm == "table":
        cfg = table_config(minutes / 60, vocab)
        return _train(cfg, minutes, tmp / "table", seed, compiled) | {"data_fraction": cfg["train"]["data_fraction"]}
    if arm == "nanochat":
        cfg, trace = nanochat_config(minutes * 60 * 0.9, data, vocab)
        return _train(cfg, minutes, tmp / "nano", seed, compiled) | {"depth_trials": trace}
    if arm.startswith("grid:") and arm[5:] in GRID:
        # Compiled (the engine as autotune's full run trains): with its data cap too, so that the
        # grid differs from autotune in the choice alone. Uncapped, a 30-minute d256-L4 trained 12.5
        # epochs of the embedded corpus to 1.5049 (session 31, Xeon); stopped at its cap, 9.05
        # epochs, 1.4661-1.4710 (autotune's runs of it in session 33, this arm in session 35).
        cfg = grid_config(arm[5:], vocab)
        return _train(cfg, minutes, tmp / arm[5:], seed, compiled, data_cap(cfg["model"], data) if compiled else None)
    raise SystemExit(f"error: unknown arm {arm!r}; choose autotune, table, nanochat or grid:<{'|'.join(GRID)}>")


ARMS = ["autotune", "table", "nanochat"] + [f"grid:{g}" for g in GRID]
COMPILED = "autotune-compiled"  # autotune runs whose CPU full run compiled (from commit 20b6c76)
CONTROL = "autotune-eager-control"  # --set train.compile=false, the same code, the same session
COMPARISONS = {False: "quality", True: "quality_compiled"}  # every arm eager / every arm compiled
BF16 = "_bf16"  # the same comparisons where the engine's `auto` precision is bf16 on this CPU


def comparison(compiled: bool) -> str:
    """The comparison a run on this machine belongs to: the precision `auto` resolves to here."""
    import torch

    from pipeline.hardware import cpu_has_native_bf16

    bf16 = not torch.cuda.is_available() and cpu_has_native_bf16()
    return COMPARISONS[compiled] + (BF16 if bf16 else "")


def all_comparisons() -> dict[str, bool]:
    """Every comparison name → whether its arms compiled."""
    return {name + suffix: compiled for compiled, name in COMPARISONS.items() for suffix in ("", BF16)}


def _arms_file(name: str = "quality"):
    """This machine's arms for one comparison (`quality-arms-cpu.json`: sessions 1-8's CPU)."""
    from benchmarks.common import slug

    return RESULTS / f"{name}-arms-{slug()}.json"


def run(minutes=(10,), only: list[str] | None = None, seed: int = 0, compiled: bool = False):
    """Run the arms not yet measured for each budget (or `only` those, again), then summarise.
    A seed other than 0 is stored as another sample of the arm (`ARM@seedN`); the summary
    compares arms by their mean over the seeds they have."""
    from benchmarks.common import commit
    from pipeline.data import DataSettings, prepare

    data = prepare(DataSettings(), log=lambda *_: None)
    vocab = -(-data.vocab_size // 64) * 64
    name = comparison(compiled)
    path = _arms_file(name)
    arms_done = json.loads(path.read_text()) if path.is_file() else {}
    for m in minutes:
        done = arms_done.setdefault(str(m), {})
        for arm in (only or [a for a in ARMS if a not in done]):
            print(f"quality {m} min: {arm} (seed {seed}) …", flush=True)
            result = run_arm(arm, m, data, vocab, Path(tempfile.mkdtemp()), seed, compiled)
            done[arm if seed == 0 else f"{arm}@seed{seed}"] = result | {"date": time.strftime("%Y-%m-%d %H:%M"), "commit": commit()}
            path.write_text(json.dumps(arms_done, indent=1))  # after every arm: nothing measured is lost
    # every budget this machine has arms for, not only this call's: the table is rewritten whole,
    # and a 30-minute call once dropped the 15-minute comparison from it (session 20)
    return summarise(stored_budgets(arms_done), arms_done, name=name)


def stored_budgets(arms_done: dict) -> list:
    """The budgets (minutes) of an arms file, in increasing order, as numbers."""
    return sorted((int(m) if float(m).is_integer() else float(m) for m in arms_done), key=float)


def summarise(minutes, arms_done: dict, on: tuple[str, str] | None = None, name: str = "quality"):
    """The table for one machine's arms (`on`: another machine's, see `common.save`)."""
    rows = []
    for m in minutes:
        done = arms_done.get(str(m), {})
        # a budget with compiled autotune runs only (an adherence run) shows those
        arm = "autotune" if "autotune" in done else COMPILED if COMPILED in done else None
        if arm is None:
            continue
        bpb, seeds = arm_means(done)
        auto = bpb[arm]
        grid = {a[5:]: v for a, v in bpb.items() if a.startswith("grid:")}
        best = min(grid, key=grid.get) if grid else None
        row = {"budget_min": m, "autotune_bpb": auto, "autotune_arm": arm,
               "table_bpb": bpb.get("table"), "nanochat_bpb": bpb.get("nanochat"),
               "grid_best": best, "grid_best_bpb": grid.get(best), "grid_points": len(grid),
               "seeds": ", ".join(f"{a} {v}" for a, v in seeds.items() if len(v) > 1) or "one per arm"}
        for key, ref in (("over_table", row["table_bpb"]), ("over_nanochat", row["nanochat_bpb"]),
                         ("over_grid_best", row["grid_best_bpb"])):
            row[f"autotune_{key}"] = round(auto / ref, 4) if ref else None
        row["autotune_wall_over_budget"] = done[arm].get("wall_over_budget")
        row["autotune_timings_s"] = done[arm].get("timings_s", {})
        row["autotune_choice"] = done[arm]["choice"]
        row["grid_bpb"] = ", ".join(f"{k} {v}" for k, v in sorted(grid.items(), key=lambda kv: kv[1]))
        # Session 11: autotune's CPU full run compiles (search_spaces/cpu.yaml, compile_full_run),
        # while the other arms train eagerly, the engine's default. Those runs are kept apart, so
        # that the comparison above stays one of choices, and reported against the eager autotune.
        if COMPILED in bpb and arm != COMPILED:
            row["compiled_autotune_bpb"] = bpb[COMPILED]
            row["compiled_over_eager_autotune"] = round(bpb[COMPILED] / auto, 4)
            if CONTROL in bpb:  # the same code and session, full run eager: the compile's own effect
                row["eager_control_bpb"] = bpb[CONTROL]
                row["compiled_over_eager_control"] = round(bpb[COMPILED] / bpb[CONTROL], 4)
        if name.endswith(BF16) and on is None:  # the precision's own effect: the fp32 table's autotune
            fp32_path = _arms_file(name[:-len(BF16)])
            fp32 = arm_means(json.loads(fp32_path.read_text()).get(str(m), {}))[0] if fp32_path.is_file() else {}
            if "autotune" in fp32:
                row["fp32_autotune_bpb"] = fp32["autotune"]
                row["autotune_over_fp32_autotune"] = round(auto / fp32["autotune"], 4)
        rows.append(row)
    ok = _met([r for r in rows if r["grid_points"]])  # budgets where only autotune ran: adherence runs
    summary = "; ".join(
        f"{r['budget_min']} min: autotune {r['autotune_bpb']} bpb; vs table {_vs(r, 'table')}; "
        f"vs best of {r['grid_points']}-point grid {r['grid_best']} "
        f"{r['grid_best_bpb']} ({_x(r['autotune_over_grid_best'])}); vs nanochat heuristic "
        f"{_vs(r, 'nanochat')}" if r["grid_points"] else
        f"{r['budget_min']} min: autotune{' (full run compiled)' if r['autotune_arm'] == COMPILED else ''} "
        f"{r['autotune_bpb']} bpb (no other arm run)" for r in rows)
    summary += "".join(f"; {r['budget_min']} min, autotune with its full run compiled: {r['compiled_autotune_bpb']} bpb "
                       f"({_x(r['compiled_over_eager_autotune'])} the eager autotune's above"
                       + (f", {_x(r['compiled_over_eager_control'])} the eager control runs of the same session, "
                          f"{r['eager_control_bpb']}" if "eager_control_bpb" in r else "") + ")"
                       for r in rows if "compiled_autotune_bpb" in r)
    summary += "".join(f"; {r['budget_min']} min: {_x(r['autotune_over_fp32_autotune'])} the fp32 autotune's "
                       f"{r['fp32_autotune_bpb']}" for r in rows if "fp32_autotune_bpb" in r)
    from pipeline.hardware import cpu_bf16_switched_off

    forced = "PUFFERFISH_CPU_BF16=0 " if cpu_bf16_switched_off() else ""  # fp32 forced: the command says so
    return save(name, rows, summary, GOAL, ok, f"{forced}python -m benchmarks run {name}", on=on)


def _met(compared: list[dict]) -> bool | None:
    """Both goals at every compared budget; None (not judged) where nothing was compared or the
    table arm was not run."""
    if not compared:
        return None
    if any(r["autotune_over_grid_best"] > 1.02 for r in compared):
        return False
    if any(r["table_bpb"] is None for r in compared):
        return None
    return all(r["autotune_over_table"] <= 0.90 for r in compared)


def arm_name(key: str) -> str:
    """The arm a stored result belongs to (`grid:d64-L2@seed1` → `grid:d64-L2`). A key tagged
    `TAG/` (`s28/grid:d192-L3`) is a run kept from another instance of the same CPU model, which
    trained at another speed (session 29's Xeon ran the same configs 1.37-1.52× faster than
    session 28's): kept in the file, out of this table's arms. (The Xeon's `table` arm is session
    28's, untagged: not re-run, and 2.39 bpb against ~1.5 for every other arm, a gap no 1.5× in
    speed closes; benchmarks/notes/quality_compiled_bf16.md, session 29.)"""
    return key.split("@")[0]


def arm_means(done: dict) -> tuple[dict, dict]:
    """Each arm's mean bpb over its seeds, and the per-seed values of every arm."""
    seeds: dict[str, list] = {}
    for key, r in done.items():
        seeds.setdefault(arm_name(key), []).append(r["bpb"])
    return {a: round(sum(v) / len(v), 4) for a, v in seeds.items()}, seeds


def _vs(row: dict, arm: str) -> str:
    bpb = row[f"{arm}_bpb"]
    return f"{bpb} ({_x(row[f'autotune_over_{arm}'])})" if bpb is not None else "not run on this machine"


def _x(ratio):
    return f"{ratio:.3f}×" if ratio is not None else "not run"


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="run (or re-run) single arms of the quality benchmark")
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--arm", action="append", help=f"one of {', '.join(ARMS)} (repeatable); default: the missing ones")
    ap.add_argument("--seed", type=int, default=0, help="another sample of the arm (its mean enters the table)")
    ap.add_argument("--compiled", action="store_true",
                    help="every arm's run compiled (autotune as it ships on CPU): the quality_compiled table")
    args = ap.parse_args()
    minutes = int(args.minutes) if float(args.minutes).is_integer() else args.minutes
    run((minutes,), only=args.arm, seed=args.seed, compiled=args.compiled)
