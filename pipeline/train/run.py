"""A full training run as one call: data, MLflow run, engine, summary. Used by
`python -m pipeline.train` and by autotune's final stage alike."""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

from pipeline import hardware, tracking
from pipeline.data.cache import PreparedData, prepare
from pipeline.errors import UserError
from pipeline.train import checkpoint as ckpt
from pipeline.train.config import RunConfig
from pipeline.train.engine import Interrupted, Trainer, TrainResult, result_dict, summarize_params
from pipeline.train.schedule import Budget


def fit_vocab(cfg: RunConfig, data: PreparedData) -> RunConfig:
    """model.vocab_size follows the tokenizer (rounded up to a multiple of 64 for fast matmuls)."""
    cfg.model.vocab_size = -(-data.vocab_size // 64) * 64
    cfg.model.validate()
    return cfg


def new_run_dir(out: str | None, prefix: str = "train") -> Path:
    run_dir = Path(out) if out else Path("runs") / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = run_dir.resolve()
    if run_dir.exists() and any(run_dir.iterdir()):
        raise UserError(f"{run_dir} already holds a run; resume it with --resume {run_dir} "
                        "or pick a new --out")
    return run_dir


def load_resume(run_dir: Path, config: RunConfig | None) -> tuple[RunConfig, dict]:
    """The stored config and the latest checkpoint's state, or a clear error."""
    run_dir = Path(run_dir).resolve()
    cfg_path = run_dir / "config.yaml"
    last = ckpt.latest(run_dir / "checkpoints")
    if not cfg_path.is_file() or last is None:
        raise UserError(f"{run_dir} is not a run folder with a checkpoint (no config.yaml or "
                        "checkpoints/step-*); pass the folder a run wrote")
    stored = RunConfig.load(cfg_path)
    if config is not None and config.fingerprint() != stored.fingerprint():
        raise UserError(f"{run_dir} belongs to a different config; resume without --config")
    return stored, ckpt.read_state(last)


def train_run(cfg: RunConfig, budget: Budget, run_dir: Path, *, resume: bool = False,
              mlflow_uri: str | None = None, parent_run_id: str | None = None,
              run_id: str | None = None, tags: dict | None = None, data: PreparedData | None = None,
              log=print, use_mlflow: bool = True, device: str | None = None,
              budget_started: float | None = None, model_init: Path | None = None,
              fit_vocab_to_data: bool = True) -> tuple[TrainResult, str | None]:
    """Train `cfg` to `budget` in `run_dir`. A timed budget counts from `budget_started`
    (monotonic; default now), so data preparation and MLflow set-up are inside the deadline."""
    started = budget_started if budget_started is not None else time.monotonic()
    run_dir.mkdir(parents=True, exist_ok=True)
    if data is None:
        data = prepare(cfg.data, log=log)
    if not resume:
        if fit_vocab_to_data:
            fit_vocab(cfg, data)
        cfg.save(run_dir / "config.yaml")
    hw = hardware.probe()
    tracker = None
    if use_mlflow:
        exp = tracking.setup(mlflow_uri)
        tracker = tracking.Run(exp, run_id=run_id, name=run_dir.name, parent_id=parent_run_id,
                               tags={"pufferfish.kind": "train", "hardware": hw.name,
                                     "torch": torch.__version__, "python": platform.python_version(),
                                     "commit": tracking.git_commit(), "data.source": data.meta["source"],
                                     "data.fingerprint": data.folder.name, **(tags or {})})
        tracker.log_params({**cfg.to_dict(), **summarize_params(cfg)})
    if budget.timed:  # the clock started before data and MLflow set-up: they are inside the deadline
        budget = Budget(seconds=budget.seconds, tokens=budget.tokens, clock=budget.clock, start=started)
    trainer = Trainer(cfg, data, budget, run_dir=run_dir, device=device, tracker=tracker,
                      resume=resume, peak_flops=hw.peak_flops, log=log,
                      model_init=None if resume else model_init)
    try:
        result = trainer.run()
    except Interrupted:
        if tracker:
            tracker.end("KILLED")
        raise
    except Exception:
        if tracker:
            tracker.end("FAILED")
        raise
    summary = {"config": cfg.to_dict(), "result": result_dict(result), "hardware": hw.to_dict(),
               "data": {"folder": str(data.folder), "source": data.meta["source"],
                        "unique_train_tokens": data.unique_train_tokens},
               "mlflow_run_id": tracker.id if tracker else None}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    if tracker:
        tracker.log_artifact(run_dir / "summary.json")
        tracker.log_artifact(run_dir / "config.yaml")
        tracker.end("FINISHED")
    return result, tracker.id if tracker else None
