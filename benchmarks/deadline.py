"""Wall-clock adherence: `pipeline.train --minutes M` and `pipeline.autotune --minutes M`, the
whole command timed from outside (process start to exit) against its budget."""
from __future__ import annotations

import json
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
    from benchmarks.quality import COMPARISONS, COMPILED, CONTROL, _arms_file, arm_name

    rows = []
    for compiled, name in COMPARISONS.items():
        label = "quality benchmark, all compiled" if compiled else "quality benchmark"
        path = _arms_file(name)
        arms = json.loads(path.read_text()) if path.is_file() else {}
        rows += [{"command": f"pipeline.autotune --minutes {m} ({label}, {key})", "budget_s": float(m) * 60,
                  "wall_s": round(r["wall_over_budget"] * float(m) * 60, 1), "ratio": r["wall_over_budget"],
                  "timings_s": r.get("timings_s", {}), "date": r["date"][:10], "commit": r["commit"]}
                 for m, done in arms.items() for key, r in done.items()
                 if arm_name(key) in ("autotune", COMPILED, CONTROL) and r.get("wall_over_budget")]
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
        state = json.loads((tmp / f"a{m}" / "pipeline.json").read_text())
        calib = state["timings"].get("calibrate", 0.0)
        rows.append({"command": f"pipeline.autotune --minutes {m}", "budget_s": m * 60, "wall_s": round(wall, 1),
                     "ratio": round(wall / (m * 60), 4), "calibration_share": round(calib / (m * 60), 4),
                     "timings_s": {k: round(v, 1) for k, v in state["timings"].items()}})
    stamp = {"date": time.strftime("%Y-%m-%d"), "commit": commit()}
    rows = [r | stamp for r in rows]
    previous = RESULTS / f"deadline-{slug()}.json"
    if previous.is_file():
        done = {r["command"] for r in rows}
        old = [r for r in json.loads(previous.read_text())["rows"] if r["command"] not in done]
        rows = sorted(old + rows, key=lambda r: (r["command"].split()[0], r["budget_s"]))
    rows = [r for r in rows if "quality benchmark" not in r["command"]] + _quality_autotune_rows()
    ok = all(0.98 <= r["ratio"] <= 1.02 for r in rows if r["budget_s"] >= 300)
    summary = "wall/budget: " + ", ".join(f"{r['command']} {r['ratio']:.3f}" for r in rows)
    return save("deadline", rows, summary, "0.98–1.02 for budgets ≥ 5 min (train) / 10 min (autotune)", ok,
                "python -m benchmarks run deadline")
