"""A Llama-family decoder in one file: RMSNorm, RoPE (or NoPE), grouped-query attention through
SDPA, SwiGLU or a mixture of experts, tied embeddings, and a KV cache.

Module and parameter names mirror Hugging Face's `LlamaForCausalLM` (minus its `model.` prefix)
so that the export in `model/hf.py` is a rename, not a translation.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from model.config import ModelConfig


class Output(NamedTuple):
    logits: torch.Tensor
    loss: torch.Tensor | None        # cross-entropy (+ auxiliary balancing loss when enabled)
    aux_loss: torch.Tensor | None    # the MoE auxiliary loss alone (None for dense / loss-free)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and cast back before scaling, exactly as HF's LlamaRMSNorm does.
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [max_len, head_dim] in the half-split layout (dim i pairs with i + hd/2)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class KVCache:
    """Pre-allocated keys/values for every layer; `length` tokens are filled."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int | None = None,
                 device=None, dtype=torch.float32):
        self.max_len = max_len or cfg.max_seq_len
        shape = (batch_size, cfg.n_kv_heads, self.max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.length = 0

    def reorder(self, index: torch.Tensor) -> None:
        """Select batch rows (beam search keeps the surviving beams' histories)."""
        self.k = [k.index_select(0, index) for k in self.k]
        self.v = [v.index_select(0, index) for v in self.v]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * hd, cfg.d_model, bias=False)

    def forward(self, x, cos, sin, cache: KVCache | None = None, layer: int = 0):
        b, t, _ = x.shape
        cfg = self.cfg
        q = self.q_proj(x).view(b, t, cfg.n_heads, cfg.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        if cos is not None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        start = 0
        if cache is not None:
            start = cache.length
            cache.k[layer][:, :, start:start + t] = k
            cache.v[layer][:, :, start:start + t] = v
            k = cache.k[layer][:, :, :start + t]
            v = cache.v[layer][:, :, :start + t]
        mask, causal = None, True
        if start > 0:
            causal = False
            if t > 1:  # a chunk after a filled cache: token i sees keys 0 .. start + i
                mask = torch.ones(t, start + t, dtype=torch.bool, device=x.device).tril(start)
        gqa = cfg.n_kv_heads != cfg.n_heads
        # enable_gqa repeats each KV head for n_heads/n_kv_heads consecutive query heads, the
        # same order as HF's repeat_kv, without materialising the copies.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and t > 1,
                                           enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, cfg.n_heads * cfg.head_dim))


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    """Top-k routed SwiGLU experts, optional shared expert, two balancing modes.

    loss_free (DeepSeek-V3): sigmoid affinities; a per-expert bias is added to the scores for
    *selection only*; gates come from the unbiased scores. After each optimizer step the trainer
    calls `update_bias`, which nudges the bias of over-loaded experts down and under-loaded up.
    aux_loss (Switch/GShard): softmax router with loss E · Σ_i f_i · P_i added to the LM loss.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        e, d, h = cfg.n_experts, cfg.d_model, cfg.moe_ffn_hidden
        self.router = nn.Linear(d, e, bias=False)
        self.gate_proj = nn.Parameter(torch.empty(e, d, h))
        self.up_proj = nn.Parameter(torch.empty(e, d, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, d))
        self.shared = SwiGLU(d, h) if cfg.shared_expert else None
        self.register_buffer("route_bias", torch.zeros(e))            # saved with checkpoints
        self.register_buffer("load_counts", torch.zeros(e), persistent=False)
        self.aux_loss: torch.Tensor | None = None

    def forward(self, x):
        b, t, d = x.shape
        h = x.reshape(-1, d)
        logits = self.router(h).float()
        k = self.cfg.top_k
        if self.cfg.balance == "loss_free":
            scores = torch.sigmoid(logits)
            selected = torch.topk(scores + self.route_bias, k, dim=-1).indices
            gates = scores.gather(-1, selected)
        else:
            probs = torch.softmax(logits, dim=-1)
            gates, selected = torch.topk(probs, k, dim=-1)
        gates = (gates / gates.sum(-1, keepdim=True)).to(x.dtype)
        counts = torch.bincount(selected.flatten(), minlength=self.cfg.n_experts).float()
        if self.training:
            self.load_counts += counts.detach()
        self.aux_loss = None
        if self.cfg.balance == "aux_loss" and self.training:
            frac = counts / selected.numel()
            self.aux_loss = self.cfg.n_experts * (frac * probs.mean(0)).sum()

        out = torch.zeros_like(h)
        flat_expert = selected.flatten()
        flat_token = torch.arange(h.shape[0], device=x.device).repeat_interleave(k)
        flat_gate = gates.flatten()
        for e in range(self.cfg.n_experts):
            hit = (flat_expert == e).nonzero(as_tuple=True)[0]
            if hit.numel() == 0:
                continue
            tok = flat_token[hit]
            xe = h[tok]
            ye = (F.silu(xe @ self.gate_proj[e]) * (xe @ self.up_proj[e])) @ self.down_proj[e]
            out.index_add_(0, tok, ye * flat_gate[hit, None])
        if self.shared is not None:
            out = out + self.shared(h)
        return out.view(b, t, d)

    @torch.no_grad()
    def update_bias(self, rate: float) -> None:
        if self.load_counts.sum() == 0:
            return
        load = self.load_counts / self.load_counts.sum()
        self.route_bias += rate * torch.sign(load.mean() - load)
        self.load_counts.zero_()


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe else SwiGLU(cfg.d_model, cfg.ffn_hidden)

    def forward(self, x, cos, sin, cache=None, layer=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        # A tied head is the embedding matrix itself; no separate parameter exists to drift.
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.pos_encoding == "rope":
            cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()
        if cfg.lora_rank:
            from model.lora import apply_lora

            apply_lora(self, cfg.lora_targets, cfg.lora_rank, cfg.lora_alpha)
            if cfg.lora_train_embeddings:
                self.embed_tokens.weight.requires_grad = True

    def merged(self) -> "Transformer":
        """A plain model with LoRA folded into the weights (for export); self if no LoRA."""
        if not self.cfg.lora_rank:
            return self
        import copy
        import dataclasses

        from model.lora import merge_lora

        out = merge_lora(copy.deepcopy(self))
        out.cfg = dataclasses.replace(self.cfg, lora_rank=0)
        return out

    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        # Residual-branch outputs are scaled by 1/sqrt(2·layers) (GPT-2 / Megatron) so the
        # residual stream's variance does not grow with depth: deep and shallow candidates in a
        # search space start equally stable.
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue
            is_out = name.endswith(("o_proj.weight", "down_proj.weight", "down_proj"))
            nn.init.normal_(p, mean=0.0, std=out_std if is_out else std)

    def head_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None) -> Output:
        b, t = idx.shape
        start = cache.length if cache is not None else 0
        if start + t > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + t} tokens exceeds max_seq_len {self.cfg.max_seq_len}")
        x = self.embed_tokens(idx)
        cos = sin = None
        if self.cfg.pos_encoding == "rope":
            cos = self.rope_cos[start:start + t].to(x.dtype)
            sin = self.rope_sin[start:start + t].to(x.dtype)
        use_ckpt = self.cfg.activation_checkpointing and self.training and cache is None
        for i, block in enumerate(self.layers):
            if use_ckpt:
                x = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin, cache, i)
        if cache is not None:
            cache.length += t
        x = self.norm(x)
        logits = F.linear(x, self.head_weight())
        if targets is None:
            return Output(logits, None, None)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        aux = self.aux_loss()
        if aux is not None:
            loss = loss + self.cfg.aux_loss_coef * aux
        return Output(logits, loss, aux)

    # --- mixture-of-experts helpers used by the trainer --------------------------------------
    def moe_layers(self) -> list[MoE]:
        return [blk.mlp for blk in self.layers if isinstance(blk.mlp, MoE)]

    def aux_loss(self) -> torch.Tensor | None:
        losses = [m.aux_loss for m in self.moe_layers() if m.aux_loss is not None]
        return torch.stack(losses).mean() if losses else None

    def expert_load(self) -> torch.Tensor | None:
        """[layers, experts] fraction of routed tokens since the last bias update."""
        layers = self.moe_layers()
        if not layers:
            return None
        counts = torch.stack([m.load_counts for m in layers])
        return counts / counts.sum(-1, keepdim=True).clamp_min(1)

    def update_router_bias(self) -> None:
        for m in self.moe_layers():
            if self.cfg.balance == "loss_free":
                m.update_bias(self.cfg.bias_update_rate)
            else:
                m.load_counts.zero_()
