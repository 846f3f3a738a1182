"""What the plan knows about the machine, and how it grows: the throughput and memory models
fitted to the calibration trials, the trials' own readings, the memory ceiling the out-of-memory
trials measured, and the finalists' head-to-head rates. Planning (stage 5) is redone each time a
measurement arrives (the finalists, the unmeasured choice verified, multi-worker scaling); this
object keeps those inputs together so that each redo is one call, `plan(seconds)`."""
from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.autotune.fit import (MemoryModel, Shape, ThroughputModel, leave_one_out_predictions,
                                   median_and_max)
from pipeline.autotune.plan import PlanRow, ScalingLaw, memory_ceiling, plan, planning_rates


class Scaled:
    """A throughput model multiplied by the plan's factor (data-parallel workers × their measured
    efficiency) and by the full run's compile gain: a shape's own where it was measured (`gains`,
    (Shape, gain) pairs), else `gain`."""

    def __init__(self, model, factor: float, gain: float = 1.0, gains: tuple = ()):
        self.model, self.factor, self.gain, self.gains = model, factor, gain, gains

    def tokens_per_s(self, shape) -> float:
        own = next((g for s, g in self.gains if s == shape), self.gain)
        return self.model.tokens_per_s(shape) * self.factor * own


@dataclass
class Evidence:
    candidates: list            # (key, candidate, Shape) for every candidate in the space
    shapes: list                # the throughput model's points: the shapes that gave a reading...
    tokens_per_s: list          # ...and their readings
    readings: dict              # candidate key -> its mean reading (tokens/s)
    memory: MemoryModel
    memory_limit: float         # bytes the plan may use, lowered by out-of-memory trials
    unique_tokens: float
    throughput: ThroughputModel
    finalist_rates: dict = field(default_factory=dict)  # head-to-head rates outrank every other reading
    factor: float = 1.0         # data-parallel workers × their measured efficiency
    compile_gain: float = 1.0   # the full run compiled over the eager trials, measured (`compile_gain`)
    compile_gains: dict = field(default_factory=dict)  # candidate key -> its own measured gain, if measured
    workers: int = 1
    law: ScalingLaw = field(default_factory=ScalingLaw)
    shapes_by_key: dict = field(default_factory=dict)

    @classmethod
    def from_trials(cls, records: list, candidates: list, shape_of, amp: bool, memory_bytes: float,
                    unique_tokens: float) -> "Evidence":
        """Fit both models to the trials (`records`, failed ones included: an out-of-memory trial
        lowers the ceiling). Memory is fitted only under CUDA, where peak memory is measured per
        device; on CPU the model is the analytic one. `memory_bytes` is the usable memory."""
        ok = [r for r in records if r.status == "ok"]
        shapes = [shape_of(r.candidate) for r in ok]
        tps = [r.tokens_per_s for r in ok]
        mem = MemoryModel.fit(shapes, [r.peak_memory_bytes for r in ok], amp) if amp else MemoryModel(amp=False)
        limit = memory_ceiling(memory_bytes, [mem.bytes(shape_of(r.candidate)) for r in records
                                              if r.status == "oom"])
        readings: dict[str, list] = {}
        for r in ok:  # several trials of one candidate: average them
            readings.setdefault(r.key, []).append(r.tokens_per_s)
        return cls(candidates=candidates, shapes=shapes, tokens_per_s=tps,
                   readings={k: sum(v) / len(v) for k, v in readings.items()},
                   memory=mem, memory_limit=limit, unique_tokens=unique_tokens,
                   throughput=ThroughputModel.fit(shapes, tps),
                   shapes_by_key={r.key: s for r, s in zip(ok, shapes)} | {k: s for k, _, s in candidates})

    def shape(self, key: str) -> Shape:
        return self.shapes_by_key[key]

    def leave_one_out(self) -> tuple[list, float, float]:
        """The throughput model's leave-one-out predictions of its own points, with the median and
        worst absolute error."""
        pred = leave_one_out_predictions(self.shapes, self.tokens_per_s)
        errors = [abs(p / t - 1.0) for p, t in zip(pred, self.tokens_per_s)] if len(pred) > 1 else []
        return (pred, *median_and_max(errors))

    def measured(self) -> dict[str, float]:
        """The rates the plan uses for candidates with a reading (the model's, unless a reading
        shows a cliff), overridden by the finalists' head-to-head rates."""
        predicted = {k: self.throughput.tokens_per_s(self.shape(k)) for k in self.readings}
        return planning_rates(self.readings, predicted) | self.finalist_rates

    def gain(self, key: str) -> float:
        """The compiled/eager gain a candidate is planned at: its own where it was measured, else
        the last measured. Gains differ by shape (1.42× and 1.57× for d256-L4 and d192-L4 on one
        Xeon); with one gain for all, the second leader's 1.57× put the first back in the lead at a
        speed it had been measured not to reach (session 30)."""
        return self.compile_gains.get(key, self.compile_gain)

    def take_head_to_head(self, finals: list[PlanRow], rates: dict[str, float]) -> dict[str, float]:
        """The finalists' head-to-head `rates` become their planning rates (`finalists.rescaled`:
        the model's level, the measured ratios); returns them as the plan now counts them. The
        rows' rates carry the plan's factor (workers, compile gain), which `plan` applies again,
        so it is taken out first (counted twice, a 1.69× compile gain planned d192-L3 at 38k
        tokens/s where it trained 23k, session 29)."""
        from pipeline.autotune.finalists import rescaled

        self.finalist_rates = rescaled({r.key: r.tokens_per_s / (self.factor * self.gain(r.key)) for r in finals}, rates)
        return {k: self.factor * self.gain(k) * v for k, v in self.finalist_rates.items()}

    def plan(self, seconds: float) -> list[PlanRow]:
        """Every candidate, best first, for `seconds` of training."""
        # every candidate at its own compile gain where that was measured (`gain`), whether its
        # rate comes from a reading or from the model: a leader's gain is measured before its
        # reading is (`_verify_choice` comes after `_compile_gain`)
        gains = tuple((self.shape(k), g) for k, g in self.compile_gains.items())
        throughput = Scaled(self.throughput, self.factor, self.compile_gain, gains)
        return plan(self.candidates, throughput, self.memory, seconds, self.unique_tokens, law=self.law,
                    memory_limit=self.memory_limit, workers=self.workers,
                    measured={k: v * self.factor * self.gain(k) for k, v in self.measured().items()})

    def add(self, records: list) -> None:
        """Readings taken after the fit (the choice verified before launch). A usable reading
        (one step is a measurement too: a big choice may take a whole window per step) becomes
        the candidate's reading and one more point for the throughput model, which is refitted;
        a failed one rules the candidate out (a reading of ~0), and an out-of-memory one lowers the
        ceiling to it, taking everything heavier out with it."""
        for r in records:
            usable = r.status in ("ok", "too_slow") and r.steps > 0 and r.tokens_per_s > 0
            self.readings[r.key] = r.tokens_per_s if usable else 1e-9
            if r.status == "oom":
                self.memory_limit = memory_ceiling(self.memory_limit, [self.memory.bytes(self.shape(r.key))])
            if usable:
                self.shapes.append(self.shape(r.key))
                self.tokens_per_s.append(r.tokens_per_s)
        self.throughput = ThroughputModel.fit(self.shapes, self.tokens_per_s)
