"""Atomic checkpoints: `<run>/checkpoints/step-00000042/`.

    model.safetensors   weights and buffers (MoE balancing biases included)
    optimizer.pt        optimizer state keyed by parameter name (tensors only, weights_only=True)
    rng.pt              torch CPU/CUDA RNG states
    trainer.json        step, tokens, elapsed seconds, loader position, LR scale, MLflow run id,
                        config fingerprint

Each is written into a hidden temporary folder, fsynced, then renamed: a folder named
`step-*` is always complete, so a kill -9 at any moment leaves the previous one loadable.

State dicts are *full* (unsharded) and keyed by parameter name — gathered and scattered through
`torch.distributed.checkpoint.state_dict` when the model is sharded — so one format serves a
single process, DDP and FSDP: a run may resume with another world size or parallel strategy.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

STEP_DIR = re.compile(r"^step-(\d{8})$")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _param_names(model: torch.nn.Module, optimizer) -> list[str]:
    """Fully qualified names of the optimizer's parameters, in its own (index) order."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_state(model: torch.nn.Module, optimizer=None) -> tuple[dict, dict | None]:
    """Full model and optimizer state dicts on CPU, the optimizer's keyed by parameter name.
    With FSDP this is a collective (every rank must call it) and only rank 0 receives the
    tensors. `torch.distributed.checkpoint` is used only for sharded state with something in
    it: on an optimizer that has not stepped yet it would take a zero-learning-rate step to
    create the state, which shifts Adam's bias correction (and would make ranks disagree)."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = {k: v.detach().contiguous() for k, v in get_model_state_dict(model, options=opts).items()}
    if optimizer is None:
        return weights, None
    if optimizer.state and is_sharded(model):
        return weights, get_optimizer_state_dict(model, optimizer, options=opts)
    names, plain = _param_names(model, optimizer), optimizer.state_dict()
    return weights, {"state": {names[i]: v for i, v in plain["state"].items()},
                     "param_groups": [{**g, "params": [names[i] for i in g["params"]]}
                                      for g in plain["param_groups"]]}


def _load_optimizer(model: torch.nn.Module, optimizer, optim: dict) -> None:
    if not optim["state"]:      # saved before the first step: a fresh optimizer
        optimizer.state.clear()
    elif is_sharded(model):
        set_optimizer_state_dict(model, optimizer, optim, options=StateDictOptions(full_state_dict=True))
    else:
        index = {name: i for i, name in enumerate(_param_names(model, optimizer))}
        optimizer.load_state_dict({
            "state": {index[name]: v for name, v in optim["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in optim["param_groups"]]})


def save(root: Path, step: int, weights: dict, optim_state: dict, state: dict, keep: int | None) -> Path:
    """Write one checkpoint; keep the newest `keep` (None: leave pruning to the caller, e.g. Ray
    Train's CheckpointConfig, which must know about every folder it registered)."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".step-{step:08d}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    torch.save(optim_state, tmp / "optimizer.pt")
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, tmp / "rng.pt")
    (tmp / "trainer.json").write_text(json.dumps(state, indent=2))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():  # same step written twice (e.g. SIGTERM right after a periodic save)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    for old in (list_checkpoints(root)[:-keep] if keep else []):
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)
             and (p / "trainer.json").is_file()]
    return sorted(found)


def latest(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def read_state(folder: Path) -> dict:
    return json.loads((folder / "trainer.json").read_text())


def load(folder: Path, model: torch.nn.Module, optimizer=None) -> dict:
    """Restore weights (and optimizer state) into `model`, sharded or not; every rank calls it."""
    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, load_file(str(folder / "model.safetensors"), device="cpu"), options=opts)
    if optimizer is not None:
        _load_optimizer(model, optimizer, torch.load(folder / "optimizer.pt", map_location="cpu",
                                                     weights_only=True))
    rng = torch.load(folder / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return read_state(folder)
