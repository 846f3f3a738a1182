"""Shared helpers: machine description, result files, interleaved A/B timing."""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    from pipeline.hardware import probe

    hw = probe()
    return f"{hw.name}, {hw.ram_bytes / 2**30:.0f} GiB RAM" if hw.kind == "cpu" else \
        f"{hw.name} ({hw.memory_bytes / 2**30:.0f} GiB), {hw.cpu_cores} CPU cores"


def commit() -> str:
    if os.environ.get("BENCH_COMMIT"):  # a copy without .git (the lent GPU machine): the caller says
        return os.environ["BENCH_COMMIT"]
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    return out.stdout.strip() or "unknown"


def save(name: str, rows: list[dict], summary: str, goal: str, met: bool | None, command: str) -> dict:
    import torch

    result = {"name": name, "machine": machine(), "date": time.strftime("%Y-%m-%d"),
              "commit": commit(), "torch": torch.__version__, "python": platform.python_version(),
              "command": command, "rows": rows, "summary": summary, "goal": goal, "met": met}
    RESULTS.mkdir(parents=True, exist_ok=True)
    device = "gpu" if "GPU" in result["machine"] or "NVIDIA" in result["machine"] else "cpu"
    (RESULTS / f"{name}-{device}.json").write_text(json.dumps(result, indent=2))
    print(f"{name}: {summary}")
    return result


def interleaved(fns: dict, rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Time each callable `rounds` times in ABAB… order (after warm-up); seconds per call."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return times


def median(xs):
    return statistics.median(xs)


def argv_command() -> str:
    return "python -m benchmarks run " + " ".join(sys.argv[2:])
