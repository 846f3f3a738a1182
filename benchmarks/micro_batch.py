"""Sustained training tokens/s by micro-batch at a fixed global batch (the CPU space's choice).

On a CPU the micro-batch changes nothing but speed (gradient accumulation fills the same
8k-token batch), and the speed depends on the cache, which the throughput model cannot
represent; so the CPU space fixes it. This measures that choice against the hand grid's
micro-batch 16, interleaved (rounds alternate the order), 30+ steps a run after 3 warm-up steps.
"""
from __future__ import annotations

import statistics

from benchmarks.common import save

SHAPES = {"d64-L2": ({"n_heads": 1, "n_layers": 2}, (4, 16, 32), 30),
          "d256-L4": ({"n_heads": 4, "n_layers": 4}, (4, 16), 12)}
BASELINE = 16


def _sustained(cfg, data, steps: int) -> float:
    from pipeline.train.engine import Trainer
    from pipeline.train.schedule import Budget

    t = Trainer(cfg, data, Budget(tokens=10**12), trial=True, progress=False, stop_after_steps=steps + 3,
                log=lambda *_: None)
    res = t.run()
    times = [b[0] - a[0] for a, b in zip(res.loss_trace, res.loss_trace[1:])][2:]
    return t.tokens_per_step / statistics.mean(times)


def run(rounds: int = 3):
    from pipeline.autotune.space import load_space, to_run_config
    from pipeline.data import DataSettings, prepare

    space = load_space("cpu")
    data = prepare(DataSettings(), log=lambda *_: None)
    base = {k: v[0] for k, v in space.choices.items()}
    rows = []
    for name, (shape, mbs, steps) in SHAPES.items():
        tps = {mb: [] for mb in mbs}
        for r in range(rounds):
            for mb in (mbs if r % 2 == 0 else mbs[::-1]):
                cfg = to_run_config(base | shape, space, data.vocab_size)
                cfg.train.micro_batch = mb
                tps[mb].append(_sustained(cfg, data, steps))
        for mb in mbs:
            ratios = [a / b for a, b in zip(tps[mb], tps[BASELINE])]
            rows.append({"model": name, "micro_batch": mb, "tokens_per_s": round(statistics.median(tps[mb])),
                         f"over_mb{BASELINE}": round(statistics.median(ratios), 3),
                         "per_round": ", ".join(f"{x:.2f}" for x in ratios)})
    chosen = space.choices["micro_batch"][0]
    mine = [r for r in rows if r["micro_batch"] == chosen]
    summary = f"CPU space micro-batch {chosen} vs {BASELINE}: " + ", ".join(
        f"{r['model']} {r[f'over_mb{BASELINE}']}×" for r in mine)
    return save("micro_batch", rows, summary, f"micro-batch {chosen} at least as fast as {BASELINE} (within 5%)",
                all(r[f"over_mb{BASELINE}"] >= 0.95 for r in mine), "python -m benchmarks run micro_batch")
