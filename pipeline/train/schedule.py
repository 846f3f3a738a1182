"""Learning-rate schedules that run on progress ∈ [0, 1] toward the deadline.

progress = seconds used / seconds allowed (or tokens seen / tokens allowed), so the decay
reaches zero exactly when the budget ends, whatever the step time turns out to be
(budgeted training, Li et al. 2020; "straight to zero", Bergsma et al. 2025).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable


def lr_multiplier(progress: float, schedule: str = "linear", warmup_frac: float = 0.02,
                  decay_frac: float = 0.2) -> float:
    p = min(max(progress, 0.0), 1.0)
    if p >= 1.0:
        return 0.0
    if warmup_frac > 0 and p < warmup_frac:
        return p / warmup_frac
    if schedule == "linear":
        return max(0.0, (1.0 - p) / (1.0 - warmup_frac))
    # warmup-stable-decay with a (1 - sqrt) cooldown (Hägele et al. 2024)
    start = 1.0 - decay_frac
    if p < start:
        return 1.0
    return max(0.0, 1.0 - math.sqrt((p - start) / decay_frac))


@dataclass
class Budget:
    """How long the run may train: wall-clock seconds (the product), tokens (reproducible), or
    both, whichever comes first (autotune's run on little data: the deadline, and the most
    tokens worth training on that data)."""
    seconds: float | None = None
    tokens: int | None = None
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)
    start: float | None = None   # clock() value the deadline counts from (None: when training starts)

    def __post_init__(self):
        if self.seconds is None and self.tokens is None:
            raise ValueError("give seconds, tokens or both")

    @property
    def timed(self) -> bool:
        return self.seconds is not None


@dataclass
class OverfitCooldown:
    """Ends a run that has started to overfit repeated data, with its learning rate cooled to
    zero first. The schedule runs to the deadline (or to the planner's data cap, 12.7 epochs for
    every model), but larger models overfit a small corpus sooner: an uncapped d256-L4 on the
    embedded corpus read its best validation bpb (1.489) near 8 epochs and ended at 1.516 after
    12.8; with this stop it ended at 1.498 after 10.9 (session 32, Xeon;
    benchmarks/notes/overfit.md). So, once the data repeats (past one epoch), readings that stay
    above the best one by more than `margin` (relative) `patience` times in a row start a linear
    cooldown from the current learning rate to zero over `cooldown` × the tokens trained so far,
    and the run ends there ("overfit"). One rising reading is not enough: near its best, the run
    without the stop moved 0.03-0.6% between readings. The margin, patience and cooldown length
    are a judgement, not a fit (one model, one corpus)."""
    margin: float = 0.002
    patience: int = 2
    cooldown: float = 0.1
    best: float = math.inf
    rises: int = 0
    start_tokens: int | None = None    # set once triggered: the cooldown's span and its first rate
    end_tokens: int | None = None
    start_multiplier: float = 1.0

    @property
    def cooling(self) -> bool:
        return self.end_tokens is not None

    def observe(self, bpb: float, tokens: int, epochs: float, multiplier: float, step_tokens: int) -> bool:
        """Take one periodic validation reading; True when it starts the cooldown."""
        if self.cooling or not math.isfinite(bpb):
            return False
        if bpb < self.best:
            self.best, self.rises = bpb, 0
            return False
        self.rises = self.rises + 1 if bpb > self.best * (1 + self.margin) and epochs > 1.0 else 0
        if self.rises < self.patience:
            return False
        self.start_tokens, self.start_multiplier = tokens, multiplier
        # whole steps, so that the last step runs at 1/n of the rate it cooled from
        self.end_tokens = tokens + step_tokens * max(1, round(self.cooldown * tokens / step_tokens))
        return True

    def multiplier(self, tokens: int) -> float:
        """The cap on the schedule's learning-rate multiplier at `tokens` (1.0 before a cooldown)."""
        if not self.cooling:
            return 1.0
        left = (self.end_tokens - tokens) / max(1, self.end_tokens - self.start_tokens)
        return self.start_multiplier * min(1.0, max(0.0, left))

    def state_dict(self) -> dict:
        return {"best": self.best if math.isfinite(self.best) else None, "rises": self.rises,
                "start_tokens": self.start_tokens, "end_tokens": self.end_tokens,
                "start_multiplier": self.start_multiplier}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, math.inf if k == "best" and v is None else v)
