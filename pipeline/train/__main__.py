"""`python -m pipeline.train --config run.yaml --minutes M`: train one configuration to a
deadline (or `--tokens N`), with checkpoints, resume and MLflow logging."""
from __future__ import annotations

import time

STARTED = time.monotonic()  # the deadline counts from here: imports and data preparation included

import argparse  # noqa: E402
import sys  # noqa: E402

from pipeline.errors import UserError, cli
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
        g.add_argument("--tokens", type=positive(int), help="token budget instead of a deadline")


def budget_from_args(args) -> Budget | None:
    if args.hours:
        return Budget(seconds=args.hours * 3600)
    if args.minutes:
        return Budget(seconds=args.minutes * 60)
    if getattr(args, "tokens", None):
        return Budget(tokens=args.tokens)
    return None


@cli
def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m pipeline.train", description=__doc__)
    p.add_argument("--config", help="YAML with model/train/data sections (default: built-in small model)")
    add_budget_args(p)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run on its original deadline")
    p.add_argument("--out", help="run folder (default runs/train-<time>)")
    p.add_argument("--data", help="override data.data (see python -m pipeline.data --help)")
    p.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--mlflow-uri")
    p.add_argument("--no-mlflow", action="store_true")
    p.add_argument("--device")
    args = p.parse_args(argv)

    config = RunConfig.load(args.config) if args.config else None
    if args.resume:
        cfg, state = load_resume(args.resume, config)
        budget = (Budget(seconds=state["budget_seconds"]) if state.get("budget_seconds")
                  else Budget(tokens=state["budget_tokens"]))
        run_dir, run_id = __import__("pathlib").Path(args.resume).resolve(), state.get("mlflow_run_id")
    else:
        cfg = config or RunConfig()
        if args.data:
            args.set.append(f"data.data={args.data}")
        cfg = apply_overrides(cfg, args.set)
        budget = budget_from_args(args)
        if budget is None:
            raise UserError("give a budget: --minutes M, --hours H or --tokens N")
        run_dir, run_id = new_run_dir(args.out), None
    try:
        result, _ = train_run(cfg, budget, run_dir, resume=bool(args.resume), mlflow_uri=args.mlflow_uri,
                              run_id=run_id, use_mlflow=not args.no_mlflow, device=args.device,
                              budget_started=STARTED)
    except Interrupted as exc:
        print(str(exc), file=sys.stderr)
        sys.exit(130)
    print(f"run folder: {run_dir}")
    print(f"model: {result.model_dir}")


if __name__ == "__main__":
    main()
