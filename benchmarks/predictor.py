"""Throughput predictor: calibrate on the default CPU space's trials (Ray Tune + Optuna, as
autotune does), fit the model, then measure held-out configurations the calibration never ran
and compare with the predictions.

Each held-out configuration is measured twice, over longer windows than the trials (the trials'
noise belongs to the model; the truth's should not): through the same Ray trainable as the
trials (the model's error, which is what ranks candidates), and alone in this process after Ray
has stopped (the conditions of autotune's full run; their ratio is the offset between the two)."""
from __future__ import annotations

import random
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import save


def run(calibration_s: float = 90.0, held_out: int = 8, truth_window_s: float = 15.0):
    from pipeline.autotune.calibrate import TrialRecord, calibrate, measure, ray_session, run_candidate, seed_points
    from pipeline.autotune.fit import Shape, ThroughputModel, leave_one_out_error
    from pipeline.autotune.space import SPACES_DIR, candidate_key, load_space, to_run_config
    from pipeline.data import DataSettings, prepare

    space = load_space(SPACES_DIR / "cpu.yaml")
    data = prepare(DataSettings(), log=lambda *_: None)
    ctx = {"space": {"name": space.name, "choices": space.choices, "rules": space.rules},
           "data_folder": str(data.folder), "window_s": 6.0, "max_steps": 30, "full_seconds": 3600,
           "unique_tokens": data.unique_train_tokens}
    truth_ctx = {**ctx, "window_s": truth_window_s, "max_steps": 60}
    shape = lambda c: Shape.of(to_run_config(c, space, data.vocab_size))
    tmp = Path(tempfile.mkdtemp())
    with ray_session(None, 2, 0):
        records: list[TrialRecord] = calibrate(space, ctx, calibration_s, tmp / "optuna.db", "predictor", 0,
                                               seed_points(space), log=lambda *_: None)
        ok = [r for r in records if r.status == "ok"]
        model = ThroughputModel.fit([shape(r.candidate) for r in ok], [r.tokens_per_s for r in ok])
        seen = {r.key for r in records}
        # configurations that give at least three steps in the truth window (the region a
        # budget of an hour or less can use at all)
        step_tokens = space.rules["batch_tokens"]
        pool = [c for c in space.candidates() if candidate_key(c) not in seen
                and model.tokens_per_s(shape(c)) * truth_window_s >= 3 * step_tokens]
        random.Random(0).shuffle(pool)
        pool = pool[:held_out]
        in_ray = measure(pool, truth_ctx, space, tmp / "optuna.db", "held-out")
    rows = []
    for cand, r in zip(pool, in_ray):
        alone = run_candidate(cand, truth_ctx)
        if r.status != "ok" or alone["status"] != "ok":
            continue
        pred = model.tokens_per_s(shape(cand))
        rows.append({"config": f"d{cand['n_heads'] * cand['head_dim']} L{cand['n_layers']} kv/{cand['kv_ratio']} "
                               f"T{cand['seq_len']} mb{cand['micro_batch']}",
                     "predicted_tokens_per_s": round(pred), "in_ray_tokens_per_s": round(r.tokens_per_s),
                     "abs_error": round(abs(pred / r.tokens_per_s - 1), 4),
                     "alone_tokens_per_s": round(alone["tokens_per_s"]),
                     "alone_over_ray": round(alone["tokens_per_s"] / r.tokens_per_s, 3)})
    errors = [r["abs_error"] for r in rows]
    offset = float(np.median([r["alone_over_ray"] for r in rows]))
    loo = leave_one_out_error([shape(r.candidate) for r in ok], [r.tokens_per_s for r in ok])
    rows.append({"config": f"(median; calibration: {len(ok)} ok trials in {calibration_s:.0f}s, "
                           f"leave-one-out median {np.median(loo):.1%})",
                 "abs_error": round(float(np.median(errors)), 4), "alone_over_ray": round(offset, 3)})
    summary = (f"held-out median error {np.median(errors):.1%}, worst {max(errors):.1%} "
               f"({len(errors)} configs measured as trials are, model fitted on {len(ok)} trials); "
               f"the same configs alone run {offset:.2f}× their in-Ray speed")
    return save("predictor", rows, summary, "median ≤ 10%", float(np.median(errors)) <= 0.10,
                "python -m benchmarks run predictor")
