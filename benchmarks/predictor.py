"""Throughput predictor: calibrate on the default CPU space's trials (Ray Tune + Optuna, as
autotune does), fit the model, then measure held-out configurations the calibration never ran
and compare with the predictions.

The truth is the held-out configurations' speed as the full run would see it: alone in this
process after Ray has stopped, with the training engine's own step, interleaved one optimizer
step each in turn (`pipeline.autotune.finalists.interleaved_rates`, as the plan's finalists are
measured). A 2-core VM drifts ±20% over seconds to minutes (benchmarks/notes/predictor.md,
session 10), so held-out configurations measured one after another would be compared across that
drift; interleaved, they share it. Each is also measured through the same Ray trainable as the
trials over a longer window (the earlier sessions' truth), reported beside it, and the error with
the common level divided out shows how much of the miss is level (drift between calibration and
truth) and how much is the model's shape.

On a GPU the default GPU space is calibrated instead (one trial per GPU, compiled, bf16), and the
truth is the Ray-trial measurement over the longer window: the full run there trains in its own
process on the same card, compiled once, and the interleaved single-process measurement would
recompile every model at each switch (each `Trainer` resets dynamo)."""
from __future__ import annotations

import random
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import save
from benchmarks.predictor_forms import store_calibration


def run(calibration_s: float | None = None, held_out: int | None = None, truth_window_s: float = 15.0):
    """Defaults: on CPU 90 s of calibration and 8 held-out configurations; on a GPU 150 s and 5
    (each compiled trial there pays its compile, ~10-20 s, before its window)."""
    from pipeline import hardware
    from pipeline.autotune.calibrate import TrialRecord, calibrate, measure, ray_session, seed_points
    from pipeline.autotune.finalists import interleaved_rates
    from pipeline.autotune.fit import Shape, ThroughputModel, leave_one_out_error
    from pipeline.autotune.space import candidate_key, default_space_path, load_space, to_run_config
    from pipeline.data import DataSettings, prepare

    hw = hardware.probe()
    gpu = hw.kind == "cuda"
    command = ("python -m benchmarks run predictor" if calibration_s is None else
               f'python -c "from benchmarks import predictor; predictor.run(calibration_s={calibration_s:g})"')
    calibration_s = calibration_s or (150.0 if gpu else 90.0)
    held_out = held_out or (5 if gpu else 8)
    space = load_space(default_space_path(hw.kind))
    data = prepare(DataSettings(), log=lambda *_: None)
    ctx = {"space": {"name": space.name, "choices": space.choices, "rules": space.rules},
           "data_folder": str(data.folder), "window_s": 6.0, "max_steps": 30, "full_seconds": 3600,
           "unique_tokens": data.unique_train_tokens, "peak_flops": hw.peak_flops}
    truth_ctx = {**ctx, "window_s": truth_window_s, "max_steps": 60}
    shape = lambda c: Shape.of(to_run_config(c, space, data.vocab_size))
    tmp = Path(tempfile.mkdtemp())
    with ray_session(None, hw.cpu_cores, len(hw.gpus)):
        records: list[TrialRecord] = calibrate(space, ctx, calibration_s, tmp / "optuna.db", "predictor", 0,
                                               seed_points(space), log=lambda *_: None)
        ok = [r for r in records if r.status == "ok"]
        store_calibration(records, ctx["window_s"], f"predictor benchmark, {calibration_s:.0f}-s calibration")
        model = ThroughputModel.fit([shape(r.candidate) for r in ok], [r.tokens_per_s for r in ok])
        seen = {r.key for r in records}
        # configurations that give at least three steps in the truth window (the region a
        # budget of an hour or less can use at all)
        step_tokens = space.rules["batch_tokens"]
        pool = [c for c in space.candidates() if candidate_key(c) not in seen
                and model.tokens_per_s(shape(c)) * truth_window_s >= 3 * step_tokens]
        random.Random(0).shuffle(pool)
        pool = pool[:held_out]
        if not pool:  # a slow machine: calibration read every candidate that the truth window can
            raise SystemExit(f"no held-out configuration left: the {calibration_s:.0f}-s calibration measured every "
                             f"candidate that gives three steps in {truth_window_s:.0f} s; give less calibration "
                             "time, e.g. predictor.run(calibration_s=45)")
        in_ray = measure(pool, truth_ctx, space, tmp / "optuna.db", "held-out")
    in_ray_rate = {candidate_key(c): (r.tokens_per_s if r.status == "ok" else 0.0) for c, r in zip(pool, in_ray)}
    if gpu:
        truth_of, truth_name = in_ray_rate, "in_ray_tokens_per_s"
    else:  # every configuration gets about truth_window_s of steps, interleaved with the others
        truth_of, truth_name = interleaved_rates(
            {candidate_key(c): to_run_config(c, space, data.vocab_size) for c in pool},
            data, truth_window_s * len(pool), log=lambda *_: None), "alone_tokens_per_s"
    rows = []
    for cand in pool:
        key = candidate_key(cand)
        truth, ray_rate = truth_of[key], in_ray_rate[key]
        if truth <= 0:
            continue
        pred = model.tokens_per_s(shape(cand))
        rows.append({"config": f"d{cand['n_heads'] * cand['head_dim']} L{cand['n_layers']} kv/{cand['kv_ratio']} "
                               f"T{cand['seq_len']} mb{cand['micro_batch']}"
                               + (" ckpt" if cand.get("activation_checkpointing") else ""),
                     "predicted_tokens_per_s": round(pred), "alone_tokens_per_s": None if gpu else round(truth),
                     "abs_error": round(abs(pred / truth - 1), 4),
                     "in_ray_tokens_per_s": round(ray_rate) if ray_rate > 0 else None,
                     "in_ray_abs_error": round(abs(pred / ray_rate - 1), 4) if ray_rate > 0 else None})
    errors = [r["abs_error"] for r in rows]
    ray_errors = [r["in_ray_abs_error"] for r in rows if r["in_ray_abs_error"] is not None]
    # the common level: geometric mean of truth/prediction; what is left is the model's shape
    level = float(np.exp(np.mean([np.log(r[truth_name] / r["predicted_tokens_per_s"]) for r in rows])))
    shape_errors = [abs(r["predicted_tokens_per_s"] * level / r[truth_name] - 1) for r in rows]
    loo = leave_one_out_error([shape(r.candidate) for r in ok], [r.tokens_per_s for r in ok])
    rows.append({"config": f"(median; calibration: {len(ok)} ok trials in {calibration_s:.0f}s, "
                           f"leave-one-out median {np.median(loo):.1%})",
                 "abs_error": round(float(np.median(errors)), 4),
                 "in_ray_abs_error": round(float(np.median(ray_errors)), 4) if ray_errors else None})
    against_ray = (f"; against the same configs measured as Ray trials {np.median(ray_errors):.1%}"
                   if ray_errors and not gpu else "")
    measured = (f"as Ray trials of {truth_window_s:.0f} s, one per GPU" if gpu
                else "interleaved, alone, as the full run trains")
    summary = (f"held-out median error {np.median(errors):.1%}, worst {max(errors):.1%} "
               f"({len(errors)} configs measured {measured}; model fitted on "
               f"{len(ok)} trials); truth/prediction level {level:.2f}, median error with the level divided out "
               f"{np.median(shape_errors):.1%}" + against_ray)
    return save("predictor", rows, summary, "median ≤ 10%", float(np.median(errors)) <= 0.10, command)
