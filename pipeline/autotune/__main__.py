"""`python -m pipeline.autotune --hours H`: probe → data → calibrate → fit → plan → train →
register, all inside the wall-clock budget. Every stage is timed, shown and logged to MLflow;
`--resume RUN_DIR` continues an interrupted pipeline where it stopped."""
from __future__ import annotations

import time

STARTED = time.monotonic()  # the budget counts from here: imports and data preparation included

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

from rich.console import Console  # noqa: E402

from pipeline.data.__main__ import add_data_args, settings_from_args  # noqa: E402
from pipeline.errors import ArgumentParser, UserError, cli, run_script  # noqa: E402
from pipeline.train.__main__ import add_budget_args, budget_from_args  # noqa: E402

console = Console(stderr=True)
if not console.is_terminal:  # logs and CI: wide enough for the plan table
    console = Console(stderr=True, width=160)
# Below these budgets the fixed costs (Ray start, data, calibration, evaluation, registration)
# leave no useful training time.
MIN_SECONDS = {"cpu": 180, "cuda": 600}
STATE = "pipeline.json"


def log(message: str) -> None:
    console.print(message)


class Pipeline:
    """State of one autotune run, saved to `<run>/pipeline.json` after every stage."""

    def __init__(self, run_dir: Path, budget_s: float, args: dict, elapsed_before: float = 0.0,
                 state: dict | None = None):
        self.run_dir, self.budget_s, self.args = run_dir, budget_s, args
        self.elapsed_before = elapsed_before
        self.state = state or {"stages": {}, "timings": {}}
        self.deadline = STARTED + budget_s - elapsed_before
        self._stage_t = time.monotonic()

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def done(self, stage: str) -> bool:
        return stage in self.state["stages"]

    def finish(self, stage: str, payload: dict) -> None:
        now = time.monotonic()
        self.state["timings"][stage] = self.state["timings"].get(stage, 0.0) + now - self._stage_t
        self._stage_t = now
        self.state["stages"][stage] = payload
        self.save()

    @contextlib.contextmanager
    def part(self, stage: str, name: str):
        """Time a part of `stage`, shown inside that stage's time in the summary (a stage's own
        time is taken when it finishes)."""
        t = time.monotonic()
        try:
            yield
        finally:
            parts = self.state.setdefault("parts", {}).setdefault(stage, {})
            parts[name] = parts.get(name, 0.0) + time.monotonic() - t

    def save(self) -> None:
        self.state.update(budget_s=self.budget_s, args=self.args,
                          elapsed_s=self.elapsed_before + time.monotonic() - STARTED)
        tmp = self.run_dir / f".{STATE}.tmp"
        tmp.write_text(json.dumps(self.state, indent=2, default=str))
        os.replace(tmp, self.run_dir / STATE)


def parse(argv):
    p = ArgumentParser(prog="python -m pipeline.autotune", description=__doc__)
    add_budget_args(p, tokens=False)
    add_data_args(p)
    p.add_argument("--space", help="search space YAML or built-in name (default: cpu or gpu by hardware)")
    p.add_argument("--plan-only", action="store_true", help="stop after printing the plan")
    p.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE", help="override planned fields")
    p.add_argument("--yes", action="store_true", help="no confirmation prompt")
    p.add_argument("--resume", metavar="RUN_DIR")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mlflow-uri")
    p.add_argument("--address", help="Ray cluster: auto | ray://HOST:PORT | HOST:PORT")
    p.add_argument("--workers", type=int, help="data-parallel workers for the full run "
                   "(default: every GPU in the cluster; 1 on CPU)")
    p.add_argument("--model-name", help="registry name (default: from the data source)")
    p.add_argument("--out", help="run folder (default runs/autotune-<time>)")
    p.add_argument("--inject-oom", help=argparse.SUPPRESS)  # tests: JSON {knob: value} of trials to fail
    return p.parse_args(argv)


@cli
def main(argv=None):
    args = parse(argv)
    if args.resume:
        run_dir = Path(args.resume).resolve()
        try:
            state = json.loads((run_dir / STATE).read_text())
        except (OSError, ValueError):
            raise UserError(f"{run_dir} is not an autotune run folder (no readable {STATE})") from None
        saved = argparse.Namespace(**{**vars(parse([])), **state["args"]})
        saved.resume, saved.yes = args.resume, args.yes or saved.yes
        args = saved
        pipe = Pipeline(run_dir, state["budget_s"], state["args"], state.get("elapsed_s", 0.0), state)
        log(f"resuming {run_dir.name}: {pipe.left():.0f}s of the {pipe.budget_s:.0f}s budget left")
    else:
        budget = budget_from_args(args)
        if budget is None:
            raise UserError("give a budget: --hours H or --minutes M")
        from pipeline.train.run import new_run_dir

        run_dir = new_run_dir(args.out, prefix="autotune")
        run_dir.mkdir(parents=True)
        stored = {k: v for k, v in vars(args).items() if k not in ("resume",)}
        pipe = Pipeline(run_dir, budget.seconds, stored)
    try:
        return run(pipe, args)
    except KeyboardInterrupt:
        pipe.save()
        _end_parent(pipe, "KILLED")
        console.print(f"interrupted; the study, checkpoints and MLflow runs are kept. Resume with:\n"
                      f"  python -m pipeline.autotune --resume {pipe.run_dir}")
        sys.exit(130)
    except UserError:
        pipe.save()
        _end_parent(pipe, "FAILED")
        raise


def _end_parent(pipe: Pipeline, status: str) -> None:
    run_id = pipe.state.get("parent_run_id")
    if run_id:
        try:
            from mlflow import MlflowClient

            MlflowClient().set_terminated(run_id, status=status)
        except Exception:
            pass


@dataclass
class Plan:
    """What the planning stages hand to training and registration."""
    rows: list
    best: object                      # the chosen PlanRow
    reason: str
    predicted_tps: float
    reg_reserve: float                # seconds kept back for registration, plots and summary
    fit_points: list = field(default_factory=list)  # (measured, leave-one-out predicted) tokens/s
    compile_gain: float = 1.0         # the full run's compiled/eager gain the plan applied


def run(pipe: Pipeline, args) -> None:
    from pipeline import tracking

    hw, space = probe(pipe, args)
    exp = tracking.setup(args.mlflow_uri)
    parent = parent_run(pipe, args, exp, hw, space)
    data = prepare_data(pipe, args, parent)
    planned = make_plan(pipe, args, hw, space, data, exp, parent)
    if args.plan_only:
        log(f"--plan-only: stopping after the plan ({pipe.run_dir / 'plan.json'})")
        parent.end("FINISHED")
        return
    cfg, result, run_id = train_full(pipe, args, hw, space, data, parent, planned)
    register_and_report(pipe, args, hw, data, parent, planned, cfg, result, run_id)


# 1. probe -----------------------------------------------------------------------------------
def probe(pipe: Pipeline, args):
    from pipeline import hardware
    from pipeline.autotune.space import default_space_path, load_space

    hw = hardware.probe()
    minimum = MIN_SECONDS[hw.kind]
    if pipe.budget_s < minimum:
        raise UserError(f"a budget of {pipe.budget_s:.0f}s is too small for the whole pipeline on this "
                        f"hardware ({hw.name}); give at least {minimum}s (--minutes {math.ceil(minimum / 60)})")
    problems = hardware.system_checks([pipe.run_dir])
    if problems:
        raise UserError("; ".join(problems))
    space = load_space(args.space or default_space_path(hw.kind))
    log(f"[bold]hardware[/]: {hw.name}, {hw.memory_bytes / 2**30:.0f} GiB, precision auto = {hw.auto_precision}; space [bold]{space.name}[/] "
        f"({len(space)} candidates); budget {pipe.budget_s / 60:.1f} min")
    if not pipe.done("probe"):
        pipe.finish("probe", {"hardware": hw.to_dict(), "space": space.path})
    return hw, space


def parent_run(pipe: Pipeline, args, exp: str, hw, space):
    """The MLflow parent run, created once in the driver (a single writer for the SQLite store)."""
    from pipeline import tracking

    parent = tracking.Run(exp, run_id=pipe.state.get("parent_run_id"), name=pipe.run_dir.name,
                          tags={"pufferfish.kind": "autotune", "hardware": hw.name,
                                "commit": tracking.git_commit()})
    if "parent_run_id" not in pipe.state:
        pipe.state["parent_run_id"] = parent.id
        parent.log_params({"budget_s": pipe.budget_s, "space": space.name, "seed": args.seed,
                           "data": args.data or "wiki-en"})
        pipe.save()
    return parent


# 2. data ------------------------------------------------------------------------------------
def prepare_data(pipe: Pipeline, args, parent):
    from pipeline.data.cache import prepare

    data = prepare(settings_from_args(args, args.seed), log=log)
    if not pipe.done("data"):
        pipe.finish("data", {"folder": str(data.folder), "unique_train_tokens": data.unique_train_tokens})
        parent.log_params({"data.fingerprint": data.folder.name, "data.unique_train_tokens": data.unique_train_tokens})
    return data


# 3–5. calibrate, fit, plan ------------------------------------------------------------------
def calibration_share(budget_s: float) -> float:
    """The share of the budget calibration may spend: 10%, 5% from an hour. (5% on a 10-minute
    CPU budget was tried: 30 s gave 2 usable trials of 10, against 9 of 21 with 60 s; the
    3-second windows are too short for most mid-sized models to complete two steps.)"""
    return 0.05 if budget_s >= 3600 else 0.10


def make_plan(pipe: Pipeline, args, hw, space, data, exp: str, parent) -> Plan:
    from pipeline.autotune import calibrate as cal
    from pipeline.autotune.finalists import compile_gain_seconds, finalist_seconds
    from pipeline.autotune.report import plan_table, plan_text, short

    share = calibration_share(pipe.budget_s)
    calib_s = share * pipe.budget_s
    ctx = {"space": {"name": space.name, "choices": space.choices, "rules": space.rules},
           "data_folder": str(data.folder), "seed": args.seed,
           "window_s": min(20.0, max(3.0, calib_s / 20)), "max_steps": 30,
           "full_seconds": pipe.budget_s * (1 - share), "unique_tokens": data.unique_train_tokens,
           "peak_flops": hw.peak_flops,
           "inject_oom": json.loads(args.inject_oom) if args.inject_oom else None}
    n_gpus = len(hw.gpus)
    # Ray is needed for measuring; a resumed run whose plan is already made skips starting it.
    need_ray = not pipe.done("plan")
    session = cal.ray_session(args.address, hw.cpu_cores, n_gpus, log=log) if need_ray else contextlib.nullcontext()
    # On a lone CPU the plan's leaders are measured head to head at the end (`finalists`):
    # their time comes out of the calibration share.
    # So is the full run's compiled/eager gain (`_compile_gain`): one measurement's time is set
    # aside; a second, when the first moves the plan's lead, comes out of the full run's time.
    lone = head_to_head(hw, args)
    finals_s = finalist_seconds(calib_s) if lone else 0.0
    gain_s = compile_gain_seconds(calib_s) if lone and space.rules.get("compile_full_run") else 0.0
    with session:
        records = calibrate_stage(pipe, args, space, ctx, calib_s - finals_s - gain_s, exp, parent)
        planned = fit_and_choose(pipe, args, hw, space, data, records, ctx, exp, parent, finals_s, gain_s)
    # Ray is shut down here: the full run gets every core and all the memory.
    best, rows = planned.best, planned.rows
    console.print(plan_table(rows, chosen=best))
    log(f"[bold]chosen[/]: {short(best.candidate)} — {planned.reason}")
    (pipe.run_dir / "plan.txt").write_text(plan_text(rows, chosen=best) + f"\nchosen: {short(best.candidate)}\n{planned.reason}\n")
    if not pipe.done("plan"):
        parent.log_artifact(pipe.run_dir / "plan.json")
        parent.log_artifact(pipe.run_dir / "plan.txt")
        parent.log_metrics({"planned_params": best.params, "planned_tokens": best.tokens,
                            "predicted_tokens_per_s": best.tokens_per_s}, step=0)
        pipe.finish("plan", {"chosen": best.candidate, "key": best.key, "parallel": best.parallel})
    return planned


def head_to_head(hw, args) -> bool:
    """Whether the finalists are measured against each other in this process: on a CPU, where
    trial readings drift ±15-20%, and only where this process is the machine that will train
    (no cluster, one worker)."""
    return hw.kind == "cpu" and not args.address and (args.workers or 1) == 1


def calibrate_stage(pipe: Pipeline, args, space, ctx: dict, calib_s: float, exp: str, parent) -> list:
    """Run (or, on resume, reload) the calibration trials; all of them, failed ones included."""
    from pipeline.autotune import calibrate as cal

    if not pipe.done("calibrate"):
        spent = pipe.state["timings"].get("calibrate", 0.0)
        # (2 s of the share are kept for logging the trials to MLflow afterwards)
        seconds = max(5.0, calib_s - (time.monotonic() - pipe._stage_t) - spent - 2.0)
        log(f"[bold]calibrating[/] for {seconds:.0f}s (Ray Tune + Optuna TPE, "
            f"{ctx['window_s']:.0f}s trials)")
        records = cal.calibrate(space, ctx, seconds, pipe.run_dir / "optuna.db",
                                f"autotune-{pipe.run_dir.name}", args.seed, cal.seed_points(space), log)
        _log_trials(records, exp, parent.id)
        pipe.finish("calibrate", {"trials": [r.to_dict() for r in records]})
    records = [cal.TrialRecord(**r) for r in pipe.state["stages"]["calibrate"]["trials"]]
    ok = [r for r in records if r.status == "ok"]
    oom = [r for r in records if r.status == "oom"]
    log(f"{len(records)} trials: {len(ok)} ok, {len(oom)} out of memory, "
        f"{len(records) - len(ok) - len(oom)} other")
    if not ok:
        raise UserError(no_reading_error(records, ctx["window_s"]))
    return records


def registration_reserve(params: float) -> float:
    """Seconds kept back after the full run: registration (log and validate-load the pyfunc:
    1.4-1.8 s on 2 CPU cores under 1M parameters, 3.8 s for 55M on an H200; bigger models take
    longer to write and load), plots and the summary. (8 s flat: 10-minute CPU runs ended ~9 s early.)"""
    return 3.0 + 3 * 4 * params / 2e8


def no_reading_error(records: list, window_s: float) -> str:
    """Why calibration has nothing to fit, and what to change: the commonest cause named."""
    slow = sum(r.status == "too_slow" for r in records)
    if records and slow >= sum(r.status in ("oom", "error") for r in records):
        return (f"no calibration trial completed a reading ({slow} of {len(records)} too slow for "
                f"{window_s:.0f}s trials; see the MLflow trial runs): give a longer budget or a --space "
                "with smaller models")
    return ("no calibration trial succeeded (see the MLflow trial runs); the space's smallest model "
            "may not fit this machine: try a smaller --space")


def fit_and_choose(pipe: Pipeline, args, hw, space, data, records: list, ctx: dict, exp: str, parent,
                   finals_s: float = 0.0, gain_s: float = 0.0) -> Plan:
    """Stages 4 and 5: fit the models to the trials and plan; then, while the plan is being made
    (not on resume), sharpen it with measurements: the finalists head to head, the full run's
    compile gain, the choice verified if it was never measured, and the scaling of several
    workers. The plan is redone after each."""
    from pipeline.autotune.evidence import Evidence
    from pipeline.autotune.fit import Shape
    from pipeline.autotune.plan import law_params, why
    from pipeline.autotune.report import short
    from pipeline.autotune.space import candidate_key, to_run_config

    def shape(cand):
        return Shape.of(to_run_config(cand, space, data.vocab_size))

    # 4. fit: throughput and memory models, with their leave-one-out error
    amp = hw.kind == "cuda"
    cands = [(candidate_key(c), c, shape(c)) for c in space.candidates()]
    ev = Evidence.from_trials(records, cands, shape, amp, (0.9 if amp else 0.5) * hw.memory_bytes,
                              data.unique_train_tokens)
    loo_pred, med, worst = ev.leave_one_out()  # computed once: the errors and the plot share it
    loo = (f"leave-one-out error median {med:.1%}, worst {worst:.1%}" if math.isfinite(med) else
           f"no leave-one-out error from {len(ev.tokens_per_s)} reading (it needs two)")
    log(f"throughput model {dict(zip(ev.throughput.terms, [f'{c:.3g}' for c in ev.throughput.coef]))}; {loo}")
    making = not pipe.done("plan")  # on resume the plan is redone from the same evidence, nothing measured
    if making:
        parent.log_metrics({"throughput_loo_median": med, "throughput_loo_worst": worst}, step=0)

    # 5. plan: every candidate's predicted loss for the time left. The registration reserve follows
    # the choice: planned first for the smallest candidate, and redone for the chosen one (sized
    # for the space's largest, a GPU space's 2.7B parameters kept 165 s of a 10-minute budget and
    # the first H200 run ended at 73%, session 17).
    reserve = registration_reserve(min(law_params(c[2]) for c in cands))

    def replan():
        nonlocal reserve
        rows = ev.plan(pipe.left() - reserve)
        if registration_reserve(rows[0].params) > reserve:
            reserve = registration_reserve(rows[0].params)
            rows = ev.plan(pipe.left() - reserve)
        return rows

    rows = replan()
    if not rows[0].feasible:
        small = min(rows, key=lambda r: r.memory_bytes)
        raise UserError(f"nothing in space {space.name} fits in memory: the smallest candidate "
                        f"({short(small.candidate)}) needs ~{small.memory_bytes / 2**30:.1f} GiB of "
                        f"{ev.memory_limit / 2**30:.1f} GiB usable; use a smaller --space")
    compiles = making and gain_s > 0 and _full_run_compiles(rows[0], args, space, data)
    if compiles:  # the leaders are the compiled full run's: planned at a typical gain until it is measured
        from pipeline.autotune.finalists import prior_compile_gain

        ev.compile_gain = prior_compile_gain(_full_run(rows[0], args, space, data))
        rows = replan()
    if making and finals_s > 0:
        with pipe.part("plan", "finalists"):
            if _head_to_head(pipe, args, space, data, ev, rows, finals_s):
                rows = replan()
    if compiles:
        with pipe.part("plan", "compile gain"):
            rows = _compile_gain(pipe, args, space, data, ev, rows, gain_s, replan)
        parent.log_metrics({"compile_gain": ev.compile_gain}, step=0)
    elif not making:  # the plan redone on resume uses the gains measured before
        done = pipe.state.get("compile_gain", {})
        ev.compile_gain = done.get("applied", 1.0)
        ev.compile_gains = {k: g for k, g in done.get("measured", {}).items() if g}
    best = rows[0]
    if making and not best.measured:
        with pipe.part("plan", "verify"):
            best = _verify_choice(pipe, space, ev, rows, ctx, exp, parent, pipe.left() - reserve)
        if best is None:  # measured: plan again with the new reading
            rows = replan()
            best = rows[0]
    workers = args.workers or pipe.state.get("workers") or _cluster_gpus() or 1
    pipe.state["workers"] = workers
    if workers > 1 and making:
        with pipe.part("plan", "scaling"):
            _measure_scaling(pipe, args, hw, space, data, ev, best, workers)
        rows = replan()
        best = rows[0]
    planned = Plan(rows=rows, best=best, reason=why(best, rows), predicted_tps=ev.gain(best.key) * ev.throughput.tokens_per_s(
                   shape(best.candidate)), reg_reserve=max(reserve, registration_reserve(best.params)),
                   fit_points=list(zip(ev.tokens_per_s, loo_pred)), compile_gain=ev.gain(best.key))
    payload = {"chosen": best.to_dict(), "why": planned.reason, "rows": [r.to_dict() for r in rows[:50]],
               "throughput_model": ev.throughput.to_dict(), "memory_model": ev.memory.to_dict(),
               "loo_median": med, "loo_worst": worst, "predicted_tokens_per_s": planned.predicted_tps,
               "finalists": pipe.state.get("finalists", []), "compile_gain": pipe.state.get("compile_gain")}
    (pipe.run_dir / "plan.json").write_text(json.dumps(payload, indent=2, default=str))
    return planned


def _head_to_head(pipe: Pipeline, args, space, data, ev, rows: list, finals_s: float) -> bool:
    """On a lone CPU, the plan's leaders trained against each other, interleaved in this process:
    their ratios replace the model's (`Evidence.take_head_to_head`). False if there was nothing to compare."""
    from pipeline.autotune.finalists import contenders, interleaved_rates
    from pipeline.autotune.report import short
    from pipeline.autotune.space import to_run_config

    finals = contenders(rows, ev.law.E)
    if len(finals) < 2:
        return False
    seconds = max(1.0, finals_s - (time.monotonic() - pipe._stage_t))  # what the fit and plan left
    log(f"[bold]finalists[/], {seconds:.0f}s head to head: " + ", ".join(short(r.candidate) for r in finals))
    rates = interleaved_rates({r.key: to_run_config(r.candidate, space, data.vocab_size, seed=args.seed)
                               for r in finals}, data, seconds, log)
    planned = ev.take_head_to_head(finals, rates)
    for r in finals:
        log(f"  {short(r.candidate)}: {rates[r.key]:,.0f} tokens/s head to head; planned "
            f"{r.tokens_per_s:,.0f} → {planned[r.key]:,.0f}")
    pipe.state["finalists"] = [{"key": r.key, "head_to_head_tokens_per_s": rates[r.key],
                                "planned_before": r.tokens_per_s, "planned": planned[r.key]} for r in finals]
    return True


def _full_run(row, args, space, data):
    """The run config `row`'s candidate would train with as the full run (with --set applied)."""
    from pipeline.autotune.space import full_run_config
    from pipeline.train.config import apply_overrides

    return apply_overrides(full_run_config(row.candidate, space, data.vocab_size, seed=args.seed,
                                           tokens=row.tokens), args.set)


def _full_run_compiles(row, args, space, data) -> bool:
    """Whether the full run compiles where the trials did not (the space's `compile_full_run`,
    not undone by --set train.compile=false): then its speed is not the trials'."""
    return _full_run(row, args, space, data).train.compile and not row.candidate.get("compile")


def _compile_gain(pipe: Pipeline, args, space, data, ev, rows: list, seconds: float, replan) -> list:
    """Trials run eager and the full run compiles (`_full_run_compiles`), and on 2 cores
    compiling gains 1.2-2.1× by shape, precision and CPU: planned at the trials' speed, a
    15-minute autotune on an Intel Xeon trained d128-L3 at 1.58× the planned rate and hit the
    data cap at 95% of its budget (session 28). So the leader's full-run config is measured
    compiled against eager, and every candidate is planned at its trials' speed × that gain;
    if the lead moves, the new leader is measured once and its own gain applied (the chosen
    model's token count is what the gain decides), the first leader keeping its own
    (`Evidence.gain`). `rows` come planned at a typical gain
    (`prior_compile_gain`), not at none: the leader picked at the eager speed was a size too
    small, and measuring the right one next cost a second cold compile, ~35 s of a 15-minute
    budget (session 28). Rows replanned."""
    from pipeline.autotune.finalists import compile_gain
    from pipeline.autotune.report import short

    prior = ev.compile_gain  # what the leaders were planned at (`prior_compile_gain`)
    gains: dict[str, float | None] = {}
    for _ in range(2):
        best = rows[0]
        if best.key in gains:
            break
        gain = compile_gain(_full_run(best, args, space, data), data, seconds, log)
        gains[best.key] = gain
        if gain is None:
            if not any(gains.values()):  # nothing measured: no gain is assumed either
                ev.compile_gain = 1.0
                rows = replan()
            log(f"compiled/eager gain of {short(best.candidate)} not measured (a side failed); planned at "
                f"{ev.compile_gain:.2f}× the trials' speed")
            break
        ev.compile_gain = ev.compile_gains[best.key] = gain
        log(f"compiled/eager, {short(best.candidate)} as the full run trains: {gain:.2f}× "
            f"(every candidate not measured so planned at its trials' speed × {gain:.2f})")
        rows = replan()
    pipe.state["compile_gain"] = {"prior": prior, "measured": gains, "applied": ev.compile_gain}
    return rows


def _verify_choice(pipe: Pipeline, space, ev, rows: list, ctx: dict, exp: str, parent, seconds: float):
    """The launch decision rests on a measurement, not only on the model: an unmeasured favourite
    is measured once and its reading added to the evidence (None is returned: plan again; a
    reading far below the model, or a failed one, rules it out). A measured candidate at least as
    good as the favourite would be after paying for its measurement (one Tune experiment: ~10 s
    of start-up and a window) is returned instead, unmeasured favourite skipped."""
    from pipeline.autotune import calibrate as cal
    from pipeline.autotune.plan import measured_instead
    from pipeline.autotune.report import short

    best = rows[0]
    tie = measured_instead(rows, ev.plan(seconds - ctx["window_s"] - 10.0))
    if tie is not None:
        return tie
    log(f"measuring the planned choice ({short(best.candidate)}) before launching")
    # Through the same Ray trainable as the trials, never in the driver: on 2 CPU cores a driver
    # measurement ran ~35% faster than the same shapes had in Ray trials (Tune's loop and Ray's
    # daemons share the cores), which made whichever candidate was verified look best.
    extra = cal.measure([best.candidate], ctx, space, pipe.run_dir / "optuna.db", f"verify-{pipe.run_dir.name}")
    _log_trials(extra, exp, parent.id)
    pipe.state["stages"]["calibrate"]["trials"] += [r.to_dict() for r in extra]
    ev.add(extra)
    return None


def _measure_scaling(pipe: Pipeline, args, hw, space, data, ev, best, workers: int) -> None:
    """A short measured multi-worker run of the choice gives the scaling efficiency; every
    candidate's throughput is then scaled by workers × efficiency."""
    from pipeline.autotune.space import to_run_config
    from pipeline.train.distributed import train_distributed

    probe_cfg = to_run_config(best.candidate, space, data.vocab_size, seed=args.seed)
    probe_cfg.train.parallel = best.parallel
    shutil.rmtree(pipe.run_dir / "scaling", ignore_errors=True)  # a fresh measurement
    res, _ = train_distributed(probe_cfg, data, pipe.run_dir / "scaling", workers, len(hw.gpus) > 0,
                               tokens=8 * probe_cfg.train.batch_tokens, stop_after_steps=6,
                               use_mlflow=False, log=log)
    single = ev.measured().get(best.key) or best.tokens_per_s
    efficiency = min(1.0, res["tokens_per_s"] / (workers * single))
    pipe.state["scaling_efficiency"] = efficiency
    log(f"{workers} workers: scaling efficiency {efficiency:.0%}")
    ev.factor, ev.workers = workers * efficiency, workers


# 6. train -----------------------------------------------------------------------------------
def train_full(pipe: Pipeline, args, hw, space, data, parent, planned: Plan):
    """The full run to the deadline (resumed from its checkpoint after an interruption)."""
    from pipeline.autotune.plan import ScalingLaw, token_cap
    from pipeline.autotune.report import short
    from pipeline.autotune.space import full_run_config
    from pipeline.train.config import apply_overrides
    from pipeline.train.engine import Interrupted, result_dict
    from pipeline.train.run import load_resume, train_run
    from pipeline.train.schedule import Budget
    from model.config import param_counts

    chosen = pipe.state["stages"]["plan"]["chosen"]
    cfg = full_run_config(chosen, space, data.vocab_size, data=settings_from_args(args, args.seed), seed=args.seed,
                          tokens=planned.best.tokens)
    cfg.train.parallel = pipe.state["stages"]["plan"].get("parallel", "ddp")
    cfg = apply_overrides(cfg, args.set)
    full_dir = pipe.run_dir / "full"
    resume_full = (full_dir / "checkpoints").is_dir() and any((full_dir / "checkpoints").glob("step-*"))
    seconds = pipe.left() - planned.reg_reserve
    # On little data the run stops at the most tokens worth training, before the deadline if it
    # comes to that (the plan counted no more: `ScalingLaw.useful_tokens`); the cap falls with the
    # model's size, so it is the one that trains, `--set` overrides included
    law = ScalingLaw()
    n_params = param_counts(cfg.model)["active"]
    cap = token_cap(cfg.model, data.unique_train_tokens, law)
    if not resume_full and sys.stdin.isatty() and not args.yes and seconds > 1800:
        answer = input(f"launch a {seconds / 3600:.1f} h run of {short(chosen)}? [Y/n] ").strip().lower()
        if answer not in ("", "y", "yes"):
            raise UserError("not launched; rerun with --resume to continue from the plan")
    workers = pipe.state.get("workers", 1)
    limited = law.data_limited(min(planned.best.tokens, cap), data.unique_train_tokens, n_params)
    log(f"[bold]training[/] for {seconds:.0f}s in {full_dir}" + (f" on {workers} workers" if workers > 1 else "")
        + (f", or until {cap / 1e6:,.1f}M tokens ({cap / data.unique_train_tokens:.1f} epochs): the data, not the "
           "time, limits this run; more data (--data) would use the rest" if limited else ""))
    try:
        if workers > 1:
            result, run_id = _train_data_parallel(pipe, args, cfg, data, full_dir, seconds, cap, parent.id,
                                                  len(hw.gpus))
        elif resume_full:
            cfg, st = load_resume(full_dir, None)
            # The run's own budget would restart the clock at its last checkpoint, so the time
            # lost since then and this process's start-up would overrun the pipeline's deadline
            # (by ~10 s in a 4-minute test): the resumed run ends where the pipeline must.
            res, run_id = train_run(cfg, Budget(seconds=st["elapsed_s"] + seconds, tokens=cap), full_dir, resume=True,
                                    mlflow_uri=args.mlflow_uri, run_id=st.get("mlflow_run_id"),
                                    data=data, log=log)
            result = result_dict(res)
        else:
            res, run_id = train_run(cfg, Budget(seconds=seconds, tokens=cap), full_dir, mlflow_uri=args.mlflow_uri,
                                    parent_run_id=parent.id, data=data, log=log,
                                    tags={"pufferfish.autotune_run": parent.id})
            result = result_dict(res)
    except Interrupted:
        raise KeyboardInterrupt from None
    # the full run's own overheads, inside the train stage's time (the last process's, on resume)
    pipe.state.setdefault("parts", {})["train"] = {"compile": result.get("compile_s", 0.0),
                                                   "evaluation": result.get("eval_s", 0.0),
                                                   "checkpoints": result.get("checkpoint_s", 0.0)}
    pipe.finish("train", {"run_id": run_id, "val_bpb": result["final_val_bpb"],
                          "tokens_per_s": result["tokens_per_s"], "tokens": result["tokens"],
                          "compute_dtype": result.get("compute_dtype", "fp32"),
                          "stopped": result.get("stopped", ""), "token_cap": cap})
    return cfg, result, run_id


# 7. register --------------------------------------------------------------------------------
def register_and_report(pipe: Pipeline, args, hw, data, parent, planned: Plan, cfg, result: dict,
                        run_id: str) -> None:
    from model.config import param_counts
    from pipeline import tracking
    from pipeline.autotune.report import plots, short
    from pipeline.registry import default_name, register

    chosen = pipe.state["stages"]["plan"]["chosen"]
    name = args.model_name or default_name(data.meta["source"])
    reg = register(Path(result["model_dir"]), name, run_id=run_id, val_bpb=result["final_val_bpb"],
                   data_fingerprint=data.folder.name, tokenizer_hash=data.meta["tokenizer_hash"],
                   tags={"budget": f"{pipe.budget_s / 60:.1f}min", "hardware": hw.name,
                         "params": str(param_counts(cfg.model)["total"]), "autotune_run_id": parent.id,
                         "predicted_tokens_per_s": f"{planned.predicted_tps:.0f}",
                         "achieved_tokens_per_s": f"{result['tokens_per_s']:.0f}", "tokenizer": data.meta["tokenizer"]},
                   description=f"{short(chosen)}; {planned.reason}", log=log)
    pipe.finish("register", asdict(reg))
    for p in plots(pipe.run_dir, planned.fit_points, planned.rows, planned.best, result["loss_trace"]):
        parent.log_artifact(p)
    timings, parts = pipe.state["timings"], pipe.state.get("parts", {})
    total = pipe.elapsed_before + time.monotonic() - STARTED
    parent.log_metrics({"val_bpb": result["final_val_bpb"], "achieved_tokens_per_s": result["tokens_per_s"],
                        "wall_s": total, "wall_over_budget": total / pipe.budget_s,
                        **{f"time_{k}_s": v for k, v in timings.items()},
                        **{f"time_{stage}_{name.replace(' ', '_')}_s": v
                           for stage, named in parts.items() for name, v in named.items()}}, step=1)
    parent.end("FINISHED")
    uri = tracking.resolve_uri(args.mlflow_uri)
    # the space's compile_full_run: planned at the eager trials' speed × the measured compile gain
    gain = planned.compile_gain
    eager_note = ((f" (eager trials × {gain:.2f} compiled)" if gain != 1.0 else " (eager trials; the run compiled)")
                  if cfg.train.compile and not chosen["compile"] else "")
    console.print(
        f"\n[bold green]done[/] in {total:.0f}s of {pipe.budget_s:.0f}s ({total / pipe.budget_s:.1%})\n"
        f"  model      {short(chosen)} ({param_counts(cfg.model)['total'] / 1e6:.2f}M params, "
        f"{result.get('compute_dtype', 'fp32')} compute)\n"
        f"  tokens/s   predicted {planned.predicted_tps:,.0f}{eager_note}, achieved {result['tokens_per_s']:,.0f}\n"
        f"  val bpb    {result['final_val_bpb']:.4f} on {result['tokens'] / 1e6:.1f}M training tokens"
        + {"tokens": f" ({result['tokens'] / data.unique_train_tokens:.1f} epochs: data-limited, ended early)",
           "overfit": f" ({result['tokens'] / data.unique_train_tokens:.1f} epochs: validation bpb rose, so the "
                      "learning rate cooled down early and the run ended)"}.get(result.get("stopped"), "") + "\n"
        f"  time       {where_the_time_went(timings, parts)}\n"
        f"  registry   {reg.model_uri} — {reg.reason}\n"
        f"  MLflow UI  mlflow ui --backend-store-uri {uri}\n"
        f"  generate   python -m pipeline.generate --model models:/{reg.name}@champion --prompt \"The\"")


def where_the_time_went(timings: dict, parts: dict) -> str:
    """Each stage's seconds, with the named parts of a stage in brackets (the plan's
    measurements; the full run's compile, evaluation and checkpoints)."""
    def stage(k, v):
        inner = ", ".join(f"{name} {s:.0f}s" for name, s in parts.get(k, {}).items())
        return f"{k} {v:.0f}s" + (f" ({inner})" if inner else "")
    return ", ".join(stage(k, v) for k, v in timings.items())


def _cluster_gpus() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0


def _train_data_parallel(pipe, args, cfg, data, full_dir, seconds, cap, parent_id, n_gpus):
    """The full run on Ray Train workers; resuming shifts the window by the time spent stopped."""
    from pipeline.autotune.calibrate import ray_session
    from pipeline.train import checkpoint as ckpt
    from pipeline.train.distributed import train_distributed

    last = ckpt.latest(full_dir / "checkpoints")
    start = time.time()
    if last is not None:
        st = ckpt.read_state(last)
        seconds, start = st["budget_seconds"], time.time() - st["elapsed_s"]
    with ray_session(args.address, os.cpu_count() or 1, n_gpus, log=log):
        return train_distributed(cfg, data, full_dir, pipe.state["workers"], n_gpus > 0, seconds=seconds,
                                 tokens=cap, start_epoch=start, mlflow_uri=args.mlflow_uri, parent_run_id=parent_id, log=log)


def _log_trials(records, experiment_id: str, parent_id: str) -> None:
    """One nested MLflow run per trial, written by the driver (one writer for the store), with
    its params, metrics and tags in a single batch."""
    import time as _time

    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    client = MlflowClient()
    now = int(_time.time() * 1000)
    for i, r in enumerate(records):
        run = client.create_run(experiment_id, run_name=f"trial-{i:03d}",
                                tags={"mlflow.parentRunId": parent_id, "pufferfish.kind": "trial",
                                      "status": r.status, **({"error": r.error[:500]} if r.error else {})})
        metrics = {"tokens_per_s": r.tokens_per_s, "peak_memory_bytes": r.peak_memory_bytes, "mfu": r.mfu,
                   "objective": r.objective, "compile_s": r.compile_s, "steps": r.steps,
                   "status_ok": 1.0 if r.status == "ok" else 0.0}
        client.log_batch(run.info.run_id,
                         metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()
                                  if v is not None and math.isfinite(float(v))],
                         params=[Param(k, str(v)) for k, v in r.candidate.items()])
        client.set_terminated(run.info.run_id, "FINISHED" if r.status in ("ok", "oom", "too_slow", "stopped")
                              else "FAILED")


if __name__ == "__main__":
    run_script(main)
