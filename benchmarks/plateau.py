"""The learning rate and the exit from the unigram plateau (evidence behind the CPU space's lr rule).

Small models on the embedded corpus sit on a plateau (train loss ~6.1-6.6 nats, the unigram
entropy) for their first tens to hundreds of steps; when a 10-minute run leaves it decides much
of its final loss. This replays the start of a 10-minute d64 run with the CPU space's rules (a
linear decay over ~1000 steps of 8k tokens, no warmup) and stops at step 100, for several
seeds and multiples of the rule's learning rate; the figure is the mean train loss over steps
41-50 and 91-100. Same data, same initial weights per seed; nothing timed, so the machine's
load does not enter.

    python -m benchmarks run plateau            (d64-L1, seeds 0-2, lr × 0.5 … 3)
    python -m benchmarks.plateau --layers 2 --seeds 0,1 --lr 1,2
"""
from __future__ import annotations

import statistics

from benchmarks.common import save


def replay(space, data, layers: int, seed: int, lr_mult: float, steps: int = 100,
           horizon: int = 1000) -> tuple[float, float]:
    """(mean train loss over steps 41-50, over steps 91-100) of the CPU space's d64 model."""
    from pipeline.autotune.space import to_run_config
    from pipeline.train.engine import Trainer
    from pipeline.train.schedule import Budget

    cand = {k: v[0] for k, v in space.choices.items()} | {"n_layers": layers, "n_heads": 1}
    cfg = to_run_config(cand, space, data.vocab_size, seed=seed)
    cfg.train.lr *= lr_mult
    tokens = horizon * max(cfg.train.batch_tokens, cfg.train.micro_batch * cfg.train.seq_len)
    res = Trainer(cfg, data, Budget(tokens=tokens), progress=False, stop_after_steps=steps,
                  log=lambda *_: None).run()
    losses = [loss for _, loss in res.loss_trace]
    return statistics.fmean(losses[40:50]), statistics.fmean(losses[steps - 10:steps])


def run(layers: int = 1, seeds=(0, 1, 2), lr_mults=(0.5, 0.7, 1.0, 1.5, 2.0, 3.0)) -> dict:
    from pipeline.autotune.space import load_space
    from pipeline.data import DataSettings, prepare

    space, data = load_space("cpu"), prepare(DataSettings(), log=lambda *_: None)  # once, for every replay
    rows = []
    for mult in lr_mults:
        at = {s: replay(space, data, layers, s, mult) for s in seeds}
        rows.append({"model": f"d64-L{layers}", "lr_multiple": mult,
                     **{f"loss@100 seed{s}": round(v[1], 3) for s, v in at.items()},
                     "loss@50 mean": round(statistics.fmean(v[0] for v in at.values()), 3),
                     "loss@100 mean": round(statistics.fmean(v[1] for v in at.values()), 3)})
        print(rows[-1], flush=True)
    return finish(rows, f"python -m benchmarks.plateau --layers {layers} --seeds {','.join(map(str, seeds))} "
                        f"--lr {','.join(map(str, lr_mults))}")


def finish(rows: list[dict], command: str) -> dict:
    best = min(rows, key=lambda r: r["loss@100 mean"])
    base = next(r for r in rows if r["lr_multiple"] == 1.0)
    summary = (f"train loss at step 100, mean of {sum(k.startswith('loss@100 seed') for k in base)} seeds: "
               f"{base['loss@100 mean']:.3f} at the rule's lr, best {best['loss@100 mean']:.3f} at "
               f"{best['lr_multiple']}×, {max(r['loss@100 mean'] for r in rows):.3f} at worst")
    return save("plateau", rows, summary, "— (evidence for the lr rule)", None, command)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--lr", default="0.5,0.7,1,1.5,2,3", help="multiples of the space's learning rate")
    a = ap.parse_args()
    run(a.layers, tuple(int(s) for s in a.seeds.split(",")), tuple(float(m) for m in a.lr.split(",")))
