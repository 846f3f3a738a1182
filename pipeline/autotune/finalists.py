"""The finalists: the plan's leading candidates measured against each other, step by step.

On a CPU a calibration trial's few-second window reads a candidate's speed ±15-20%: the machine
itself drifts over seconds (a 2-core VM's steps of one model, back to back, ran 17-33k tokens/s,
in runs of fast and slow steps; session 10). Candidates measured in different trials are compared
across that drift, and at a 10-minute budget the plan's top two were within 0.3% of predicted
loss, well inside what that noise moves. So the finalists run interleaved in one process, one
optimizer step of each in turn (A B C, C B A, ...), with the training engine's own step: both see
the same machine, and the ratio of their median step times is what the comparison needs.

Only the ratios are used. The level stays the throughput model's (fitted on every trial), so a
finalist is not favoured over the rest of the plan for being measured outside Ray, where the same
shapes run faster than in Ray trials.
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable

MARGIN = 0.02   # contenders: reducible predicted loss within 2% of the best (about what ±10%
#                 throughput moves it at these budgets: L - E's data term scales as D^-0.37)
MAX_FINALISTS = 3
WARMUP_STEPS = 2


def finalist_seconds(calibration_s: float) -> float:
    """The part of the calibration share the finalists get, with the fit and plan before them
    (~1.5 s on 2 cores); the search gets the rest."""
    return min(60.0, 0.25 * calibration_s) + 1.5


def contenders(rows: list, law_e: float, margin: float = MARGIN, limit: int = MAX_FINALISTS) -> list:
    """The feasible rows worth a head-to-head: the best, the runner-up (always), and any other
    whose reducible predicted loss (L - E) is within `margin` of the best's."""
    feasible = [r for r in rows if r.feasible and math.isfinite(r.predicted_loss)]
    if len(feasible) < 2:
        return feasible
    best = feasible[0].predicted_loss - law_e
    close = [r for r in feasible[2:] if (r.predicted_loss - law_e) <= (1 + margin) * best]
    return (feasible[:2] + close)[:limit]


def rescaled(predicted: dict[str, float], measured: dict[str, float]) -> dict[str, float]:
    """The finalists' planning rates: the model's geometric-mean level, shared out in the
    measured ratios. A finalist that could not run (rate 0) is never chosen (1e-9)."""
    ok = {k: v for k, v in measured.items() if v > 0}
    out = {k: 1e-9 for k in measured if k not in ok}
    if not ok:
        return out
    level = math.exp(statistics.fmean(math.log(predicted[k]) for k in ok))
    mean = math.exp(statistics.fmean(math.log(v) for v in ok.values()))
    return out | {k: level * v / mean for k, v in ok.items()}


def interleaved_rates(configs: dict, data, seconds: float, log: Callable[[str], None] = print,
                      clock: Callable[[], float] = time.monotonic, min_timed: int = 1,
                      timed_window: bool = False) -> dict[str, float]:
    """Tokens/s of each RunConfig in `configs` (key → config), measured by interleaving their
    optimizer steps for `seconds` (and for at least `min_timed` steps after the warm-up, however
    long that takes). `timed_window`: the `seconds` start after the warm-up, so that a warm-up
    that holds a compile cannot use them up. A config that fails to build or step (out of
    memory) gets 0."""
    from pipeline.train.engine import Trainer
    from pipeline.train.schedule import Budget

    end = clock() + seconds  # building the trainers is part of the time (unless timed_window)
    trainers, times = {}, {}
    for key, cfg in configs.items():
        try:
            trainers[key] = Trainer(cfg, data, Budget(seconds=seconds), trial=True, progress=False,
                                    log=lambda *_: None)
            times[key] = []
        except (MemoryError, RuntimeError) as exc:  # torch's OutOfMemoryError is a RuntimeError
            log(f"finalist {key} could not be built ({str(exc)[:80]}); ruled out")
    order = list(trainers)
    rounds = 0
    try:
        while order and (rounds < WARMUP_STEPS + min_timed or clock() < end):
            for key in (list(order) if rounds % 2 == 0 else order[::-1]):
                trainer = trainers[key]
                start = clock()
                try:
                    trainer.train_step(trainer.cfg.train.lr)
                except (MemoryError, RuntimeError) as exc:
                    log(f"finalist {key} failed a step ({str(exc)[:80]}); ruled out")
                    order.remove(key)
                    times.pop(key)
                    continue
                if rounds >= WARMUP_STEPS:
                    times[key].append(clock() - start)
            rounds += 1
            if timed_window and rounds == WARMUP_STEPS:
                end = clock() + seconds
    finally:
        for trainer in trainers.values():
            trainer.loader.close()
    return {key: (trainers[key].tokens_per_step / statistics.median(times[key]) if times.get(key) else 0.0)
            for key in configs}


def compile_gain_seconds(calibration_s: float) -> float:
    """The time one compiled/eager measurement (`compile_gain`) is given out of the calibration
    share: its timed steps, after the warm-up. The warm-up holds the compile (2-50 s cold on 2
    cores), which is the full run's own paid early (its graph, from Inductor's cache, then
    compiles in ~0.5 s; benchmarks/notes/cpu_compile.md, session 35).
    None (0) below a minute of calibration (budgets under 10 minutes): a compile alone takes
    2-11 s on 2 cores, which the trials need more; such plans stay at the eager trials' speed."""
    return min(15.0, 0.08 * calibration_s) if calibration_s >= 60 else 0.0


# The gain the plan assumes before measuring, only to pick which leader to measure first, by the
# full run's precision on this CPU. bf16 autocast: 1.50-1.75x on a Zen 4 (cpu_precision), 1.53-1.81x
# on an Intel Xeon with AMX (cpu_precision; autotune's leaders, sessions 28-30). fp32: 1.20-1.38x on
# the Zen 4 (cpu_compile), 1.09-1.24x for autotune's leaders on the Xeon (session 34). A prior far
# from the gain moves the lead once it is measured, and the second leader costs a second cold
# compile: on the Xeon in fp32 the 1.5x prior cost 40 + 18 s of a 10-minute budget (session 34).
PRIOR_COMPILE_GAIN = 1.5
PRIOR_COMPILE_GAIN_FP32 = 1.2


def prior_compile_gain(cfg) -> float:
    """The prior for a full run `cfg` (a RunConfig) trained on this CPU."""
    import torch

    from pipeline.train.engine import autocast_dtype

    bf16 = autocast_dtype(cfg.train.precision, torch.device("cpu")) == torch.bfloat16
    return PRIOR_COMPILE_GAIN if bf16 else PRIOR_COMPILE_GAIN_FP32


MIN_TIMED = 3  # steps of each timed after the warm-up: one step of each drifts ±15% on 2 cores


def compile_gain(cfg, data, seconds: float, log: Callable[[str], None] = print,
                 clock: Callable[[], float] = time.monotonic) -> float | None:
    """How much faster `cfg` trains compiled than eager: the ratio of the two, interleaved step
    by step in this process (one compiled trainer only: building one resets dynamo for the
    rest). Trials run eager and the full run compiled (a space's `compile_full_run`), and on
    2 cores the gap is no constant: 1.2-2.1× by shape, precision and CPU (cpu_compile,
    cpu_precision). None when either side could not run."""
    import copy

    eager, compiled = copy.deepcopy(cfg), copy.deepcopy(cfg)
    eager.train.compile, compiled.train.compile = False, True
    # the window after the compile: counted from the start, a cold compile (50 s) used it up and
    # left MIN_TIMED steps of each, whose median read 1.20x where other readings on the same
    # instance read 1.30-1.44x, and the plan chose a size below the grid's best (session 36)
    rates = interleaved_rates({"eager": eager, "compiled": compiled}, data, seconds, log, clock, MIN_TIMED,
                              timed_window=True)
    if rates["eager"] <= 0 or rates["compiled"] <= 0:
        return None
    return rates["compiled"] / rates["eager"]
