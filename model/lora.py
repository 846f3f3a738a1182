"""LoRA (Hu et al. 2021) as the project's own small module rather than PEFT: our model is not a
`transformers` model, and a subclass of `nn.Linear` keeps every base parameter name unchanged,
so base checkpoints load into a LoRA model as they are and merging is one line per layer.

    y = x Wᵀ + (alpha / r) · x Aᵀ Bᵀ,   A ~ N(0, 1/r) [r × in], B = 0 [out × r]

B starts at zero, so a fresh LoRA model computes exactly the base model.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class LoRALinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, bias: bool = False):
        super().__init__(in_features, out_features, bias=bias)
        self.rank, self.scale = rank, alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.normal_(self.lora_A, std=1 / math.sqrt(rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale

    def merged_weight(self) -> torch.Tensor:
        return self.weight + (self.lora_B @ self.lora_A) * self.scale


def lora_targets(model: nn.Module, targets: list[str]) -> list[str]:
    """Names of the nn.Linear modules whose last name component is in `targets`."""
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets]


def linear_names(model: nn.Module) -> list[str]:
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})


def apply_lora(model: nn.Module, targets: list[str], rank: int, alpha: float) -> list[str]:
    """Swap matching nn.Linear layers for LoRALinear (weights kept) and freeze everything else."""
    from model.config import ConfigError

    names = lora_targets(model, targets)
    if not names:
        raise ConfigError(f"LoRA targets {', '.join(targets)} match no module; linear modules are: "
                          f"{', '.join(linear_names(model))}")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        new = LoRALinear(old.in_features, old.out_features, rank, alpha, bias=old.bias is not None)
        new.to(old.weight.device, old.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(old.weight)
            if old.bias is not None:
                new.bias.copy_(old.bias)
        setattr(parent, child, new)
    for pname, p in model.named_parameters():
        p.requires_grad = "lora_" in pname
    return names


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRALinear back into a plain nn.Linear (in place); returns the model."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            plain.to(m.weight.device, m.weight.dtype)
            plain.weight.copy_(m.merged_weight())
            if m.bias is not None:
                plain.bias.copy_(m.bias)
            setattr(parent, child, plain)
    for p in model.parameters():
        p.requires_grad = True
    return model
