"""Save/load in two formats.

* The project's own format (`save_native` / `load_native`): `config.json` holding our
  `ModelConfig` under the key "pufferfish", plus `model.safetensors` with our parameter names.
  Every model can be saved this way, including MoE and NoPE models.
* Hugging Face Llama (`export_hf` / `import_hf`): a folder that
  `transformers.AutoModelForCausalLM.from_pretrained` loads as `LlamaForCausalLM`. Only dense
  RoPE models have an exact Llama equivalent; MoE routing with a loss-free bias and NoPE have no
  HF architecture that computes the same function, so they stay in the native format.

Our parameter names are HF's minus the `model.` prefix, so the conversion is a rename.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from model.config import ConfigError, ModelConfig
from model.llama import Transformer

WEIGHTS = "model.safetensors"
NATIVE_KEY = "pufferfish"


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def save_native(model: Transformer, folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(_contiguous(model.state_dict()), str(folder / WEIGHTS), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({NATIVE_KEY: model.cfg.to_dict()}, indent=2))
    return folder


def read_config(folder: str | Path) -> ModelConfig:
    """Our config from a native or an HF Llama folder (architecture detected from config.json)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{folder} has no config.json; it is not a saved model folder")
    raw = json.loads(path.read_text())
    if NATIVE_KEY in raw:
        return ModelConfig.from_dict(raw[NATIVE_KEY])
    if raw.get("model_type") != "llama":
        raise ConfigError(f"{path}: model_type {raw.get('model_type')!r} is not supported (llama only)")
    rope = raw.get("rope_parameters") or {}
    theta = rope.get("rope_theta", raw.get("rope_theta", 10000.0))
    return ModelConfig(
        vocab_size=raw["vocab_size"], d_model=raw["hidden_size"], n_layers=raw["num_hidden_layers"],
        n_heads=raw["num_attention_heads"],
        n_kv_heads=raw.get("num_key_value_heads") or raw["num_attention_heads"],
        head_dim=raw.get("head_dim") or raw["hidden_size"] // raw["num_attention_heads"],
        ffn_hidden=raw["intermediate_size"], max_seq_len=raw["max_position_embeddings"],
        rope_theta=float(theta), norm_eps=raw["rms_norm_eps"],
        tie_embeddings=bool(raw.get("tie_word_embeddings", False)))


def load_native(folder: str | Path, device: str | torch.device = "cpu") -> Transformer:
    """Load either format; the architecture comes from config.json, no flags needed."""
    folder = Path(folder)
    cfg = read_config(folder)
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise ConfigError(f"{folder} has no {WEIGHTS}; the model folder is incomplete")
    state = load_file(str(weights), device=str(device))
    if any(k.startswith("model.") for k in state):
        state = _from_hf_names(state, cfg)
    model = Transformer(cfg).to(device)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(f"{weights} does not match its config (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}); the artifact is corrupt or incomplete")
    return model


def hf_config(cfg: ModelConfig):
    from transformers import LlamaConfig

    if cfg.is_moe or cfg.pos_encoding != "rope":
        raise ConfigError("only dense RoPE models export to Hugging Face Llama; "
                          "MoE and NoPE models are saved in the native format (save_native)")
    return LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_hidden,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, hidden_act="silu",
        tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, mlp_bias=False,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        bos_token_id=None, eos_token_id=None, pad_token_id=None)


def exportable(cfg: ModelConfig) -> bool:
    return not cfg.is_moe and cfg.pos_encoding == "rope"


def export_hf(model: Transformer, folder: str | Path, tokenizer=None) -> Path:
    """Write config.json + model.safetensors (+ tokenizer files) that transformers loads as is."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = hf_config(model.cfg)
    if tokenizer is not None:
        config.eos_token_id = tokenizer.eos_token_id
        config.bos_token_id = tokenizer.bos_token_id
        config.pad_token_id = tokenizer.pad_token_id
        tokenizer.save_pretrained(folder)
    config.save_pretrained(folder)
    state = {"model." + k: v for k, v in model.state_dict().items()}
    if model.lm_head is not None:
        state["lm_head.weight"] = state.pop("model.lm_head.weight")
    save_file(_contiguous(state), str(folder / WEIGHTS), metadata={"format": "pt"})
    return folder


def _from_hf_names(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = {k.removeprefix("model."): v for k, v in state.items()}
    if cfg.tie_embeddings:
        out.pop("lm_head.weight", None)
    return out


def import_hf(folder: str | Path, device: str | torch.device = "cpu") -> Transformer:
    """Load a transformers Llama folder (ours or anyone's, with safetensors weights)."""
    return load_native(folder, device)
