"""torch.compile on a CPU: the CPU space's choice (`compile: [false]` for trials, and the rule
`compile_full_run` for the chosen model).

Eager and compiled each train one shape of the CPU space alone in their own process, as the full
run does, with the engine's own step (8k-token batches from micro-batch 4, accumulation,
clipping, AdamW), and the two processes take turns, four steps each (`benchmarks.turns`), so that
the machine's drift falls on both. Each shape gets two such windows, the order swapped. The
compile time is the compiled side's first step over its median step, with Inductor's on-disk
cache as the machine has it: ~3 s for shapes compiled before, 7-50 s for a shape compiled the
first time (session 36). Both train at the CPU space's precision (`auto`: bf16 autocast where
the CPU has it, session 16).

Until session 38 each side ran in a fresh process after the other (E C C E …). On a 2-core VM
whose speed moves by up to 1.5x within minutes, those pairs read one shape's gain anywhere in
1.20-1.81x, and in session 37 they put d128-L3's gain 1.28x above d128-L2's, which runs in turns
did not confirm (benchmarks/notes/cpu_compile.md, session 38)."""
from __future__ import annotations

import statistics

from benchmarks.common import save
from benchmarks.turns import in_turns, over_windows

# d128-L3 (session 37): autotune chooses between it and d128-L2 at 15 minutes
SHAPES = {"d64-L2": {"n_heads": 1, "n_layers": 2}, "d128-L2": {"n_heads": 2, "n_layers": 2},
          "d128-L3": {"n_heads": 2, "n_layers": 3}, "d128-L4": {"n_heads": 2, "n_layers": 4}}


def run(seconds: float = 25.0, windows: int = 2):
    rows = []
    for name, shape in SHAPES.items():
        runs = []
        for i in range(windows):
            sides = {"eager": (shape, False, None), "compiled": (shape, True, None)}
            if i % 2:
                sides = dict(reversed(sides.items()))
            runs.append(in_turns(sides, seconds))
        eager, comp, per_window = over_windows(runs, "eager", "compiled")
        rows.append({"model": name, "eager_tokens_per_s": round(eager), "compiled_tokens_per_s": round(comp),
                     "speedup": round(comp / eager, 3), "per_window": per_window,
                     "compile_s": round(statistics.median(r["compiled"]["compile_s"] for r in runs), 1)})
    summary = "compiled/eager training tokens/s, each alone in its own process, in turns: " + ", ".join(
        f"{r['model']} {r['speedup']:.2f}× (compile {r['compile_s']:.0f} s)" for r in rows)
    return save("cpu_compile", rows, summary, "— (evidence for the CPU space's compile_full_run)", None,
                "python -m benchmarks run cpu_compile")
