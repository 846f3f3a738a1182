"""`python -m pipeline.train --config run.yaml --minutes M`: train one configuration to a
deadline (or `--tokens N`, or both: whichever comes first), with checkpoints, resume and MLflow
logging."""
from __future__ import annotations

import time

STARTED = time.monotonic()  # the deadline counts from here: imports and data preparation included

import argparse  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from pipeline.errors import ArgumentParser, UserError, cli, run_script
from pipeline.train.config import RunConfig, apply_overrides
from pipeline.train.engine import Interrupted
from pipeline.train.run import load_resume, new_run_dir, train_run
from pipeline.train.schedule import Budget


def positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number")
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def add_budget_args(p: argparse.ArgumentParser, tokens: bool = True) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--hours", type=positive(float))
    g.add_argument("--minutes", type=positive(float))
    if tokens:
        p.add_argument("--tokens", type=positive(int),
                       help="token budget: instead of a deadline, or with one (whichever comes first; the "
                            "schedule follows the one that binds)")


def budget_from_args(args) -> Budget | None:
    seconds = args.hours * 3600 if args.hours else args.minutes * 60 if args.minutes else None
    tokens = getattr(args, "tokens", None)
    if seconds is None and tokens is None:
        return None
    return Budget(seconds=seconds, tokens=tokens)


@cli
def main(argv=None):
    p = ArgumentParser(prog="python -m pipeline.train", description=__doc__)
    p.add_argument("--config", help="YAML with model/train/data sections (default: built-in small model)")
    add_budget_args(p)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run on its original deadline")
    p.add_argument("--out", help="run folder (default runs/train-<time>)")
    p.add_argument("--data", help="override data.data (see python -m pipeline.data --help)")
    p.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--mlflow-uri")
    p.add_argument("--no-mlflow", action="store_true")
    p.add_argument("--device")
    p.add_argument("--workers", type=int, default=1, help="data-parallel workers through Ray Train")
    p.add_argument("--address", help="Ray cluster for --workers (default: a local Ray instance)")
    args = p.parse_args(argv)
    if args.workers < 1:
        raise UserError(f"--workers must be ≥ 1, got {args.workers}")

    config = RunConfig.load(args.config) if args.config else None
    if args.resume:
        cfg, state = load_resume(args.resume, config)
        budget = Budget(seconds=state.get("budget_seconds"), tokens=state.get("budget_tokens"))
        run_dir, run_id = Path(args.resume).resolve(), state.get("mlflow_run_id")
    else:
        cfg = config or RunConfig()
        if args.data:
            args.set.append(f"data.data={args.data}")
        cfg = apply_overrides(cfg, args.set)
        budget = budget_from_args(args)
        if budget is None:
            raise UserError("give a budget: --minutes M, --hours H or --tokens N")
        run_dir, run_id = new_run_dir(args.out), None
    if args.workers > 1:
        return _data_parallel(args, cfg, budget, run_dir)
    try:
        result, _ = train_run(cfg, budget, run_dir, resume=bool(args.resume), mlflow_uri=args.mlflow_uri,
                              run_id=run_id, use_mlflow=not args.no_mlflow, device=args.device,
                              budget_started=STARTED)
    except Interrupted as exc:
        print(str(exc), file=sys.stderr)
        sys.exit(130)
    print(f"run folder: {run_dir}")
    print(f"model: {result.model_dir}")


def _data_parallel(args, cfg, budget, run_dir):
    import os

    import torch

    from pipeline.autotune.calibrate import ray_session
    from pipeline.data.cache import prepare
    from pipeline.train import checkpoint as ckpt
    from pipeline.train.distributed import train_distributed
    from pipeline.train.run import fit_vocab

    data = prepare(cfg.data)
    if not args.resume:
        fit_vocab(cfg, data)
    # the deadline is absolute wall-clock for the workers; a resume shifts it by the time stopped
    start = time.time() - (time.monotonic() - STARTED)
    last = ckpt.latest(run_dir / "checkpoints")
    if last is not None and budget.timed:
        start = time.time() - ckpt.read_state(last)["elapsed_s"]
    gpus = torch.cuda.device_count()
    with ray_session(args.address, os.cpu_count() or 1, gpus):
        result, _ = train_distributed(cfg, data, run_dir, args.workers, gpus > 0, seconds=budget.seconds,
                                      tokens=budget.tokens, start_epoch=start, mlflow_uri=args.mlflow_uri,
                                      use_mlflow=not args.no_mlflow)
    print(f"run folder: {run_dir}")
    print(f"model: {result['model_dir']}")


if __name__ == "__main__":
    run_script(main)
