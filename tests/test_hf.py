"""The Hugging Face export is exact and round-trips."""
import pytest
import torch

from model import ConfigError, ModelConfig, Transformer
from model.hf import export_hf, import_hf, load_native, save_native


def _hf_logits(folder, x):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    assert type(hf).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        return hf(x).logits


@pytest.mark.parametrize("tied,kv", [(True, 2), (False, 4), (True, 1)])
def test_hf_export_logits_equal_ours_and_round_trip(tmp_path, tied, kv):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=kv,
                      max_seq_len=32, tie_embeddings=tied, rope_theta=5e4)
    m = Transformer(cfg).eval()
    x = torch.randint(0, 128, (2, 20))
    export_hf(m, tmp_path / "hf")
    with torch.no_grad():
        ours = m(x).logits
    assert torch.allclose(_hf_logits(tmp_path / "hf", x), ours, atol=1e-4)
    back = import_hf(tmp_path / "hf").eval()
    assert back.cfg.tie_embeddings == tied and back.cfg.n_kv_heads == kv
    with torch.no_grad():
        assert torch.allclose(back(x).logits, ours, atol=1e-6)


def test_export_with_tokenizer_loads_through_autotokenizer(tmp_path, tiny_data):
    from transformers import AutoTokenizer

    tok = tiny_data.tokenizer()
    m = Transformer(ModelConfig(vocab_size=512, d_model=32, n_layers=1, n_heads=2, max_seq_len=16))
    export_hf(m, tmp_path, tokenizer=tok)
    back = AutoTokenizer.from_pretrained(tmp_path)
    assert back("hello world")["input_ids"] == tok("hello world")["input_ids"]


def test_moe_and_nope_refuse_hf_export_but_save_natively(tmp_path):
    for cfg in (ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_experts=4),
                ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, pos_encoding="nope")):
        m = Transformer(cfg).eval()
        with pytest.raises(ConfigError, match="native"):
            export_hf(m, tmp_path / "x")
        save_native(m, tmp_path / "n")
        back = load_native(tmp_path / "n").eval()
        x = torch.randint(0, 64, (1, 8))
        with torch.no_grad():
            assert torch.equal(back(x).logits, m(x).logits)


def test_corrupt_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="config.json"):
        load_native(tmp_path)
    m = Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2))
    save_native(m, tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="incomplete"):
        load_native(tmp_path)
