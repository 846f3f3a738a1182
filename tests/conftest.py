"""Shared fixtures: an isolated data cache and MLflow store per test session, tiny data."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def isolated_home(tmp_path_factory):
    """Every test writes its caches and MLflow store under one temporary folder."""
    home = tmp_path_factory.mktemp("home")
    old = {k: os.environ.get(k) for k in ("PUFFERFISH_CACHE", "PUFFERFISH_HOME", "MLFLOW_TRACKING_URI")}
    os.environ["PUFFERFISH_CACHE"] = str(home / "cache")
    os.environ["PUFFERFISH_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield home
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def tiny_data(isolated_home):
    """~150k tokens of the embedded corpus with a 512-token BPE: fast to build and to train on."""
    from pipeline.data import DataSettings, prepare

    return prepare(DataSettings(vocab_size=512, max_tokens=150_000, val_fraction=0.05),
                   log=lambda *_: None)


def tiny_run_config(**train):
    from model.config import ModelConfig
    from pipeline.data import DataSettings
    from pipeline.train.config import RunConfig, TrainConfig

    t = dict(lr=3e-3, batch_tokens=1024, micro_batch=8, seq_len=64, eval_tokens=2048,
             final_eval_tokens=4096, eval_every_s=1e9, checkpoint_every_s=1e9)
    t.update(train)
    return RunConfig(model=ModelConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4,
                                       n_kv_heads=2, max_seq_len=t["seq_len"]),
                     train=TrainConfig(**t),
                     data=DataSettings(vocab_size=512, max_tokens=150_000, val_fraction=0.05))


def run_cli(module: str, args: list[str], capsys) -> tuple[int, str, str]:
    """A CLI's `main` in this process: (exit code, stdout, stderr). For refusals, where a fresh
    interpreter per case would cost seconds of imports each; every CLI keeps one real
    `python -m` subprocess test, so the entry point itself stays covered."""
    import importlib

    capsys.readouterr()
    try:
        code = importlib.import_module(module).main(args) or 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err
