"""Training tokens/s: our model vs transformers' LlamaForCausalLM of the same configuration, same
AdamW, batch and precision, interleaved step by step, at three sizes.

On CPU: fp32, the small sizes the CPU space trains, and bf16 autocast for both as well where
the CPU multiplies bf16 in hardware (what the CPU space trains in there). On a CUDA GPU: bf16 autocast for both
models, sizes from 25M to 270M parameters at sequence 1024, and a synchronize at the end of each
step so the timer sees the GPU's work, not the launch queue. Both models run eagerly (compiling
only ours would not be the same configuration; the compiled figure is in `mfu`)."""
from __future__ import annotations

import contextlib

import torch

from benchmarks.common import interleaved, median, save
from model import ModelConfig, Transformer

SIZES = {  # name: (d_model, layers, heads, kv heads, seq, micro-batch)
    "small (d128 L4)": (128, 4, 4, 2, 256, 16),
    "medium (d256 L6)": (256, 6, 8, 2, 256, 8),
    "large (d384 L8)": (384, 8, 6, 2, 256, 4),
}
GPU_SIZES = {
    "small (d512 L8)": (512, 8, 8, 2, 1024, 16),
    "medium (d768 L12)": (768, 12, 12, 4, 1024, 16),
    "large (d1024 L24)": (1024, 24, 16, 4, 1024, 8),
}


def _step_fn(model, x, y, hf: bool, bf16: bool):
    cuda = x.device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=cuda)

    def step():
        with torch.autocast(x.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            if hf:
                loss = model(input_ids=x, labels=x).loss  # HF shifts labels internally
            else:
                loss = model(x[:, :-1], x[:, 1:]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
    return step


def run(rounds: int = 8):
    from transformers import LlamaForCausalLM

    from model.hf import hf_config

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as the engine sets it
    from pipeline.hardware import cpu_has_native_bf16

    precisions = ["bf16"] if device == "cuda" else ["fp32"] + (["bf16"] if cpu_has_native_bf16() else [])
    rows = []
    for precision in precisions:
        for name, (d, L, h, kv, seq, mb) in (GPU_SIZES if device == "cuda" else SIZES).items():
            cfg = ModelConfig(vocab_size=4096, d_model=d, n_layers=L, n_heads=h, n_kv_heads=kv, max_seq_len=seq + 1)
            torch.manual_seed(0)
            ours = Transformer(cfg).to(device)
            theirs = LlamaForCausalLM(hf_config(cfg)).to(device)  # default attention: SDPA
            x = torch.randint(0, 4096, (mb, seq + 1), device=device)
            bf16 = precision == "bf16"
            times = interleaved({"ours": _step_fn(ours, x, None, False, bf16),
                                 "hf": _step_fn(theirs, x, None, True, bf16)}, rounds=rounds, warmup=2)
            tokens = mb * seq
            ours_tps, hf_tps = tokens / median(times["ours"]), tokens / median(times["hf"])
            rows.append({"size": name, "precision": precision, "params": sum(p.numel() for p in ours.parameters()),
                         "ours_tokens_per_s": round(ours_tps), "hf_tokens_per_s": round(hf_tps),
                         "ratio": round(ours_tps / hf_tps, 3)})
    ratios = [r["ratio"] for r in rows]
    summary = "ours/HF training tokens/s: " + ", ".join(
        f"{r['size']}{'' if device == 'cuda' else ' ' + r['precision']} {r['ratio']:.2f}×" for r in rows)
    if device == "cuda":  # the goal is for CPU; on a GPU the figure is reported
        return save("speed_vs_hf", rows, summary + " (bf16 autocast, eager)", "— (reported; ≥ 1.3× is CPU's goal)",
                    None, "python -m benchmarks run speed_vs_hf")
    return save("speed_vs_hf", rows, summary, "≥ 1.3× on CPU", min(ratios) >= 1.3,
                "python -m benchmarks run speed_vs_hf")
