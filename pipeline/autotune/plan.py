"""The planner: for every candidate, the tokens it can train in the time left and the loss a
scaling law predicts for (parameters, effective tokens); pick the lowest.

A pure function of (candidates, throughput model, memory model, seconds, unique tokens, law),
so it is tested with synthetic models (compute-optimal scaling falls out of it).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Protocol

from model.config import param_counts
from pipeline.autotune.fit import Shape


@dataclass(frozen=True)
class ScalingLaw:
    """L(N, D) = E + A/N^α + B/D^β. Defaults: the Epoch AI refit of Chinchilla (Besiroglu et al.
    2024). Only the shape transfers to our tokenizer and data; the planner ranks, never promises.

    With U unique tokens the data-constrained form of Muennighoff et al. (2023) replaces both
    N and D by their effective values: repeated tokens are worth less (D', decay constant R_D*)
    and so are parameters beyond what U tokens can train compute-optimally (N', R_N*).

    R_D* (how fast repeated tokens stop paying) is 3 here, not the paper's 15.4. On 2 CPU cores,
    d128-L2 trained 13.5M tokens of the 1.3M-token corpus in 15 minutes and 24.6M in 30 (10 and
    18 epochs) and gained 0.5% bpb; deeper models on half those tokens ended 2-3% lower. With
    15.4 the law still credited those epochs as nearly fresh data and ranked the 30-minute runs
    almost in reverse (0 of 13 pairs of the CPU space's shapes right). Chosen on the stored runs
    of both CPUs (`python -m benchmarks run law_variants`): among the space's shapes R_D* 3
    orders 158 of 176 pairs as they finished (15.4: 143), on a ridge of equally good pairs
    (R_D*, R_N*) ≈ (1.5, 5.3)-(4, 16); 3 keeps R_N* where it was calibrated. It is a small-model,
    many-epoch figure, unmeasured on GPU; where data repeats little it changes little (at two
    epochs D' is 6% below the paper's, at four 22%).

    R_N* (how fast excess parameters stop paying) is recalibrated on this project's own runs.
    The paper's 5.3 was fitted on models of 10M+ parameters; every CPU candidate is 10-60x the
    ~35k parameters the 1.3M-token embedded corpus "can train", where 5.3 caps them all at
    about the same effective size, so the planner kept the smallest model at every budget and
    lost to the 30-minute hand grid's d128-L2 by 5% bpb. 16 puts the law's d64-L2/d128-L2
    crossover, at their measured grid speeds, where the 10- and 15-minute grids cross (~790 s
    of training; `benchmarks/notes/law_check.md`). 50 (session 33 only) lets models up to ~7M
    parameters, not ~2.2M, keep paying on that corpus: with the data cap falling with size
    (`useful_tokens`) it chose d256-L4 for 30 minutes on a bf16 Xeon and finished 0.988x the
    bpb of 16's d192-L3 at each of two seeds; but at 10 minutes in fp32 on the same CPU its
    favourite moved with calibration noise to models 4.6-6.1% worse than 16's d128-L2, and one
    autotune run finished 1.049x the grid's best (16: 1.008x). 16's worst measured cost (1.2%)
    is the smaller (`benchmarks/notes/law_variants.md`, sessions 33-34)."""
    E: float = 1.8172
    A: float = 482.01
    B: float = 2085.43
    alpha: float = 0.3478
    beta: float = 0.3658
    r_star: float = 3.0      # R_D*: repeated-data decay (the paper: 15.4; see above)
    r_star_params: float = 16.0  # R_N*: decay for excess parameters (the paper: 5.3; see above)
    repeat_epochs: float = 18.0  # K: N parameters stop gaining from repeats at K·√(U/N) epochs

    def loss(self, n_params: float, tokens: float, unique_tokens: float | None = None) -> float:
        if n_params <= 0 or tokens <= 0:
            return math.inf
        n, d = n_params, tokens
        if unique_tokens:
            d = effective_tokens(tokens, unique_tokens, self.r_star)
            n = effective_params(n_params, self.optimal_params(unique_tokens), self.r_star_params)
        return self.E + self.A / n ** self.alpha + self.B / d ** self.beta

    def useful_tokens(self, unique_tokens: float, n_params: float | None = None) -> float:
        """The most tokens worth training on `unique_tokens` (U) of data: where D' is within
        1/SATURATION of its ceiling (12.7 epochs at R_D* = 3), and for a model of `n_params` (N)
        no more than K·√(U/N) epochs (K = `repeat_epochs`), at least one.

        Past the first limit the law still credits a sliver, but in runs repeats hurt: on 2 CPU
        cores d192-L3 reached 1.4852 bpb at 10 epochs of the embedded corpus and 1.4919 at 14.3;
        on an H200 a 55M model's val bpb rose from 1.90 to 2.96 between 94 and 300 epochs
        (session 17). The second is the measured fact that larger models overfit repeats sooner,
        which the law's form cannot say (its D' only saturates): on the 1.33M-token embedded
        corpus d256-L4 (5.2M parameters) did best at 9 epochs or fewer and lost 0.5% at 10.5,
        2.3% at 12.5 and 3.0% at 12.8, while d192-L3 (2.6M) was still level at 12.7
        (`benchmarks/notes/overfit.md`; session 33 saw a hint that 12.7 is late for d192-L3 too,
        0.5% at 9.9 epochs against a 0.3% run-to-run spread). The exponent 1/2 is the least those
        two sizes allow; K = 18 puts d256-L4's cap at 9 epochs and leaves every model with N <= 2U
        at 12.7. Only runs with N > 2U are capped earlier: on a CPU that is the space's largest
        shapes on the embedded corpus, on a GPU every candidate on it. The plan and the full run
        stop here."""
        epochs = 1.0 + self.r_star * math.log(SATURATION)
        if n_params:
            epochs = min(epochs, max(1.0, self.repeat_epochs * math.sqrt(unique_tokens / n_params)))
        return unique_tokens * epochs

    def data_limited(self, tokens: float, unique_tokens: float, n_params: float | None = None) -> bool:
        """Whether `tokens` reach `useful_tokens`: the data, not the time, ends such a run."""
        return tokens >= 0.999 * self.useful_tokens(unique_tokens, n_params)

    def optimal_params(self, tokens: float) -> float:
        """The N whose compute-optimal allocation under this law trains on exactly `tokens`:
        with G = (αA / βB)^(1/(α+β)), N_opt = G·(C/6)^(β/(α+β)) and D_opt = (C/6)^(α/(α+β)) / G,
        so N_opt(D) = G·(G·D)^(β/α)."""
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))
        return g * (g * tokens) ** (self.beta / self.alpha)


# Where the data-constrained law's returns count as spent: within 1/SATURATION of the ceiling.
# Beyond it, more repeats or more parameters the data cannot feed are worth nothing here (the law's
# last 2% are below its accuracy, and real runs overfit there), so candidates past it tie exactly
# and the smaller, quicker one wins: on an H200 the embedded corpus once let a 55M model "win" by
# 0.001% of predicted loss and train 121 epochs (session 17).
SATURATION = 50.0


def _saturating(base: float, r: float, r_star: float) -> float:
    """base·(1 + R*·(1 − exp(−R/R*))), flat once exp(−R/R*) ≤ 1/SATURATION."""
    return base * (1.0 + r_star * (1.0 - max(math.exp(-r / r_star), 1.0 / SATURATION)))


def effective_tokens(tokens: float, unique: float, r_star: float = 15.4) -> float:
    """D' = U + U·R*·(1 − exp(−R/R*)), R = D/U − 1 repetitions: repeated data is worth less."""
    if tokens <= unique:
        return tokens
    return _saturating(unique, tokens / unique - 1.0, r_star)


def effective_params(n_params: float, useful: float, r_star: float) -> float:
    """N' = U_N + U_N·R_N*·(1 − exp(−R_N/R_N*)), U_N = min(N, N_opt(unique tokens)),
    R_N = N/U_N − 1: parameters the unique data cannot feed add less and less."""
    if n_params <= useful:
        return n_params
    return _saturating(useful, n_params / useful - 1.0, r_star)


def token_cap(model_cfg, unique_tokens: float, law: ScalingLaw = ScalingLaw()) -> int:
    """The most tokens a full run of `model_cfg` (a ModelConfig) trains on `unique_tokens`:
    `useful_tokens` at its active parameters (autotune's full run; the quality benchmark's grid)."""
    return int(law.useful_tokens(unique_tokens, param_counts(model_cfg)["active"]))


def law_params(shape: Shape) -> int:
    """N for the law: the parameters a token passes through (tied head counted once)."""
    return param_counts(shape.model)["active"]


class Throughput(Protocol):
    def tokens_per_s(self, shape: Shape) -> float: ...


class Memory(Protocol):
    def bytes(self, shape: Shape) -> float: ...


@dataclass
class PlanRow:
    key: str
    candidate: dict
    params: int
    tokens_per_s: float
    memory_bytes: float
    feasible: bool
    tokens: float
    tokens_per_param: float
    epochs: float
    predicted_loss: float
    measured: bool = False
    parallel: str = "ddp"       # "fsdp": fits only with weights/optimizer state sharded over workers
    data_limited: bool = False  # its tokens reach `ScalingLaw.useful_tokens`: the data ends its run

    def to_dict(self) -> dict:
        return asdict(self)


def plan(candidates: list[tuple[str, dict, Shape]], throughput: Throughput, memory: Memory,
         seconds: float, unique_tokens: float, law: ScalingLaw = ScalingLaw(),
         memory_limit: float = math.inf, measured: dict[str, float] | None = None,
         workers: int = 1) -> list[PlanRow]:
    """Rows sorted best first (feasible before infeasible). `measured` maps candidate keys to
    measured tokens/s, which replaces the model's prediction for those candidates. With several
    `workers`, a candidate whose replica does not fit may still fit sharded (FSDP)."""
    measured = measured or {}
    rows = []
    for key, cand, shape in candidates:
        tps = measured.get(key) or throughput.tokens_per_s(shape)
        mem, parallel = memory.bytes(shape), "ddp"
        if mem > memory_limit and workers > 1:
            mem, parallel = memory.bytes(shape, shards=workers), "fsdp"
        n = law_params(shape)
        # with little data the run stops early, at the most tokens worth training (`useful_tokens`)
        cap = law.useful_tokens(unique_tokens, n) if unique_tokens else math.inf
        tokens = min(max(0.0, tps * seconds), cap)
        feasible = mem <= memory_limit and tokens >= 1
        rows.append(PlanRow(key=key, candidate=cand, params=n, tokens_per_s=tps, memory_bytes=mem,
                            feasible=feasible, tokens=tokens, tokens_per_param=tokens / n,
                            epochs=tokens / unique_tokens if unique_tokens else math.nan,
                            predicted_loss=law.loss(n, tokens, unique_tokens) if feasible else math.inf,
                            measured=key in measured, parallel=parallel, data_limited=tokens >= 0.999 * cap))
    # ties (past the law's saturation): the smaller model, then the faster one
    rows.sort(key=lambda r: (not r.feasible, r.predicted_loss, r.params, -r.tokens_per_s))
    return rows


def memory_ceiling(limit: float, oom_bytes: list[float]) -> float:
    """The memory limit the plan applies, lowered by calibration's out-of-memory trials: a trial
    that ran out of memory measured the ceiling, so every candidate the memory model predicts to
    need at least as much as it did is infeasible too (a bigger model that fitted where a smaller
    one did not is not something to bet a full run on)."""
    return min([limit, *(0.999 * b for b in oom_bytes)])


# A reading this far below the model's prediction is a real effect the model's smooth form
# cannot know (a cache or memory cliff, a failed run), not noise: it overrides the model.
CLIFF = 0.6


def planning_rates(readings: dict[str, float], predicted: dict[str, float]) -> dict[str, float]:
    """The tokens/s the plan uses for candidates that have a calibration reading: the fitted
    model's prediction, unless the reading is far below it (`CLIFF`).

    Why not the reading itself: a 3-6 s trial window on a shared machine reads ±10-20%, and
    the planner takes the best of many readings, so the winner is the luckiest one. On eleven
    stored 10-minute CPU runs, the full run achieved a median 81% of the chosen candidate's own
    reading and 86% of the model's prediction (the model is fitted to every trial, so it
    averages their noise): median absolute log error 0.21 against 0.15."""
    return {k: (v if v < CLIFF * predicted[k] else predicted[k]) for k, v in readings.items()}


def measured_instead(rows: list[PlanRow], rows_after_measuring: list[PlanRow]) -> PlanRow | None:
    """Whether measuring the unmeasured favourite (rows[0]) is worth its cost: the best measured,
    feasible candidate if it is at least as good as the favourite would be once the measurement's
    time is spent (`rows_after_measuring`: the plan redone with that much less time); None if the
    measurement is worth it."""
    key = rows[0].key
    after = next(r for r in rows_after_measuring if r.key == key).predicted_loss
    return next((r for r in rows if r.measured and r.feasible and r.predicted_loss <= after), None)


def why(best: PlanRow, rows: list[PlanRow]) -> str:
    """One sentence on why the winner won against its neighbours in size."""
    feasible = [r for r in rows if r.feasible]
    bigger = [r for r in feasible if r.params > best.params]
    smaller = [r for r in feasible if r.params < best.params]
    parts = [f"{best.params / 1e6:.2f}M params × {best.tokens / 1e6:.1f}M tokens "
             f"({best.tokens_per_param:.1f} tokens/param, {best.epochs:.2f} epochs)"]
    if best.data_limited:
        parts.append("data-limited: more epochs or a larger model would not lower the predicted loss, "
                     "so the run stops early; more data (--data) would use the time")
    if bigger:
        b = min(bigger, key=lambda r: r.predicted_loss)
        parts.append(f"the best larger model ({b.params / 1e6:.2f}M) would see only "
                     f"{b.tokens / 1e6:.1f}M tokens (loss {b.predicted_loss:.4f})")
    if smaller:
        s = min(smaller, key=lambda r: r.predicted_loss)
        parts.append(f"the best smaller one ({s.params / 1e6:.2f}M) is capacity-limited "
                     f"(loss {s.predicted_loss:.4f})")
    return "; ".join(parts)
