"""Wall-clock adherence: `pipeline.train --minutes M` and `pipeline.autotune --minutes M`, the
whole command timed from outside (process start to exit) against its budget."""
from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import RESULTS, commit, save, slug


def _timed(cmd: list[str]) -> tuple[float, str]:
    t = time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return time.monotonic() - t, out.stderr


def _quality_autotune_rows() -> list[dict]:
    """The quality benchmark's autotune runs are timed the same way (start to exit): their
    adherence is reported here too rather than paying for the same 10-minute run twice."""
    from benchmarks.quality import BF16, _arms_file, all_comparisons, arm_name

    rows = []
    for name, compiled in all_comparisons().items():
        label = "quality benchmark, all compiled" if compiled else "quality benchmark"
        label += ", bf16" if name.endswith(BF16) else ""
        path = _arms_file(name)
        arms = json.loads(path.read_text()) if path.is_file() else {}
        rows += [{"command": f"pipeline.autotune --minutes {m} ({label}, {key})", "budget_s": float(m) * 60,
                  "wall_s": round(r["wall_over_budget"] * float(m) * 60, 1), "ratio": r["wall_over_budget"],
                  "timings_s": r.get("timings_s", {}), "data_limited": r.get("data_limited", False),
                  "date": r["date"][:10], "commit": r["commit"]}
                 for m, done in arms.items() for key, r in done.items()
                 # every autotune arm: the current one, the compiled and control ones, and earlier
                 # commits' runs kept under their commit (`autotune-d3fd2e2`) or under another
                 # instance's tag (`s28/autotune`, see `quality.arm_name`)
                 if arm_name(key).split("/")[-1].startswith("autotune") and r.get("wall_over_budget")]
    return rows


def run(train_minutes=(1, 5), autotune_minutes=()):
    """Measure the given budgets; rows for other commands already in the results file are kept
    (each row carries its own date and commit), so long budgets can be measured one at a time:
    `python -c "from benchmarks import deadline; deadline.run((), (20,))"`."""
    rows = []
    tmp = Path(tempfile.mkdtemp())
    for m in train_minutes:
        wall, _ = _timed([sys.executable, "-m", "pipeline.train", "--minutes", str(m), "--out", str(tmp / f"t{m}")])
        rows.append({"command": f"pipeline.train --minutes {m}", "budget_s": m * 60, "wall_s": round(wall, 1),
                     "ratio": round(wall / (m * 60), 4)})
    for m in autotune_minutes:
        wall, _ = _timed([sys.executable, "-m", "pipeline.autotune", "--minutes", str(m), "--yes",
                          "--out", str(tmp / f"a{m}"), "--model-name", "bench-deadline"])
        rows.append(autotune_row(m, wall, tmp / f"a{m}"))
    return _save(rows)


def autotune_row(minutes: float, wall_s: float, run_dir: Path, data: str | None = None) -> dict:
    """One autotune run's row: wall-clock (process start to exit) over budget, and where its time went.
    A run on other data than the embedded corpus (`data`) is a row of its own."""
    state = json.loads((run_dir / "pipeline.json").read_text())
    calib = state["timings"].get("calibrate", 0.0)
    command = f"pipeline.autotune --minutes {minutes:g}" + (f" --data {Path(data).name}" if data else "")
    return {"command": command, "budget_s": minutes * 60, "wall_s": round(wall_s, 1),
            "ratio": round(wall_s / (minutes * 60), 4), "calibration_share": round(calib / (minutes * 60), 4),
            "timings_s": {k: round(v, 1) for k, v in state["timings"].items()}, "parts_s": parts_s(state),
            "data_limited": data_limited(state)}


def parts_s(state: dict) -> dict:
    """The named parts inside the stages (the plan's measurements; the full run's compile,
    evaluation and checkpoints), as the summary shows them."""
    return {stage: {k: round(v, 1) for k, v in named.items()} for stage, named in state.get("parts", {}).items()}


def data_limited(state: dict) -> bool:
    """Whether an autotune run (its pipeline.json) trained the most tokens worth training on its
    data (`ScalingLaw.useful_tokens`), or stopped as it began to overfit them (`OverfitCooldown`),
    and so stopped before its deadline by design."""
    from pipeline.autotune.plan import ScalingLaw

    stages = state["stages"]
    train = stages["train"]
    if "token_cap" in train:  # the cap the full run was given (it falls with the model's size)
        return train.get("stopped") == "overfit" or train["tokens"] >= 0.999 * train["token_cap"]
    # runs before the cap was recorded: every model's cap was the law's size-free one
    return (train.get("stopped") == "overfit"
            or ScalingLaw().data_limited(train["tokens"], stages["data"]["unique_train_tokens"]))


def record(minutes: float, wall_s: float, run_dir: Path, data: str | None = None):
    """File an autotune run timed by its launcher (benchmarks/gpu.sh runs a GPU budget detached,
    across two device calls, since one call may last 600 s and the GPU minimum budget is 600 s)."""
    return _save([autotune_row(minutes, wall_s, run_dir, data)])


def _save(rows: list[dict]):
    stamp = {"date": time.strftime("%Y-%m-%d"), "commit": commit()}
    rows = [r | stamp for r in rows]
    previous = RESULTS / f"deadline-{slug()}.json"
    if previous.is_file():
        done = {r["command"] for r in rows}
        old = [r for r in json.loads(previous.read_text())["rows"] if r["command"] not in done]
        rows = sorted(old + rows, key=lambda r: (r["command"].split()[0], r["budget_s"]))
    rows = [r for r in rows if "quality benchmark" not in r["command"]] + _quality_autotune_rows()
    summary, ok = judge(rows)
    return save("deadline", rows, summary, GOAL, ok, "python -m benchmarks run deadline")


GOAL = ("0.98–1.02 for budgets ≥ 5 min (train) / 10 min (autotune); ≤ 1.02 for an autotune that stopped at "
        "the most tokens worth training on its data (data-limited)")


def judge(rows: list[dict]) -> tuple[str, bool]:
    """(summary, met): on time, or early only where the data ran out first."""
    ok = all(r["ratio"] <= 1.02 and (r.get("data_limited") or r["ratio"] >= 0.98)
             for r in rows if r["budget_s"] >= 300)
    summary = "wall/budget: " + ", ".join(f"{r['command']} {r['ratio']:.3f}"
                                          + (" (data-limited)" if r.get("data_limited") else "") for r in rows)
    return summary, ok


def detached(minutes: float, folder: Path, wait_s: float, out: Path | None = None, data: str | None = None) -> bool:
    """Start `pipeline.autotune --minutes M [--data DATA]` in its own session (it outlives this
    process), or find the one already started in `folder`; wait for it up to `wait_s`; when it has
    ended, file its row. The wall-clock runs from just before the start to the exit, which the
    shell around the command writes itself. True once filed."""
    folder.mkdir(parents=True, exist_ok=True)
    start = folder / "start"
    if not start.exists():
        start.write_text(repr(time.time()))
        cmd = (f"{sys.executable} -m pipeline.autotune --minutes {minutes:g} --yes --out {folder / 'run'} "
               + (f"--data {shlex.quote(data)} " if data else "")
               + f"--model-name bench-deadline > {folder / 'autotune.log'} 2>&1; "
               f"echo $? > {folder / 'rc'}; date +%s.%N > {folder / 'end'}")
        subprocess.Popen(["bash", "-c", cmd], start_new_session=True)
        print(f"autotune --minutes {minutes:g} started in {folder}", flush=True)
    until = time.monotonic() + wait_s
    while not (folder / "end").exists() and time.monotonic() < until:
        time.sleep(2)
    log = folder / "autotune.log"
    for f in (log, folder / "run" / "pipeline.json"):
        if out and f.exists():
            shutil.copy(f, out / f.name)
    if not (folder / "end").exists() or not (folder / "end").read_text().strip():
        print(f"autotune still running after {time.time() - float(start.read_text()):.0f}s: call again, naming the "
              "stage autotune, within the machine's warm window", flush=True)
        return False
    rc = int((folder / "rc").read_text())
    if rc != 0:
        raise SystemExit(f"autotune failed (exit {rc}): {log.read_text()[-1500:]}")
    record(minutes, float((folder / "end").read_text()) - float(start.read_text()), folder / "run", data)
    return True


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="time one autotune run detached from this process (GPU calls)")
    ap.add_argument("--detached", type=float, required=True, metavar="MINUTES")
    ap.add_argument("--folder", type=Path, required=True)
    ap.add_argument("--wait", type=float, default=540)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--data", help="pipeline.autotune's --data (default: the embedded corpus)")
    a = ap.parse_args()
    sys.exit(0 if detached(a.detached, a.folder, a.wait, a.out, a.data) else 3)
