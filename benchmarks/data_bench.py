"""Data: preparation throughput (embedded corpus and a ~100 MB generated corpus) and the loader's
share of a training step."""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import save


def _generated_corpus(folder: Path, mb: int = 100) -> Path:
    """Zipf-distributed pseudo-words from random syllables: a vocabulary rich enough for BPE."""
    rng = np.random.default_rng(0)
    syllables = [a + b for a in "bcdfghjklmnprstvwz" for b in ["a", "e", "i", "o", "u", "ai", "ou", "ee"]]
    lexicon = np.array(["".join(rng.choice(syllables, rng.integers(1, 4))) for _ in range(60_000)])
    p = 1.0 / np.arange(1, len(lexicon) + 1) ** 1.1
    p /= p.sum()
    path = folder / "generated.txt"
    with open(path, "w") as f:
        written = 0
        while written < mb * 2**20:
            words = rng.choice(lexicon, size=(500, 120), p=p)
            block = "".join(" ".join(row) + ".\n\n" for row in words)
            f.write(block)
            written += len(block)
    return path


def run():
    from pipeline.data import DataSettings, prepare
    from pipeline.data.loader import BatchLoader

    rows = []
    tmp = Path(tempfile.mkdtemp())
    try:
        for label, data in (("embedded wiki-en (4.9 MB)", None), ("generated text (100 MB)", "gen")):
            path = str(_generated_corpus(tmp)) if data else None
            t = time.perf_counter()
            prepared = prepare(DataSettings(data=path, cache_dir=str(tmp / "cache")), log=lambda *_: None)
            cold = time.perf_counter() - t
            t = time.perf_counter()
            prepare(DataSettings(data=path, cache_dir=str(tmp / "cache")), log=lambda *_: None)
            warm = time.perf_counter() - t
            tokens = prepared.meta["splits"]["train"]["tokens"] + prepared.meta["splits"]["val"]["tokens"]
            rows.append({"corpus": label, "tokens": tokens, "cold_s": round(cold, 2),
                         "tokens_per_s": round(tokens / cold), "cached_reuse_s": round(warm, 3)})
        # loader share: time to produce a batch vs a training step of the default CPU model
        import torch

        from model import ModelConfig, Transformer

        tokens = prepared.tokens("train")
        loader = BatchLoader(tokens, 256, 16)
        t = time.perf_counter()
        for k in range(50):
            loader.make_batch(k)
        batch_s = (time.perf_counter() - t) / 50
        model = Transformer(ModelConfig(vocab_size=prepared.vocab_size, d_model=128, n_layers=4, n_heads=4,
                                        max_seq_len=256))
        opt = torch.optim.AdamW(model.parameters())
        x, y = loader.make_batch(0)
        t = time.perf_counter()
        for _ in range(5):
            model(x, y).loss.backward()
            opt.step()
            opt.zero_grad()
        step_s = (time.perf_counter() - t) / 5
        waited = []
        for _ in range(20):  # with the prefetch thread: time the trainer actually waits
            t = time.perf_counter()
            loader.next()
            waited.append(time.perf_counter() - t)
            time.sleep(step_s)  # stand-in for the step, during which the thread prefetches
        loader.close()
        rows.append({"corpus": "loader (d128 L4, 16×256 batch)", "batch_build_ms": round(batch_s * 1e3, 2),
                     "step_ms": round(step_s * 1e3, 1), "share_without_prefetch": round(batch_s / step_s, 4),
                     "wait_ms_with_prefetch": round(float(np.median(waited[2:])) * 1e3, 3)})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary = (f"prep {rows[0]['tokens_per_s']:,} tok/s (embedded), {rows[1]['tokens_per_s']:,} tok/s (100 MB); "
               f"loader {rows[2]['share_without_prefetch']:.2%} of a step before prefetch, "
               f"{rows[2]['wait_ms_with_prefetch']} ms wait with it")
    return save("data", rows, summary, "loader never the bottleneck", rows[2]["share_without_prefetch"] < 0.05,
                "python -m benchmarks run data")
