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
