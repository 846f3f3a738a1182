"""Wall-clock adherence: `pipeline.train --minutes M` and `pipeline.autotune --minutes M`, the
whole command timed from outside (process start to exit) against its budget."""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import save


def _timed(cmd: list[str]) -> tuple[float, str]:
    t = time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return time.monotonic() - t, out.stderr


def run(train_minutes=(1, 5), autotune_minutes=()):
    # autotune's own adherence is measured by the quality benchmark (same run, no double cost)
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
    ok = all(0.98 <= r["ratio"] <= 1.02 for r in rows if r["budget_s"] >= 300)
    summary = "wall/budget: " + ", ".join(f"{r['command']} {r['ratio']:.3f}" for r in rows)
    return save("deadline", rows, summary, "0.98–1.02 for budgets ≥ 5 min (train) / 10 min (autotune)", ok,
                "python -m benchmarks run deadline")
