"""torch.compile on a CPU: the CPU space's fixed `compile: [false]`.

For a few shapes of the CPU space, one eager and one compiled trainer (the training engine's own
step, Inductor's C++ backend) take optimizer steps in turn, A B, B A, ..., so both see the same
machine; the ratio of their median step times is the speed-up, and the compiled trainer's first
step over its median is the compile time a trial or a run would pay."""
from __future__ import annotations

import statistics
import time

from benchmarks.common import save

SHAPES = {"d64-L2": {"n_heads": 1, "n_layers": 2}, "d128-L2": {"n_heads": 2, "n_layers": 2},
          "d128-L4": {"n_heads": 2, "n_layers": 4}, "d256-L4": {"n_heads": 4, "n_layers": 4}}


def _pair(cfg, data, seconds: float) -> dict:
    import copy

    from pipeline.train.engine import Trainer
    from pipeline.train.schedule import Budget

    cfgs = {"eager": cfg, "compiled": copy.deepcopy(cfg)}
    cfgs["compiled"].train.compile = True
    trainers = {k: Trainer(c, data, Budget(seconds=seconds), trial=True, progress=False, log=lambda *_: None)
                for k, c in cfgs.items()}
    times = {k: [] for k in trainers}
    first = {}
    try:
        for k, t in trainers.items():
            start = time.perf_counter()
            t.train_step(t.cfg.train.lr)
            first[k] = time.perf_counter() - start
        end, rounds = time.perf_counter() + seconds, 0
        while rounds < 6 or time.perf_counter() < end:
            for k in (list(trainers) if rounds % 2 == 0 else list(trainers)[::-1]):
                start = time.perf_counter()
                trainers[k].train_step(trainers[k].cfg.train.lr)
                if rounds >= 2:
                    times[k].append(time.perf_counter() - start)
            rounds += 1
    finally:
        for t in trainers.values():
            t.loader.close()
    step = {k: statistics.median(v) for k, v in times.items()}
    tokens = trainers["eager"].tokens_per_step
    return {"eager_tokens_per_s": round(tokens / step["eager"]), "compiled_tokens_per_s": round(tokens / step["compiled"]),
            "speedup": round(step["eager"] / step["compiled"], 3), "steps": len(times["eager"]),
            "compile_s": round(first["compiled"] - step["compiled"], 1)}


def run(seconds: float = 30.0):
    from pipeline.autotune.space import load_space, to_run_config
    from pipeline.data import DataSettings, prepare

    space = load_space("cpu")
    data = prepare(DataSettings(), log=lambda *_: None)
    base = {k: v[0] for k, v in space.choices.items()}
    rows = [{"model": name, **_pair(to_run_config(base | shape, space, data.vocab_size), data, seconds)}
            for name, shape in SHAPES.items()]
    summary = "compiled/eager training tokens/s: " + ", ".join(
        f"{r['model']} {r['speedup']:.2f}× (compile {r['compile_s']:.0f} s)" for r in rows)
    return save("cpu_compile", rows, summary, "— (evidence for the CPU space's compile: [false])", None,
                "python -m benchmarks run cpu_compile")
