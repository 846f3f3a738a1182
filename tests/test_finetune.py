"""Fine-tuning: masking, LoRA merge equivalence, loss falls on chat data, lineage, bad input."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import run_cli, tiny_run_config
from model import ConfigError, ModelConfig, Transformer
from model.hf import save_native
from pipeline import chat
from pipeline.data.cache import PreparedData
from pipeline.errors import UserError

QA = [("What is the capital of France?", "Paris."), ("What colour is the sky?", "Blue."),
      ("How many legs does a cat have?", "Four."), ("What is two plus two?", "Four."),
      ("Who wrote Hamlet?", "Shakespeare."), ("What is frozen water called?", "Ice.")]


def write_chat(path, n=120, extra_lines=()):
    lines = []
    for i in range(n):
        q, a = QA[i % len(QA)]
        if i % 2:
            lines.append(json.dumps({"prompt": q, "completion": a}))
        else:
            lines.append(json.dumps({"messages": [{"role": "system", "content": "Answer briefly."},
                                                  {"role": "user", "content": q},
                                                  {"role": "assistant", "content": a}]}))
    path.write_text("\n".join(list(lines) + list(extra_lines)) + "\n")
    return path


@pytest.fixture(scope="module")
def base_dir(tiny_data, tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("base")
    model = Transformer(ModelConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64))
    save_native(model, folder / "native")
    tiny_data.tokenizer().save_pretrained(folder / "native")
    return folder


@pytest.fixture(scope="module")
def chat_data(base_dir, tmp_path_factory):
    from pipeline.data.tokenizer import load_saved

    folder = tmp_path_factory.mktemp("chat")
    tok = load_saved(base_dir / "native")
    chat.add_chat_tokens(tok)
    convs = chat.read_conversations(str(write_chat(folder / "chat.jsonl")))
    meta = chat.pack(tok, convs, folder / "data", val_fraction=0.1, seed=0)
    return PreparedData(folder / "data", meta), tok


def test_template_marks_only_assistant_tokens(chat_data):
    _, tok = chat_data
    conv = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]
    ids, mask = chat.encode_chat(tok, conv)
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    assert trained == "Hello!" + chat.END
    assert tok.decode(ids) == tok.apply_chat_template(conv, tokenize=False)  # same format as transformers


def test_masked_positions_get_exactly_zero_gradient(chat_data):
    data, _ = chat_data
    from pipeline.data.loader import BatchLoader

    loader = BatchLoader(data.tokens("train"), 48, 4, mask=data.mask("train"))
    x, y = loader.make_batch(0)
    assert (y == -100).any() and (y != -100).any()
    model = Transformer(ModelConfig(vocab_size=576, d_model=32, n_layers=1, n_heads=2, max_seq_len=64))
    logits = model(x).logits
    logits.retain_grad()
    torch.nn.functional.cross_entropy(logits.view(-1, 576), y.reshape(-1)).backward()
    grad = logits.grad.abs().sum(-1)
    assert (grad[y == -100] == 0).all() and (grad[y != -100] > 0).all()


def test_merged_model_equals_lora_model():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, lora_rank=4)
    m = Transformer(cfg).eval()
    assert all(("lora_" in n or n == "embed_tokens.weight") == p.requires_grad for n, p in m.named_parameters())
    for n, p in m.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)  # as after training
    x = torch.randint(0, 97, (2, 16))
    merged = m.merged()
    assert merged.cfg.lora_rank == 0 and not any("lora_" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        assert torch.allclose(merged(x).logits, m(x).logits, atol=1e-5)


def test_lora_finetune_lowers_assistant_loss(chat_data, base_dir, tmp_path):
    from safetensors.torch import save_file

    from model.hf import load_native
    from pipeline.finetune import resize_embeddings
    from pipeline.train.engine import Trainer
    from pipeline.train.schedule import Budget

    data, tok = chat_data
    base = load_native(base_dir / "native")
    resize_embeddings(base, 576)
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(tmp_path / "init.safetensors"))
    cfg = tiny_run_config(lr=1e-2, seq_len=64, batch_tokens=1024, micro_batch=16)
    cfg.model.vocab_size, cfg.model.lora_rank = 576, 8
    t = Trainer(cfg, data, Budget(tokens=60 * 1024), run_dir=tmp_path / "run", progress=False,
                log=lambda *_: None, model_init=tmp_path / "init.safetensors")
    before, _, _ = t.evaluate(10**6)
    frozen = {n: p.detach().clone() for n, p in t.model.named_parameters() if not p.requires_grad}
    assert len(frozen) > 10
    res = t.run()
    assert res.final_val_loss < 0.5 * before
    assert all(torch.equal(frozen[n], p) for n, p in t.model.named_parameters() if n in frozen)  # base frozen
    assert (tmp_path / "run" / "model" / "hf" / "config.json").is_file()  # merged export


@pytest.mark.slow
def test_finetune_cli_registers_lineage_and_chat_uses_template(base_dir, tmp_path):
    from mlflow import MlflowClient

    from pipeline import tracking

    data = write_chat(tmp_path / "chat.jsonl", extra_lines=["{not json", json.dumps({"messages": [
        {"role": "user", "content": "no answer here"}]})])
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    out = subprocess.run([sys.executable, "-m", "pipeline.finetune", "--model", str(base_dir), "--data", str(data),
                          "--minutes", "0.4", "--out", str(tmp_path / "ft"), "--model-name", "ft-test"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "skipped 1 malformed lines (chat.jsonl:121)" in out.stderr
    assert "skipped 1 conversations with no assistant turn" in out.stderr
    tracking.setup(None)
    mv = MlflowClient().get_model_version_by_alias("ft-test", "champion")
    assert mv.tags["base_model"] == str(base_dir) and mv.tags["finetune"].startswith("lora r=8")
    talk = subprocess.run([sys.executable, "-m", "pipeline.generate", "--model", "models:/ft-test@champion",
                           "--chat", "--temperature", "0", "--max-new-tokens", "8"],
                          input="What colour is the sky?\n/exit\n", capture_output=True, text=True, env=env,
                          timeout=120)
    assert talk.returncode == 0, talk.stderr[-2000:]
    assert "model>" in talk.stdout


def test_bad_chat_input(tmp_path, base_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n{\"x\": 1}\n" + json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    with pytest.raises(UserError, match=r"2 of 3 lines are not chat JSONL \(first: bad.jsonl:1, bad.jsonl:2\)"):
        chat.read_conversations(str(bad))
    none = tmp_path / "none.jsonl"
    none.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) for _ in range(3)))
    with pytest.raises(UserError, match="0 usable conversation"):
        chat.read_conversations(str(none), log=lambda *_: None)
    from model.lora import apply_lora

    with pytest.raises(ConfigError, match="match no module; linear modules are: .*q_proj"):
        apply_lora(Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2)), ["qkv"], 4, 8)


def test_finetune_cli_refuses_bad_rank_and_missing_model(tmp_path, base_dir, capsys):
    import re

    data = write_chat(tmp_path / "c.jsonl", n=4)
    common = ["--data", str(data), "--minutes", "1"]
    out = subprocess.run([sys.executable, "-m", "pipeline.finetune", *common, "--model", str(base_dir),
                          "--lora-rank", "0"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--lora-rank must be ≥ 1" in out.stderr, out.stderr
    for args, message in ((["--model", "models:/does-not-exist@champion"], "no registered model|no models yet"),
                          (["--model", str(base_dir), "--lora-targets", "qkv"], "match no module"),
                          (["--resume", str(tmp_path)], "not a fine-tuning run folder")):
        code, _, err = run_cli("pipeline.finetune", [*common, *args], capsys)
        assert code == 2 and re.search(message, err) and err.count("\n") == 1, err
