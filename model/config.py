"""The model's configuration: one validated dataclass, plus pure functions that size a config.

Everything the planner needs to reason about a candidate without building it (parameter counts,
training FLOPs per token) is a pure function of this dataclass, so the autotuner can enumerate
thousands of candidates cheaply and the numbers are the same ones MFU is computed with.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path


class ConfigError(ValueError):
    """A configuration that cannot be built; the message names the field and the fix."""


@dataclass
class ModelConfig:
    vocab_size: int = 4096
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None      # None: same as n_heads (multi-head attention)
    head_dim: int | None = None        # None: d_model // n_heads
    ffn_hidden: int | None = None      # None: 8/3 · d_model rounded up to a multiple of 64
    max_seq_len: int = 256
    pos_encoding: str = "rope"         # "rope" (HF half-split layout) or "nope"
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    # Mixture of experts: n_experts == 0 means a dense SwiGLU feed-forward.
    n_experts: int = 0
    top_k: int = 2
    shared_expert: bool = False
    moe_ffn_hidden: int | None = None  # None: ffn_hidden // top_k (keeps active FLOPs ~ dense)
    balance: str = "loss_free"         # "loss_free" (DeepSeek-V3 bias) or "aux_loss"
    bias_update_rate: float = 1e-3
    aux_loss_coef: float = 1e-2
    activation_checkpointing: bool = False
    init_std: float = 0.02
    # LoRA fine-tuning: rank 0 = off. Targets are linear-module names (model/lora.py).
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: list = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                         "gate_proj", "up_proj", "down_proj"])
    lora_train_embeddings: bool = True  # fine-tuning adds chat tokens whose embeddings must learn
    extra: dict = field(default_factory=dict)  # free-form notes carried along, never read by the model

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None and self.n_heads > 0 and self.d_model % self.n_heads == 0:
            self.head_dim = self.d_model // self.n_heads
        if self.ffn_hidden is None:
            self.ffn_hidden = _round_up(int(8 * self.d_model / 3), 64)
        if self.moe_ffn_hidden is None and self.n_experts:
            self.moe_ffn_hidden = max(1, self.ffn_hidden // max(1, self.top_k))
        self.validate()

    def validate(self) -> None:
        positive = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden",
                    "max_seq_len")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"model.{name} must be a positive integer, got {value!r}")
        if self.head_dim is None:
            raise ConfigError(f"model.d_model ({self.d_model}) is not divisible by model.n_heads "
                              f"({self.n_heads}); change one or set model.head_dim explicitly")
        if self.head_dim <= 0:
            raise ConfigError(f"model.head_dim must be positive, got {self.head_dim}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"model.n_heads ({self.n_heads}) is not divisible by model.n_kv_heads "
                              f"({self.n_kv_heads}); use a divisor of n_heads (1 = MQA, n_heads = MHA)")
        if self.pos_encoding not in ("rope", "nope"):
            raise ConfigError(f"model.pos_encoding must be 'rope' or 'nope', got {self.pos_encoding!r}")
        if self.pos_encoding == "rope" and self.head_dim % 2:
            raise ConfigError(f"model.head_dim ({self.head_dim}) must be even for RoPE; "
                              "pick an even head_dim or pos_encoding: nope")
        if self.rope_theta <= 0:
            raise ConfigError(f"model.rope_theta must be positive, got {self.rope_theta}")
        if self.norm_eps <= 0:
            raise ConfigError(f"model.norm_eps must be positive, got {self.norm_eps}")
        if self.n_experts < 0:
            raise ConfigError(f"model.n_experts must be ≥ 0 (0 = dense), got {self.n_experts}")
        if self.lora_rank < 0:
            raise ConfigError(f"model.lora_rank must be ≥ 0 (0 = no LoRA), got {self.lora_rank}")
        if self.lora_rank and self.lora_alpha <= 0:
            raise ConfigError(f"model.lora_alpha must be positive, got {self.lora_alpha}")
        if self.n_experts:
            if not 1 <= self.top_k <= self.n_experts:
                raise ConfigError(f"model.top_k ({self.top_k}) must be between 1 and model.n_experts "
                                  f"({self.n_experts})")
            if self.balance not in ("loss_free", "aux_loss"):
                raise ConfigError(f"model.balance must be 'loss_free' or 'aux_loss', got {self.balance!r}")
            if not self.moe_ffn_hidden or self.moe_ffn_hidden <= 0:
                raise ConfigError(f"model.moe_ffn_hidden must be positive, got {self.moe_ffn_hidden}")

    # --- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown model config keys: {', '.join(unknown)} "
                              f"(known: {', '.join(sorted(known))})")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0


def _round_up(x: int, multiple: int) -> int:
    return ((x + multiple - 1) // multiple) * multiple


# --- pure sizing functions -------------------------------------------------------------------

def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts computed from the config alone (tests check them against the module).

    total          every parameter, tied embedding counted once
    embedding      token embedding (+ untied output head)
    non_embedding  total - embedding
    active         parameters touched per token (MoE: top_k routed experts + shared + router)
    """
    d, hd = cfg.d_model, cfg.head_dim
    attn = d * cfg.n_heads * hd + 2 * d * cfg.n_kv_heads * hd + cfg.n_heads * hd * d
    norms = 2 * d
    if cfg.is_moe:
        expert = 3 * d * cfg.moe_ffn_hidden
        shared = 3 * d * cfg.moe_ffn_hidden if cfg.shared_expert else 0
        router = d * cfg.n_experts
        ffn_total = cfg.n_experts * expert + shared + router
        ffn_active = cfg.top_k * expert + shared + router
    else:
        ffn_total = ffn_active = 3 * d * cfg.ffn_hidden
    layer_total = attn + norms + ffn_total
    layer_active = attn + norms + ffn_active
    embedding = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
    final_norm = d
    lora = cfg.n_layers * _lora_per_layer(cfg) if cfg.lora_rank else 0
    non_emb = cfg.n_layers * layer_total + final_norm + lora
    active_non_emb = cfg.n_layers * layer_active + final_norm + lora
    return {
        "total": non_emb + embedding,
        "embedding": embedding,
        "non_embedding": non_emb,
        "active": active_non_emb + embedding,
        "active_non_embedding": active_non_emb,
        "lora": lora,
    }


def _lora_per_layer(cfg: ModelConfig) -> int:
    """LoRA parameters r·(in + out) for each targeted nn.Linear of one block."""
    d, hd, r = cfg.d_model, cfg.head_dim, cfg.lora_rank
    linears = {"q_proj": (d, cfg.n_heads * hd), "k_proj": (d, cfg.n_kv_heads * hd),
               "v_proj": (d, cfg.n_kv_heads * hd), "o_proj": (cfg.n_heads * hd, d)}
    if not cfg.is_moe:
        linears.update(gate_proj=(d, cfg.ffn_hidden), up_proj=(d, cfg.ffn_hidden), down_proj=(cfg.ffn_hidden, d))
    else:
        linears["router"] = (d, cfg.n_experts)
        if cfg.shared_expert:  # the routed experts are batched tensors, not nn.Linear
            linears.update(gate_proj=(d, cfg.moe_ffn_hidden), up_proj=(d, cfg.moe_ffn_hidden),
                           down_proj=(cfg.moe_ffn_hidden, d))
    return sum(r * (i + o) for name, (i, o) in linears.items() if name in cfg.lora_targets)


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> float:
    """Training FLOPs per token: 6·N_active + 12·L·(H·hd)·T  (forward + backward).

    N_active counts the active non-embedding matrices plus the output-head matmul (V·d), which
    is real compute even when the head is tied to the embedding (PaLM / llm-foundry convention
    for the attention term, which ignores the causal halving).
    """
    t = seq_len or cfg.max_seq_len
    n = param_counts(cfg)["active_non_embedding"] + cfg.vocab_size * cfg.d_model
    return 6.0 * n + 12.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * t
