"""Throughput predictor: calibrate on the default CPU space's trials (Ray Tune + Optuna, as
autotune does), fit the model, then measure held-out configurations the calibration never ran
and compare with the predictions."""
from __future__ import annotations

import random
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import save


def run(calibration_s: float = 90.0, held_out: int = 8, truth_window_s: float = 15.0):
    from pipeline.autotune.calibrate import TrialRecord, calibrate, ray_session, run_candidate, seed_points
    from pipeline.autotune.fit import Shape, ThroughputModel, leave_one_out_error
    from pipeline.autotune.space import SPACES_DIR, candidate_key, load_space, to_run_config
    from pipeline.data import DataSettings, prepare

    space = load_space(SPACES_DIR / "cpu.yaml")
    data = prepare(DataSettings(), log=lambda *_: None)
    ctx = {"space": {"name": space.name, "choices": space.choices, "rules": space.rules},
           "data_folder": str(data.folder), "window_s": 6.0, "max_steps": 30, "full_seconds": 3600,
           "unique_tokens": data.unique_train_tokens}
    tmp = Path(tempfile.mkdtemp())
    with ray_session(None, 2, 0):
        records: list[TrialRecord] = calibrate(space, ctx, calibration_s, tmp / "optuna.db", "predictor", 0,
                                               seed_points(space), log=lambda *_: None)
    ok = [r for r in records if r.status == "ok"]
    shape = lambda c: Shape.of(to_run_config(c, space, data.vocab_size))
    model = ThroughputModel.fit([shape(r.candidate) for r in ok], [r.tokens_per_s for r in ok])
    seen = {r.key for r in records}
    # Held-out truth is measured alone, over longer windows than the trials (the trials' own
    # noise belongs to the model; the truth's should not), on configurations that give at least
    # three steps in that window (the region a budget of an hour or less can use at all).
    step_tokens = space.rules["batch_tokens"]
    pool = [c for c in space.candidates() if candidate_key(c) not in seen
            and model.tokens_per_s(shape(c)) * truth_window_s >= 3 * step_tokens]
    random.Random(0).shuffle(pool)
    truth_ctx = {**ctx, "window_s": truth_window_s, "max_steps": 60}
    rows = []
    for cand in pool[:held_out]:
        m = run_candidate(cand, truth_ctx)
        if m["status"] != "ok":
            continue
        pred = model.tokens_per_s(shape(cand))
        rows.append({"config": f"d{cand['n_heads'] * cand['head_dim']} L{cand['n_layers']} kv/{cand['kv_ratio']} "
                               f"T{cand['seq_len']} mb{cand['micro_batch']}",
                     "measured_tokens_per_s": round(m["tokens_per_s"]), "predicted_tokens_per_s": round(pred),
                     "abs_error": round(abs(pred / m["tokens_per_s"] - 1), 4)})
    errors = [r["abs_error"] for r in rows]
    loo = leave_one_out_error([shape(r.candidate) for r in ok], [r.tokens_per_s for r in ok])
    rows.append({"config": f"(calibration: {len(ok)} ok trials in {calibration_s:.0f}s; "
                           f"leave-one-out median {np.median(loo):.1%})", "abs_error": round(float(np.median(errors)), 4)})
    summary = (f"held-out median error {np.median(errors):.1%}, worst {max(errors):.1%} "
               f"({len(errors)} configs, model fitted on {len(ok)} trials)")
    return save("predictor", rows, summary, "median ≤ 10%", float(np.median(errors)) <= 0.10,
                "python -m benchmarks run predictor")
