"""torch.compile on a CPU: the CPU space's choice (`compile: [false]` for trials, and the rule
`compile_full_run` for the chosen model).

Each measurement is a fresh process training one shape of the CPU space alone, as the full run
does, with the engine's own step (8k-token batches from micro-batch 4, accumulation, clipping,
AdamW) for `seconds`; its compile and warm-up steps are inside them and left out of the rate.
Eager and compiled alternate, E C C E E C …, so that the machine's drift over minutes falls on
both. The compile time is the compiled run's first step over its median step. Both train at the
CPU space's precision (`auto`: bf16 autocast where the CPU has it, session 16); the stored
figures are from session 11, in fp32.

Why fresh processes rather than steps interleaved in one process (as `speed_vs_hf` and the
finalists are): the full run trains one model alone in its own process. A first version
interleaved the two in one process and read 1.13-1.31x; fresh processes read 1.20-1.38x, the
same within the machine's drift. The compile time is with Inductor's on-disk cache as the
machine has it: ~3 s for shapes compiled before, 7-11 s for a shape compiled the first time."""
from __future__ import annotations

import json
import statistics
import subprocess
import sys

from benchmarks.common import save

# d128-L3 (session 37): autotune's choice between it and d128-L2 turns on how differently the two
# gain; on an Ice Lake Xeon in fp32 it gained 1.59x alone, d128-L2 1.25x
SHAPES = {"d64-L2": {"n_heads": 1, "n_layers": 2}, "d128-L2": {"n_heads": 2, "n_layers": 2},
          "d128-L3": {"n_heads": 2, "n_layers": 3}, "d128-L4": {"n_heads": 2, "n_layers": 4}}


def measure(shape: dict, compiled: bool, seconds: float, precision: str | None = None) -> dict:
    """Train one shape for `seconds` in this process; steady tokens/s and compile time
    (`precision`: the space's by default)."""
    from pipeline.autotune.space import load_space, to_run_config
    from pipeline.data import DataSettings, prepare
    from pipeline.train.engine import Trainer
    from pipeline.train.schedule import Budget

    space = load_space("cpu")
    data = prepare(DataSettings(), log=lambda *_: None)
    cfg = to_run_config({k: v[0] for k, v in space.choices.items()} | shape, space, data.vocab_size)
    cfg.train.compile = compiled
    cfg.train.precision = precision or cfg.train.precision
    res = Trainer(cfg, data, Budget(seconds=seconds), trial=True, progress=False, log=lambda *_: None).run()
    return {"tokens_per_s": res.tokens_per_s, "compile_s": res.compile_s, "steps": res.steps,
            "compute_dtype": res.compute_dtype}


def in_fresh_process(shape: dict, compiled: bool, seconds: float, precision: str | None = None) -> dict:
    code = (f"import json; from benchmarks.cpu_compile import measure; "
            f"print(json.dumps(measure({shape!r}, {compiled}, {seconds}, {precision!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(seconds: float = 20.0, pairs: int = 3):
    rows = []
    for name, shape in SHAPES.items():
        runs = {False: [], True: []}
        for i in range(pairs):
            for compiled in ((False, True) if i % 2 == 0 else (True, False)):
                runs[compiled].append(in_fresh_process(shape, compiled, seconds))
        eager = [r["tokens_per_s"] for r in runs[False]]
        comp = [r["tokens_per_s"] for r in runs[True]]
        rows.append({"model": name, "eager_tokens_per_s": round(statistics.median(eager)),
                     "compiled_tokens_per_s": round(statistics.median(comp)),
                     "speedup": round(statistics.median(comp) / statistics.median(eager), 3),
                     "per_pair": ", ".join(f"{c / e:.2f}" for e, c in zip(eager, comp)),
                     "compile_s": round(statistics.median(r["compile_s"] for r in runs[True]), 1)})
    summary = "compiled/eager training tokens/s, each alone in a fresh process: " + ", ".join(
        f"{r['model']} {r['speedup']:.2f}× (compile {r['compile_s']:.0f} s)" for r in rows)
    return save("cpu_compile", rows, summary, "— (evidence for the CPU space's compile_full_run)", None,
                "python -m benchmarks run cpu_compile")
