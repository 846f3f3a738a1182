"""The Pufferfish model family: a Llama-like decoder driven by one config dataclass."""
from model.config import ConfigError, ModelConfig, flops_per_token, param_counts
from model.llama import KVCache, Output, Transformer

__all__ = ["ConfigError", "ModelConfig", "KVCache", "Output", "Transformer", "flops_per_token",
           "param_counts"]
