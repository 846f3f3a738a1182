"""bf16 autocast on a CPU: the CPU space's `precision: [auto]`, which is bf16 where the CPU
multiplies bf16 in hardware (AVX512-BF16 or AMX) and fp32 elsewhere.

fp32 and bf16 each train one shape of the CPU space alone in their own process with the engine's
own step, and the two take turns (`benchmarks.turns`, as `cpu_compile` measures), so that the
machine's drift falls on both; eager as the trials run, compiled as the full run does. Each
side's compile sits in its warm-up, outside the timed turns: a first bf16 compile of a shape took
15-20 s on 2 cores, most of a 20-s window, and the first version of this benchmark read
0.06-0.07x from such runs (session 16). Weights, optimizer state and the loss are fp32 in both;
only the autocast region differs.
What it buys in bpb at equal tokens and at equal time is in benchmarks/notes/cpu_precision.md."""
from __future__ import annotations

from benchmarks.common import save
from benchmarks.turns import in_turns, over_windows

# the two shapes autotune chooses between most (d128-L2) and the 30-minute grid's best (d192-L3)
SHAPES = {"d128-L2": {"n_heads": 2, "n_layers": 2}, "d192-L3": {"n_heads": 3, "n_layers": 3}}


def run(seconds: float = 25.0, windows: int = 2):
    from pipeline.hardware import cpu_has_native_bf16

    rows = []
    for name, shape in SHAPES.items():
        for compiled in (False, True):
            runs = []
            for i in range(windows):
                order = ("fp32", "bf16") if i % 2 == 0 else ("bf16", "fp32")
                r = in_turns({p: (shape, compiled, p) for p in order}, seconds)
                for p in order:  # each side did use the precision asked for
                    assert r[p]["compute_dtype"] == p, r
                runs.append(r)
            fp32, bf16, per_window = over_windows(runs, "fp32", "bf16")
            rows.append({"model": name, "step": "compiled" if compiled else "eager",
                         "fp32_tokens_per_s": round(fp32), "bf16_tokens_per_s": round(bf16),
                         "speedup": round(bf16 / fp32, 3), "per_window": per_window})
    native = "native bf16" if cpu_has_native_bf16() else "no native bf16: auto trains fp32 here"
    summary = f"bf16/fp32 training tokens/s ({native}), each alone in its own process, in turns: " + ", ".join(
        f"{r['model']} {r['step']} {r['speedup']:.2f}×" for r in rows)
    return save("cpu_precision", rows, summary, "— (evidence for the CPU space's precision: auto)", None,
                "python -m benchmarks run cpu_precision")
