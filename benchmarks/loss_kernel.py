"""The training loss without the whole logits (`model.llama.linear_cross_entropy`) against the
textbook one, `F.cross_entropy(F.linear(h, W).float(), targets)`, in the engine's compiled full
run on CPU.

Each measurement is a fresh process training one shape of the CPU space alone with the engine's
own step, as `cpu_compile` does (its `measure`), with one loss or the other for the whole
process; whole and chunked alternate, W C C W, so that the machine's drift falls on both. The
two compute the same loss and gradients (`tests/test_model.py`); only their memory traffic
differs."""
from __future__ import annotations

import json
import statistics
import subprocess
import sys

from benchmarks.common import save
from benchmarks.cpu_compile import SHAPES


def whole_logits(h, weight, targets):
    import torch.nn.functional as F

    return F.cross_entropy(F.linear(h, weight).float(), targets)


def measure(shape: dict, whole: bool, seconds: float) -> dict:
    import model.llama
    from benchmarks.cpu_compile import measure as train

    if whole:
        model.llama.linear_cross_entropy = whole_logits
    return train(shape, True, seconds)


def in_fresh_process(shape: dict, whole: bool, seconds: float) -> dict:
    code = (f"import json; from benchmarks.loss_kernel import measure; "
            f"print(json.dumps(measure({shape!r}, {whole}, {seconds})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(seconds: float = 20.0, pairs: int = 2):
    rows = []
    for name, shape in SHAPES.items():
        runs = {True: [], False: []}
        for i in range(pairs):
            for whole in ((True, False) if i % 2 == 0 else (False, True)):
                runs[whole].append(in_fresh_process(shape, whole, seconds))
        w = statistics.median(r["tokens_per_s"] for r in runs[True])
        c = statistics.median(r["tokens_per_s"] for r in runs[False])
        rows.append({"model": name, "whole_logits_tokens_per_s": round(w), "chunked_tokens_per_s": round(c),
                     "speedup": round(c / w, 3), "compute_dtype": runs[False][0]["compute_dtype"],
                     "per_pair": ", ".join(f"{b['tokens_per_s'] / a['tokens_per_s']:.2f}"
                                           for a, b in zip(runs[True], runs[False]))})
    summary = "chunked/whole-logits loss, compiled engine step, each alone in a fresh process: " + ", ".join(
        f"{r['model']} {r['speedup']:.2f}×" for r in rows)
    return save("loss_kernel", rows, summary, "— (evidence for the model's chunked loss)", None,
                "python -m benchmarks run loss_kernel")
