"""Data-parallel training through Ray Train: `TorchTrainer` runs the same engine on every worker,
with the parallel strategy applied from outside the model (nccl on GPU, gloo on CPU):

* `train.parallel: ddp` (default) — `ray.train.torch.prepare_model` wraps the model in DDP;
* `train.parallel: fsdp` — PyTorch FSDP2 (`fully_shard` on every block, then the root) shards
  weights, gradients and optimizer state across workers, for models whose replicas do not fit.

* The global batch in tokens and the schedule do not depend on the number of workers: each
  worker's accumulation is batch / (micro-batch × seq × workers), and the loader gives every
  rank its own slice of the same global draw.
* Checkpoints go through Ray Train: the run folder is Ray's experiment folder (storage every
  node can reach); rank 0 writes `checkpoints/step-N` there and every rank reports it with
  `ray.train.report(..., checkpoint_upload_mode=NO_UPLOAD)` (already in storage, no copy);
  `CheckpointConfig(num_to_keep)` prunes. A restarted worker group (`FailureConfig`) and a
  re-launched run (`--resume`: same name and storage, so Ray restores its checkpoint list) both
  start from `ray.train.get_checkpoint()`.
* The deadline is absolute (wall-clock time since the run started), so a restart after a lost
  worker does not extend it.
* Rank 0 evaluates, checkpoints and logs to MLflow; the MLflow run is created by the driver
  (nested under autotune's parent run when there is one).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from pipeline import tracking
from pipeline.data.cache import PreparedData
from pipeline.train.config import RunConfig
from pipeline.train.engine import result_dict


def worker_fn(config: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch

    from pipeline.train.engine import Trainer
    from pipeline.train.schedule import Budget

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = RunConfig.from_dict(config["cfg"])
    folder = Path(config["data_folder"])
    data = PreparedData(folder, json.loads((folder / "meta.json").read_text()))
    run_dir = Path(config["run_dir"])
    tracker = None
    if rank == 0 and config.get("mlflow_run_id"):
        tracking.setup(config["mlflow_uri"])
        tracker = tracking.Run(config["experiment_id"], run_id=config["mlflow_run_id"])
    budget = (Budget(seconds=config["seconds"], tokens=config.get("tokens"), clock=time.time,
                     start=config["start_epoch"])
              if config.get("seconds") else Budget(tokens=config["tokens"]))
    fault_hook = _fault_hook(config.get("fail_at_step"), run_dir, rank, world)
    device = ray.train.torch.get_device()
    trainer = None

    def report(folder: Path | None) -> None:  # every rank, after every checkpoint
        from ray.train import Checkpoint
        from ray.train.v2.api.report_config import CheckpointUploadMode

        ray.train.report({"step": trainer.step, "tokens": trainer.tokens},
                         checkpoint=Checkpoint(str(folder)) if folder is not None else None,
                         checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)

    start = ray.train.get_checkpoint()  # the newest registered checkpoint, after a restart
    trainer = Trainer(cfg, data, budget, run_dir=run_dir, device=str(device), tracker=tracker,
                      resume=Path(start.path) if start is not None else False,
                      resume_elapsed=False, rank=rank, world=world, progress=False,
                      wrap=lambda m: parallelize(m, cfg, device, world), on_checkpoint=report,
                      fault_hook=fault_hook, stop_after_steps=config.get("stop_after_steps"))
    result = trainer.run()
    if rank == 0:
        (run_dir / "result.json").write_text(json.dumps(result_dict(result), default=str))
    ray.train.report({"steps": result.steps, "tokens": result.tokens})  # every rank: a barrier


def parallelize(model, cfg: RunConfig, device, world: int):
    """Apply the data-parallel strategy to `model` (from outside: the model code knows nothing)."""
    import ray.train.torch

    if cfg.train.parallel == "fsdp" and world > 1:
        from torch.distributed.fsdp import fully_shard

        model.to(device)
        for block in model.layers:  # one all-gather per block: peak memory ≈ one block unsharded
            fully_shard(block)
        fully_shard(model)          # the rest: embeddings (tied with the output head), final norm
        return model
    # DDP. Buffers are not broadcast from rank 0 on every forward: the only mutable ones (MoE
    # routing biases and expert-load counts) are kept identical by the engine's all-reduce.
    return ray.train.torch.prepare_model(model, parallel_strategy_kwargs={
        "find_unused_parameters": cfg.model.is_moe, "broadcast_buffers": False})


def _fault_hook(step: int | None, run_dir: Path, rank: int, world: int):
    """Tests: the last rank dies once at `step` (a marker file makes it happen only once)."""
    if step is None:
        return None
    marker = run_dir / f".fault-injected-{step}"

    def hook(trainer):
        if rank == world - 1 and trainer.step == step and not marker.exists():
            marker.write_text("killed")
            os._exit(1)
    return hook


def train_distributed(cfg: RunConfig, data: PreparedData, run_dir: Path, workers: int, use_gpu: bool,
                      *, seconds: float | None = None, tokens: int | None = None,
                      start_epoch: float | None = None, mlflow_uri: str | None = None,
                      parent_run_id: str | None = None, use_mlflow: bool = True, max_failures: int = 2,
                      fail_at_step: int | None = None, stop_after_steps: int | None = None,
                      log=print) -> tuple[dict, str | None]:
    """Run `cfg` data-parallel on `workers` Ray Train workers; returns (result dict, MLflow run id).
    Needs a running Ray (`ray.init` / `ray_session`)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipeline.train.engine import summarize_params

    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir / "config.yaml")
    run_id = exp = None
    if use_mlflow:
        exp = tracking.setup(mlflow_uri)
        tracker = tracking.Run(exp, name=run_dir.name, parent_id=parent_run_id,
                               tags={"pufferfish.kind": "train", "workers": workers,
                                     "data.fingerprint": data.folder.name})
        tracker.log_params({**cfg.to_dict(), **summarize_params(cfg), "workers": workers})
        run_id = tracker.id
    config = {"cfg": cfg.to_dict(), "data_folder": str(data.folder), "run_dir": str(run_dir),
              "seconds": seconds, "tokens": tokens, "start_epoch": start_epoch or time.time(),
              "mlflow_run_id": run_id, "mlflow_uri": tracking.resolve_uri(mlflow_uri), "experiment_id": exp,
              "fail_at_step": fail_at_step, "stop_after_steps": stop_after_steps}
    trainer = TorchTrainer(
        worker_fn, train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu),
        run_config=ray.train.RunConfig(
            name=run_dir.name, storage_path=str(run_dir.parent),  # Ray's experiment folder = run_dir
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=max_failures)))
    try:
        fit = trainer.fit()
    except Exception:
        if run_id:
            tracking.Run(exp, run_id=run_id).end("FAILED")
        raise
    result = json.loads((run_dir / "result.json").read_text())
    result["checkpoint"] = fit.checkpoint.path if fit.checkpoint else None  # Ray Train's newest
    if run_id:
        tracking.Run(exp, run_id=run_id).end("FINISHED")
    log(f"data-parallel run on {workers} workers: {result['steps']} steps, {result['tokens']:,} tokens")
    return result, run_id
