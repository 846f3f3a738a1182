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


def _cpu_id() -> tuple[str | None, str | None, str]:
    """(family, model, widest vector unit) from /proc/cpuinfo: the model name alone ("AMD EPYC")
    does not tell two generations apart, and session 9's machine (family 25, model 17, AVX-512)
    trained the same model ~1.8x faster than sessions 1-8's."""
    try:
        first = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:
        return None, None, ""
    fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in first.splitlines() if ":" in line)}
    flags = fields.get("flags", "").split()
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else ""
    return fields.get("cpu family"), fields.get("model"), isa


def machine() -> str:
    from pipeline.hardware import probe

    hw = probe()
    if hw.kind != "cpu":
        return f"{hw.name} ({hw.memory_bytes / 2**30:.0f} GiB), {hw.cpu_cores} CPU cores"
    family, model, isa = _cpu_id()
    detail = ", ".join(([f"family {family} model {model}"] if family else []) + ([isa] if isa else []))
    return f"{hw.name}{f' [{detail}]' if detail else ''}, {hw.ram_bytes / 2**30:.0f} GiB RAM"


def slug() -> str:
    """The results-file suffix for this machine: `gpu`, or `cpu-f<family>m<model>-<cores>c`, so a
    session on another CPU writes beside, never over, what a different CPU measured. (The
    `-cpu.json` files are sessions 1-8's machine, from before the family was recorded.)"""
    from pipeline.hardware import probe

    hw = probe()
    if hw.kind != "cpu":
        return "gpu"
    family, model, _ = _cpu_id()
    return f"cpu-f{family}m{model}-{hw.cpu_cores}c" if family else f"cpu-{hw.cpu_cores}c"


def commit() -> str:
    if os.environ.get("BENCH_COMMIT"):  # a copy without .git (the lent GPU machine): the caller says
        return os.environ["BENCH_COMMIT"]
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    return out.stdout.strip() or "unknown"


# Sessions 1-8's CPU: the replays of its stored runs (law_check, law_fit, predictor_forms) are
# filed under it, whatever machine replays them.
SESSIONS_1_8_CPU = ("cpu", "AMD EPYC (2 cores) [sessions 1–8; family not recorded], 24 GiB RAM")


def save(name: str, rows: list[dict], summary: str, goal: str, met: bool | None, command: str,
         on: tuple[str, str] | None = None) -> dict:
    """Write `results/<name>-<slug>.json`; `on` = (slug, machine) files a replay of another
    machine's stored runs under that machine."""
    import torch

    file_slug, machine_name = on or (slug(), machine())
    result = {"name": name, "machine": machine_name, "date": time.strftime("%Y-%m-%d"),
              "commit": commit(), "torch": torch.__version__, "python": platform.python_version(),
              "command": command, "rows": rows, "summary": summary, "goal": goal, "met": met}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}-{file_slug}.json").write_text(json.dumps(result, indent=2))
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
