"""Registry: register → load by alias → generate; the champion rule; pyfunc in a fresh process."""
import os
import subprocess
import sys

import pytest
import torch

from model import ModelConfig, Transformer
from model.hf import save_native
from pipeline import tracking
from pipeline.errors import UserError
from pipeline.registry import default_name, register, resolve_model_dir


@pytest.fixture(scope="module")
def model_dir(tiny_data, tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("regmodel")
    m = Transformer(ModelConfig(vocab_size=512, d_model=32, n_layers=1, n_heads=2, max_seq_len=32))
    save_native(m, folder / "native")
    tiny_data.tokenizer().save_pretrained(folder / "native")
    return folder


def _register(model_dir, name, bpb, data_fp="d1", tok="t1"):
    exp = tracking.setup(None)
    run = tracking.Run(exp, name="reg-test")
    reg = register(model_dir, name, run_id=run.id, val_bpb=bpb, data_fingerprint=data_fp,
                   tokenizer_hash=tok, log=lambda *_: None)
    run.end()
    return reg


def test_champion_moves_only_on_better_bpb_same_data(model_dir):
    from mlflow import MlflowClient

    first = _register(model_dir, "reg-champ", 2.0)
    assert first.champion
    worse = _register(model_dir, "reg-champ", 2.5)
    assert not worse.champion and "stays" in worse.reason
    better = _register(model_dir, "reg-champ", 1.5)
    assert better.champion and "moved" in better.reason
    other_data = _register(model_dir, "reg-champ", 0.5, data_fp="d2")
    assert not other_data.champion and "not comparable" in other_data.reason
    client = MlflowClient()
    assert str(client.get_model_version_by_alias("reg-champ", "champion").version) == better.version
    assert resolve_model_dir("models:/reg-champ/latest").is_dir()


def test_load_by_alias_and_generate_deterministically(model_dir):
    import mlflow

    _register(model_dir, "reg-gen", 1.0)
    m = mlflow.pyfunc.load_model("models:/reg-gen@champion")
    params = {"max_new_tokens": 8, "temperature": 1.0, "seed": 4}
    a = m.predict(["The city of"], params=params)
    assert a == m.predict(["The city of"], params=params)
    assert len(a) == 1 and isinstance(a[0], str) and a[0]


def test_pyfunc_predict_from_a_fresh_process(model_dir):
    _register(model_dir, "reg-fresh", 1.0)
    code = ("import mlflow, sys; mlflow.set_tracking_uri(sys.argv[1]); "
            "print(mlflow.pyfunc.load_model('models:/reg-fresh@champion').predict(['Once upon a time']))")
    out = subprocess.run([sys.executable, "-c", code, tracking.resolve_uri()], capture_output=True,
                         text=True, timeout=180, env={**os.environ, "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().startswith("['")


def test_unknown_name_alias_and_empty_registry(model_dir, tmp_path, monkeypatch):
    _register(model_dir, "reg-known", 1.0)
    with pytest.raises(UserError, match="registered: .*reg-known"):
        resolve_model_dir("models:/nope@champion")
    with pytest.raises(UserError, match="no alias 'best'; aliases: champion"):
        resolve_model_dir("models:/reg-known@best")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'empty.db'}")
    tracking.setup(None)
    try:
        with pytest.raises(UserError, match="no models yet"):
            resolve_model_dir("models:/anything@champion")
    finally:
        monkeypatch.delenv("MLFLOW_TRACKING_URI")
        tracking.setup(None)


def test_models_command_lists_versions(model_dir):
    _register(model_dir, "reg-list", 1.25)
    out = subprocess.run([sys.executable, "-m", "pipeline.models"], capture_output=True, text=True,
                         env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0 and "reg-list" in out.stdout and "1.250000" in out.stdout


def test_default_name_from_source():
    assert default_name("embedded:wiki-en") == "pufferfish-wiki-en"
    assert default_name("local:/data/my corpus.jsonl") == "pufferfish-my-corpus"
    assert default_name("hub:roneneldan/TinyStories") == "pufferfish-tinystories"
