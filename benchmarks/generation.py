"""Generation tokens/s for 256 new tokens with and without the KV cache (interleaved)."""
from __future__ import annotations

import torch

from benchmarks.common import interleaved, median, save


def run(rounds: int = 3):
    from model import ModelConfig, Transformer
    from pipeline.generate import Generator, Sampling

    class Tok:  # generation speed does not depend on the tokenizer
        eos_token_id = -1

    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for d, L in ((128, 4), (384, 8)):
        torch.manual_seed(0)
        model = Transformer(ModelConfig(vocab_size=4096, d_model=d, n_layers=L, n_heads=d // 64, max_seq_len=512))
        gen = Generator(model, Tok(), device)
        s = Sampling(256, 0.0)
        prompt = list(range(1, 17))
        times = interleaved({"cache": lambda: gen.generate_ids(prompt, s, use_cache=True),
                             "no_cache": lambda: gen.generate_ids(prompt, s, use_cache=False)}, rounds)
        rows.append({"model": f"d{d} L{L}", "kv_cache_tokens_per_s": round(256 / median(times["cache"])),
                     "no_cache_tokens_per_s": round(256 / median(times["no_cache"])),
                     "speedup": round(median(times["no_cache"]) / median(times["cache"]), 2)})
    summary = "KV cache speed-up for 256 new tokens: " + ", ".join(f"{r['model']} {r['speedup']}×" for r in rows)
    return save("generation", rows, summary, "cache faster than no cache", all(r["speedup"] > 1 for r in rows),
                "python -m benchmarks run generation")
