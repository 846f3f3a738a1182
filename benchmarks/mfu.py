"""MFU on a GPU: a ~125M-parameter dense model trained by the engine itself.

The model is GPT-2-small's size in Llama form: width 768, 12 layers, 12 heads of 64, SwiGLU
2048, a 50,304-token vocabulary and tied embeddings, 124M parameters. It runs at sequence 2048
and 1024, bf16 autocast, with and without `torch.compile`. Attention is SDPA with `is_causal`,
which takes the flash kernel on Hopper.

Each variant is one calibration trial of the training engine, `Trainer(trial=True)`, on the
embedded corpus. So the figure is what autotune's trials measure and its full run gets: the same
loader, the same step with its one host sync for the loss and gradient norm, the same
steady-state rule (first steps dropped, median step). MFU is tokens/s × training FLOPs per token
(6·N + 12·L·d·T, `model.config.flops_per_token`) over the GPU's dense bf16 peak from
`pipeline.hardware`. Token ids are the 4k-token corpus's; the model's wider vocabulary costs the
same FLOPs whatever the ids are.

On a machine without a CUDA GPU this benchmark stops with a one-line message;
`python -m benchmarks.mfu --tiny` runs the same code path on a tiny model (no result is saved).
"""
from __future__ import annotations

import argparse
import sys

from benchmarks.common import save

GOAL = "≥ 45% on an H100/H200 (llm-foundry 125M: 44.8% on A100; nanochat d12: ~41% on H100)"
MODEL_125M = {"vocab_size": 50304, "d_model": 768, "n_layers": 12, "n_heads": 12, "n_kv_heads": 12,
              "ffn_hidden": 2048, "max_seq_len": 2048}
# (name, sequence, micro-batch, compiled): 32k tokens per step in each
VARIANTS = [("seq 2048, compiled", 2048, 16, True), ("seq 1024, compiled", 1024, 32, True),
            ("seq 2048, eager", 2048, 16, False)]
TINY = {"vocab_size": 4096, "d_model": 64, "n_layers": 2, "n_heads": 1, "ffn_hidden": 256, "max_seq_len": 128}


def measure(model: dict, seq: int, micro_batch: int, compiled: bool, data, peak_flops: float | None,
            seconds: float = 120.0, steps: int = 200) -> dict:
    """One trial of the engine: steady-state tokens/s, MFU, compile time and peak memory."""
    from model.config import param_counts
    from pipeline.train.config import RunConfig
    from pipeline.train.engine import Trainer
    from pipeline.train.schedule import Budget

    cfg = RunConfig.from_dict({"model": model | {"max_seq_len": max(seq, model["max_seq_len"])},
                               "train": {"seq_len": seq, "micro_batch": micro_batch, "batch_tokens": seq * micro_batch,
                                         "precision": "bf16", "compile": compiled, "lr": 6e-4,
                                         "warmup_frac": 0.0}})
    trainer = Trainer(cfg, data, Budget(seconds=seconds), trial=True, progress=False,
                      stop_after_steps=steps, peak_flops=peak_flops, log=lambda *_: None)
    res = trainer.run()
    return {"params": param_counts(cfg.model)["total"], "seq_len": seq, "micro_batch": micro_batch, "compiled": compiled,
            "steps": res.steps, "tokens_per_s": round(res.tokens_per_s),
            "step_ms": round(1000 * res.step_time_s, 1), "compile_s": round(res.compile_s, 1),
            "peak_memory_gib": round(res.peak_memory_bytes / 2**30, 2),
            "mfu": round(res.mfu, 4) if res.mfu is not None else None}


def run(tiny: bool = False):
    import torch

    from pipeline.data import DataSettings, prepare
    from pipeline.hardware import probe

    if not torch.cuda.is_available() and not tiny:
        print("mfu: skipped, it needs a CUDA GPU (python -m benchmarks.mfu --tiny checks the code path on CPU)")
        return None
    hw = probe()
    data = prepare(DataSettings(), log=lambda *_: None)
    rows = []
    for name, seq, mb, compiled in VARIANTS:
        if tiny:
            row = measure(TINY, 64, 4, compiled and torch.cuda.is_available(), data, hw.peak_flops,
                          seconds=20, steps=8)
        else:
            row = measure(MODEL_125M, seq, mb, compiled, data, hw.peak_flops)
        rows.append({"variant": name} | row)
        print(rows[-1], flush=True)
    if tiny:
        return rows
    best = max(rows, key=lambda r: r["mfu"] or 0)
    summary = (f"{rows[0]['params'] / 1e6:.0f}M dense, bf16: " +
               ", ".join(f"{r['variant']} {100 * (r['mfu'] or 0):.1f}%" for r in rows) +
               (f" (peak {hw.peak_flops / 1e12:.0f} TFLOP/s dense bf16)" if hw.peak_flops else
                  " (no published peak for this GPU: MFU not computed)"))
    return save("mfu", rows, summary, GOAL, (best["mfu"] or 0) >= 0.45, "python -m benchmarks run mfu")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="python -m benchmarks.mfu", description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny model, any device, nothing saved (checks the path)")
    sys.exit(0 if run(tiny=ap.parse_args().tiny) is not None else 1)
