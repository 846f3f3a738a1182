"""Calibration: short trials of candidate configurations, run by Ray Tune with an Optuna sampler.

Each trial runs the real training engine (`Trainer(trial=True)`) for a short window and reports
steady-state tokens/s, peak memory, MFU and a loss trace. Out-of-memory is a result
(status "oom", objective inf), never a crashed study. The objective Optuna minimises is the loss
the planner would predict if this configuration were chosen for the rest of the budget, so the
sampler concentrates where the optimum is.

Trials that share a device never run concurrently: one trial per GPU, or one trial at a time
using every core of a CPU node, because concurrent trials would distort each other's speed.

A trial cannot stop in the middle of an optimizer step, so a candidate whose single step takes
longer than the window would spend the calibration budget on one number. Every measured trial
appends its result and effective FLOP rate to a log beside the study; a later candidate whose
step would take more than two thirds of a window, both at the best rate seen so far and as the
throughput model fitted to the readings so far predicts it, is not run ("too_slow", with the
faster estimate as its objective): within twice the window it could not complete the three steps
that follow the first (timed apart, as compile) and complete a reading. Seeds start with the
smallest candidate, so the rate is known early, and climb a ladder of widths (`seed_points`),
on which the fit, not the narrow models' rate, says how fast the next rung will run. The same
log makes repeats free: TPE over categorical knobs often suggests a configuration again, and a
repeat gets the stored measurement (Optuna still sees its objective). Both answers are given in
the driver, without a Tune trial (`DeadlineOptunaSearch`).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from pipeline.errors import UserError

OBJECTIVE = "objective"


@dataclass
class TrialRecord:
    key: str
    candidate: dict
    status: str                       # ok | oom | error | too_slow
    tokens_per_s: float = 0.0
    peak_memory_bytes: float = 0.0
    mfu: float | None = None
    objective: float = math.inf
    compile_s: float = 0.0
    steps: int = 0
    wall_s: float = 0.0
    loss_first: float | None = None
    loss_last: float | None = None
    error: str | None = None
    loss_trace: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


# --- the Ray side -----------------------------------------------------------------------------

def _inject_oom(cand: dict, rule: dict | None) -> bool:
    return bool(rule) and all(cand.get(k) == v for k, v in rule.items())


def _earlier(path: str | None) -> list[dict]:
    """This study's earlier measurements: {"key", "flops_per_s", "metrics"} per line."""
    try:
        return [json.loads(line) for line in Path(path).read_text().splitlines() if line]
    except (OSError, TypeError, ValueError):
        return []


def _best_rate(earlier: list[dict]) -> float | None:
    """The highest FLOP/s measured by earlier trials of this study (None: none yet)."""
    rates = [e["flops_per_s"] for e in earlier if e.get("flops_per_s")]
    return max(rates) if rates else None


def _record(path: str | None, cand: dict, flops_per_s: float | None, metrics: dict) -> None:
    from pipeline.autotune.space import candidate_key

    if path:
        with contextlib.suppress(OSError), open(path, "a") as fh:
            fh.write(json.dumps({"key": candidate_key(cand), "candidate": cand, "flops_per_s": flops_per_s,
                                 "metrics": metrics}) + "\n")


def _fitted_tokens_per_s(shape, flops: float, earlier: list[dict], ctx: dict, vocab_size: int) -> float | None:
    """A candidate's tokens/s (`shape`, `flops` per token) as the throughput model fitted to this
    study's readings so far predicts it, never above the device's peak FLOP rate where one is
    known (None before two readings). On a ladder of widths this is the better guess for the
    next, wider rung: wide matrix products run at a higher FLOP rate than the narrow ones measured."""
    from pipeline.autotune.fit import Shape, ThroughputModel

    readings = [e for e in earlier if e.get("flops_per_s") and e.get("candidate")]
    if len(readings) < 2:
        return None
    shapes = [Shape.of(_run_config(e["candidate"], ctx, vocab_size)) for e in readings]
    fitted = ThroughputModel.fit(shapes, [e["metrics"]["tokens_per_s"] for e in readings]).tokens_per_s(shape)
    # (On a GPU, 3-s eager trials of small models read launch overhead more than FLOPs, and a fit
    # of two of them can promise a wide model any speed; the peak bounds it.)
    peak = ctx.get("peak_flops")
    return min(fitted, peak / flops) if peak else fitted


# A reading is the median of the steady steps: two warm-up steps are dropped (allocation, compile)
# and at least two must follow. A trial aims for three (TARGET_STEPS) and may run past its window,
# up to twice it, to get them; one steady step read ±40% on 2 CPU cores (session 9).
READING_STEPS = 4
TARGET_STEPS = 5


def _data_meta(ctx: dict) -> dict:
    return json.loads((Path(ctx["data_folder"]) / "meta.json").read_text())


def _run_config(cand: dict, ctx: dict, vocab_size: int | None = None):
    from pipeline.autotune.space import SearchSpace, to_run_config

    vocab_size = vocab_size or _data_meta(ctx)["vocab_size"]
    return to_run_config(cand, SearchSpace(**ctx["space"]), vocab_size, seed=ctx.get("seed", 0))


def _objective(cfg, tokens_per_s: float, ctx: dict) -> float:
    """The loss the planner would predict for this configuration over the rest of the budget."""
    from pipeline.autotune.fit import Shape
    from pipeline.autotune.plan import ScalingLaw, law_params

    law = ScalingLaw(**ctx.get("law", {}))
    return law.loss(law_params(Shape.of(cfg)), tokens_per_s * ctx["full_seconds"], ctx["unique_tokens"])


def answer_without_running(cand: dict, ctx: dict, earlier: list[dict] | None = None) -> dict | None:
    """A trial's metrics when it need not run, else None: a repeat of a measured candidate gets
    its stored metrics (`repeat` set); a candidate whose step would take more than two thirds of
    a window, both at the best FLOP rate seen so far and as the throughput model fitted to the
    readings so far predicts it, gets `too_slow`, with the faster estimate as its objective —
    within twice the window it could not complete the steps a reading needs."""
    from model.config import flops_per_token
    from pipeline.autotune.fit import Shape
    from pipeline.autotune.space import candidate_key

    earlier = _earlier(ctx.get("trials_log")) if earlier is None else earlier
    key = candidate_key(cand)
    repeat = next((e["metrics"] for e in earlier if e.get("key") == key), None)
    if repeat is not None:
        return {**repeat, "repeat": 1.0}
    rate = _best_rate(earlier)
    if rate is None or _inject_oom(cand, ctx.get("inject_oom")):
        return None
    vocab_size = _data_meta(ctx)["vocab_size"]
    cfg = _run_config(cand, ctx, vocab_size)
    shape, flops = Shape.of(cfg), flops_per_token(cfg.model, cfg.train.seq_len)
    tokens_per_s = max(rate / flops, _fitted_tokens_per_s(shape, flops, earlier, ctx, vocab_size) or 0.0)
    step_s = shape.batch_tokens / tokens_per_s
    # (Two windows until session 9: on 2 cores at a 10-minute budget, five of eighteen trials then
    # ran one 2-4 s step each, 15 of the 53 s of calibration, for no reading.) The first step is
    # timed apart from the window (the engine restarts a trial's clock after it), so the steps
    # that must fit in twice the window are the reading's others. Counting all four until session
    # 22 screened out d192-L3 at a 10-minute budget on 2 Zen 3 cores, and so did the best rate
    # alone: d128-L2's FLOP rate put its step at 2.0-2.4 s, where the fit of d64-L2 and d128-L2
    # put it at 1.7 s (wider matrix products run faster; it read 1.4 s at 15 minutes).
    if (READING_STEPS - 1) * step_s <= 2 * ctx["window_s"]:
        return None
    return {"status": "too_slow", "tokens_per_s": tokens_per_s, "peak_memory_bytes": 0.0, "mfu": None,
            OBJECTIVE: _objective(cfg, tokens_per_s, ctx), "compile_s": 0.0, "steps": 0,
            "loss_first": None, "loss_last": None, "loss_trace": [],
            "error": f"not run: one step would take ≥ {step_s:.1f}s"}


def run_candidate(cand: dict, ctx: dict) -> dict:
    """Run one calibration trial in this process and return its metrics (no Ray needed)."""
    import torch

    from model.config import flops_per_token
    from pipeline.data.cache import PreparedData
    from pipeline.train.engine import Trainer
    from pipeline.train.schedule import Budget

    started = time.monotonic()
    answer = answer_without_running(cand, ctx)
    if answer is not None:
        return {**answer, "wall_s": time.monotonic() - started}
    data = PreparedData(Path(ctx["data_folder"]), _data_meta(ctx))
    cfg = _run_config(cand, ctx, data.vocab_size)
    out = {"status": "ok", "tokens_per_s": 0.0, "peak_memory_bytes": 0.0, "mfu": None,
           OBJECTIVE: math.inf, "compile_s": 0.0, "steps": 0, "loss_first": None, "loss_last": None,
           "error": None, "loss_trace": []}
    flops = flops_per_token(cfg.model, cfg.train.seq_len)
    try:
        if _inject_oom(cand, ctx.get("inject_oom")):
            raise torch.OutOfMemoryError("injected out-of-memory (test)")
        trainer = Trainer(cfg, data, Budget(seconds=ctx["window_s"]), trial=True, progress=False,
                          stop_after_steps=ctx.get("max_steps"), peak_flops=ctx.get("peak_flops"),
                          log=lambda *_: None, min_steps=TARGET_STEPS)
        res = trainer.run()
        out.update(tokens_per_s=res.tokens_per_s, peak_memory_bytes=res.peak_memory_bytes,
                   mfu=res.mfu, compile_s=res.compile_s, steps=res.steps,
                   loss_trace=[list(p) for p in res.loss_trace[-50:]])
        if res.loss_trace:
            out.update(loss_first=res.loss_trace[0][1], loss_last=res.loss_trace[-1][1])
        if res.steps < min(READING_STEPS, ctx.get("max_steps") or READING_STEPS):
            out["status"] = "too_slow"      # too few steady steps in twice the window: no reading
        elif res.stopped == "diverged":
            out["status"] = "diverged"
    except (torch.OutOfMemoryError, MemoryError) as exc:
        out.update(status="oom", error=str(exc)[:200])
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if out["status"] in ("ok", "too_slow") and out["tokens_per_s"] > 0:
        out[OBJECTIVE] = _objective(cfg, out["tokens_per_s"], ctx)
    if out["steps"] > 0 or out["status"] == "oom":  # a measurement (not a skip): kept for repeats
        # Only a reading sets the rate (and the fit) later candidates are screened at: a trial
        # with too few steps reads its warm-up, and at 5% of the real rate it once ruled out
        # every other candidate of a GPU study as too slow (session 17).
        _record(ctx.get("trials_log"), cand,
                out["tokens_per_s"] * flops if out["status"] == "ok" and out["tokens_per_s"] > 0 else None, out)
    out["wall_s"] = time.monotonic() - started
    return out


def trial_fn(config: dict) -> None:
    """Ray Tune function trainable (importable by workers: it lives in the installed package)."""
    from ray import tune

    ctx = config["ctx"]
    cand = {k: config[k] for k in ctx["space"]["choices"]}
    metrics = run_candidate(cand, ctx)
    metrics["status_ok"] = 1.0 if metrics["status"] == "ok" else 0.0
    # Optuna accepts ±inf but never NaN (a NaN leaves the Optuna trial RUNNING forever).
    if metrics[OBJECTIVE] is None or math.isnan(metrics[OBJECTIVE]):
        metrics[OBJECTIVE] = math.inf
    metrics["loss_trace"] = json.dumps(metrics["loss_trace"])
    tune.report(metrics)


# --- the driver side --------------------------------------------------------------------------

@contextlib.contextmanager
def ray_session(address: str | None, num_cpus: int, num_gpus: int, log=print):
    """Connect to a cluster (`--address`) or start a small local instance; always shut down."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")       # with verbose=0: no progress tables
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")  # Ctrl-C reaches autotune, which saves state
    try:
        if address:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
                     object_store_memory=300 * 1024 ** 2, log_to_driver=False)
    except Exception as exc:
        raise UserError(f"Ray failed to start ({str(exc).splitlines()[0][:160]}); "
                        f"check --address{' ' + address if address else ''} and free memory") from exc
    try:
        yield ray
    finally:
        ray.shutdown()


def trial_resources(ray) -> tuple[dict, int]:
    """(resources per trial, concurrent trials): one GPU each, or a whole CPU node each."""
    total = ray.cluster_resources()
    gpus = int(total.get("GPU", 0))
    if gpus:
        cpus = max(1, int(total.get("CPU", 1)) // gpus)
        return {"cpu": cpus, "gpu": 1}, gpus
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    per_node = min(int(n["Resources"].get("CPU", 1)) for n in nodes) if nodes else 1
    return {"cpu": per_node}, max(1, len(nodes))


# Widths measured first, at most: the space's widths spread from the narrowest to the widest.
LADDER = 6


def seed_points(space) -> list[dict]:
    """The first candidates to measure: a ladder of widths, then the centre and the far corner.

    The ladder is the shallowest allowed candidate at each width, narrowest first (the other knobs
    at their first choice), so the first trial tells later ones the machine's rate and each rung
    raises it. The ladder stops by itself where a rung is too slow to read in a window
    (`answer_without_running` answers those, and the wider ones, in the driver). It is there for
    the throughput fit: narrow matrix products run at a lower FLOP rate, and a fit on widths 64
    and 128 alone put widths 192-256 15-24% too slow on 2 Zen 3 cores, while the same fit with
    d192-L3 among its three trials erred 3% (benchmarks/notes/predictor.md, session 21). Left to
    TPE, a 45-s calibration there measured widths 64 and 128 only."""
    from pipeline.autotune.space import width

    lo = {k: v[0] for k, v in space.choices.items()}
    hi = {k: v[-1] for k, v in space.choices.items()}
    mid = {k: v[len(v) // 2] for k, v in space.choices.items()}
    allowed = space.candidates()  # a corner the shape rules exclude: the allowed one in its place
    shape_knobs = ("n_heads", "head_dim", "n_layers")
    base = [c for c in allowed if all(c[k] == lo[k] for k in lo if k not in shape_knobs)] or allowed
    shallowest: dict[int, dict] = {}
    for c in base:
        w = width(c)
        if w not in shallowest or c["n_layers"] < shallowest[w]["n_layers"]:
            shallowest[w] = c
    widths = sorted(shallowest)
    if len(widths) > LADDER:
        widths = [widths[round(i * (len(widths) - 1) / (LADDER - 1))] for i in range(LADDER)]
    points = [shallowest[w] for w in widths]
    for p, stand_in in ((lo, allowed[0]), (mid, allowed[len(allowed) // 2]), (hi, allowed[-1])):
        p = p if space.allows(p) else stand_in
        if p not in points:
            points.append(p)
    return points


class DefineByRun:
    """Optuna define-by-run space: one categorical per knob; constants ride along as `ctx`.
    A class, not a closure, because Tune pickles the searcher for its experiment checkpoints."""

    def __init__(self, choices: dict, ctx: dict):
        self.choices, self.ctx = choices, ctx

    def __call__(self, trial):
        for knob, values in self.choices.items():
            trial.suggest_categorical(knob, values)
        return {"ctx": self.ctx}


class DeadlineOptunaSearch(OptunaSearch):
    """OptunaSearch that stops *suggesting* at the calibration deadline: trials already running
    finish their (short, bounded) window instead of being killed, so even a small calibration
    budget yields complete measurements.

    It also answers, in the driver, the suggestions that need no trial (`answer_without_running`:
    TPE's repeats of a measured candidate, candidates too slow to read): Optuna is told their
    objective at once and asked again. Sent through Tune, each cost a trial's round trip
    (~0.2 s on 2 CPU cores): a 10-minute calibration spent 28 of its 58 s on ~70 repeats and
    ~50 skips (session 9). A suggestion the space's shape rules exclude (`SearchSpace.allows`:
    Optuna samples each knob on its own) is told an infinite objective, so TPE learns to avoid
    it. When `EXHAUSTED` suggestions in a row need no trial, nothing in the space is left worth
    measuring and calibration ends, leaving its time to the full run."""

    deadline = float("inf")
    EXHAUSTED = 50

    def __init__(self, *args, ctx: dict | None = None, **kwargs):
        from pipeline.autotune.space import SearchSpace

        super().__init__(*args, **kwargs)
        self.ctx, self.skipped, self.exhausted = ctx, {}, False
        self.space = SearchSpace(**ctx["space"]) if ctx else None

    def suggest(self, trial_id):
        from pipeline.autotune.space import candidate_key

        for _ in range(self.EXHAUSTED):
            if time.time() >= self.deadline:
                return Searcher.FINISHED
            config = super().suggest(trial_id)
            if not isinstance(config, dict) or self.ctx is None:
                return config
            cand = {k: config[k] for k in self.ctx["space"]["choices"]}
            if not self.space.allows(cand):
                self._ot_study.tell(self._ot_trials.pop(trial_id), math.inf)
                continue
            answer = answer_without_running(cand, self.ctx)
            if answer is None:
                return config
            self._ot_study.tell(self._ot_trials.pop(trial_id), answer[OBJECTIVE])
            if not answer.get("repeat"):
                self.skipped.setdefault(candidate_key(cand), (cand, answer))
        self.exhausted = True
        return Searcher.FINISHED


def calibrate(space, ctx: dict, seconds: float, storage: Path, study_name: str, seed: int,
              points: list[dict] | None = None, log=print) -> list[TrialRecord]:
    """Run the Optuna-driven Tune study for `seconds` (wall clock) and return every trial."""
    import optuna
    import ray
    from ray import tune

    choices = space.choices
    storage.parent.mkdir(parents=True, exist_ok=True)
    ctx = {**ctx, "trials_log": str(storage.parent.resolve() / f"{study_name}.trials.jsonl")}
    define = DefineByRun(choices, ctx)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    searcher = DeadlineOptunaSearch(define, metric=OBJECTIVE, mode="min",
                                    sampler=optuna.samplers.TPESampler(seed=seed),
                                    storage=optuna.storages.RDBStorage(f"sqlite:///{storage.resolve()}"),
                                    study_name=study_name, points_to_evaluate=points or None, ctx=ctx)
    # The last trial suggested runs one window past the deadline (up to two, if it needs them for
    # a reading): stop suggesting that much earlier, so calibration keeps to its share of the budget.
    searcher.deadline = time.time() + max(1.0, seconds - 1.5 * ctx["window_s"])
    resources, concurrent = trial_resources(ray)
    tuner = tune.Tuner(
        tune.with_resources(trial_fn, resources),
        # time_budget_s is only a backstop: the searcher stops suggesting at the deadline.
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=10_000,
                                    max_concurrent_trials=concurrent,
                                    time_budget_s=seconds + 2 * ctx["window_s"] + 60, reuse_actors=True),
        run_config=tune.RunConfig(name=study_name, storage_path=str(storage.parent.resolve() / "ray"),
                                  verbose=0, failure_config=tune.FailureConfig(max_failures=0)))
    grid = tuner.fit()
    if searcher.exhausted:
        log(f"calibration ended early: the last {searcher.EXHAUSTED} suggestions were all measured "
            f"or too slow to read")
    measured = _records(grid, choices)
    return measured + skip_records(searcher.skipped, measured)


def skip_records(skipped: dict, measured: list[TrialRecord]) -> list[TrialRecord]:
    """Records of the suggestions answered `too_slow` in the driver ({key: (candidate, answer)}),
    less those that ran after all: a model skipped early, at the FLOP rate of the small models
    measured by then, may run once a wider one has raised that rate. (In a 10-minute run on 2 Zen 3
    cores d128-L3 and d128-L4 were both measured and also listed as too slow to measure.)"""
    fields = TrialRecord.__dataclass_fields__
    ran = {r.key for r in measured}
    return [TrialRecord(key=key, candidate=cand, **{k: v for k, v in answer.items() if k in fields})
            for key, (cand, answer) in skipped.items() if key not in ran]


def measure(cands: list[dict], ctx: dict, space, storage: Path, name: str) -> list[TrialRecord]:
    """Measure specific candidates (e.g. the planner's choice) through the same Ray trainable."""
    import ray
    from ray import tune

    resources, _ = trial_resources(ray)
    records = []
    for i, cand in enumerate(cands):
        tuner = tune.Tuner(tune.with_resources(trial_fn, resources), param_space={"ctx": ctx, **cand},
                           tune_config=tune.TuneConfig(num_samples=1),
                           run_config=tune.RunConfig(name=f"{name}-{i}", verbose=0,
                                                     storage_path=str(storage.parent.resolve() / "ray")))
        records += _records(tuner.fit(), space.choices)
    return records


def _records(grid, choices: dict) -> list[TrialRecord]:
    from pipeline.autotune.space import candidate_key

    out = []
    for result in grid:
        cfg = result.config or {}
        cand = {k: cfg.get(k) for k in choices}
        if any(v is None for v in cand.values()):
            continue  # never started (time budget ran out first)
        m = result.metrics or {}
        if result.error is not None:
            out.append(TrialRecord(key=candidate_key(cand), candidate=cand, status="error",
                                   error=str(result.error).splitlines()[-1][:300]))
            continue
        if "status" not in m:  # stopped by the calibration deadline before it reported
            out.append(TrialRecord(key=candidate_key(cand), candidate=cand, status="stopped"))
            continue
        if m.get("repeat"):  # Optuna's repeat of a measured candidate: one record is enough
            continue
        trace = json.loads(m.get("loss_trace") or "[]")
        out.append(TrialRecord(key=candidate_key(cand), candidate=cand, status=m["status"],
                               tokens_per_s=m["tokens_per_s"], peak_memory_bytes=m["peak_memory_bytes"],
                               mfu=m.get("mfu"), objective=m[OBJECTIVE], compile_s=m["compile_s"],
                               steps=m["steps"], wall_s=m.get("wall_s", 0.0), loss_first=m.get("loss_first"),
                               loss_last=m.get("loss_last"), error=m.get("error"), loss_trace=trace))
    return out
