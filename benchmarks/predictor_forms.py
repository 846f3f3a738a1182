"""Throughput-model forms, replayed on stored calibrations (no training: seconds on any machine).

`benchmarks/results/calibrations-cpu.json` keeps the successful trials of eight real calibrations
on the default CPU space (6-second windows, 2 EPYC cores). Each calibration in turn plays the
calibration: every candidate form is fitted on its trials alone and predicts the configurations
it did not measure; the truth for those is the median of the other calibrations' measurements.
Two questions: does another form of `pipeline/autotune/fit.py` predict held-out configurations
better, and how far apart are two measurements of the same configuration (the noise floor no
form can go below)?"""
from __future__ import annotations

import json
import statistics

import numpy as np
from scipy.optimize import nnls

from benchmarks.common import RESULTS, SESSIONS_1_8_CPU, save

FORMS = [["mm"], ["mm", "step"], ["mm", "attn"], ["mm", "attn", "step"], ["mm", "narrow", "step"],
         ["mm", "narrow", "attn"], ["mm", "narrow", "attn", "step"], ["mm", "attn", "layer", "step"],
         ["mm", "narrow", "attn", "layer", "step"]]


def stored_calibrations() -> list[dict]:
    """One {(n_heads, n_layers): (tokens/s, steps)} per stored calibration (the other knobs are
    the CPU space's single choices)."""
    stored = json.loads((RESULTS / "calibrations-cpu.json").read_text())["calibrations"]
    return [{(t["n_heads"], t["n_layers"]): (t["tokens_per_s"], t["steps"]) for t in c["trials"]} for c in stored]


def shape_of(space, vocab: int, heads: int, layers: int):
    from pipeline.autotune.fit import Shape
    from pipeline.autotune.space import to_run_config

    cand = {k: v[0] for k, v in space.choices.items()} | {"n_heads": heads, "n_layers": layers}
    return Shape.of(to_run_config(cand, space, vocab))


def _fixed_form(terms: list[str], shapes: list, tokens_per_s: list[float]):
    """A fit with exactly these terms (the product picks its terms by the number of trials)."""
    from pipeline.autotune.fit import features

    y = np.array([1.0 / v for v in tokens_per_s])
    x = np.array([[features(s)[t] for t in terms] for s in shapes])
    coef, _ = nnls(x / y[:, None], np.ones(len(y)))
    return lambda s: 1.0 / max(1e-12, sum(c * features(s)[t] for c, t in zip(coef, terms)))


def run(vocab: int = 4096):
    from pipeline.autotune.fit import ThroughputModel
    from pipeline.autotune.space import SPACES_DIR, load_space

    space = load_space(SPACES_DIR / "cpu.yaml")
    stored = stored_calibrations()
    runs = [{c: v for c, (v, _) in r.items()} for r in stored]
    steps = [{c: n for c, (_, n) in r.items()} for r in stored]
    forms = {"product (terms by trial count)": lambda sh, v: ThroughputModel.fit(sh, v).tokens_per_s}
    forms |= {" + ".join(t): (lambda t: lambda sh, v: _fixed_form(t, sh, v))(t) for t in FORMS}
    errors = {name: [] for name in forms}
    repeat = []   # (steps, error of a measurement against the other calibrations' median, same config)
    for i, rows in enumerate(runs):
        others: dict = {}
        for j, r in enumerate(runs):
            if j != i:
                for c, v in r.items():
                    others.setdefault(c, []).append(v)
        repeat += [(steps[i][c], abs(v / statistics.median(others[c]) - 1)) for c, v in rows.items() if c in others]
        truth = {c: statistics.median(v) for c, v in others.items() if c not in rows}
        shapes = [shape_of(space, vocab, *c) for c in rows]
        for name, form in forms.items():
            predict = form(shapes, list(rows.values()))
            errors[name] += [abs(predict(shape_of(space, vocab, *c)) / t - 1) for c, t in truth.items()]
    out = [{"form": name, "median_error": round(float(np.median(e)), 4), "mean_error": round(float(np.mean(e)), 4),
            "worst_error": round(float(np.max(e)), 4), "predictions": len(e)} for name, e in errors.items()]
    out.sort(key=lambda r: r["median_error"])
    # The noise floor: one 6-s measurement against the other calibrations' median for the same
    # configuration, overall and by the number of steps in the window.
    for label, lo, hi in [("", 0, 10 ** 9), (", 2-3 steps", 0, 3), (", 4-6 steps", 4, 6), (", 7+ steps", 7, 10 ** 9)]:
        e = [err for n, err in repeat if lo <= n <= hi]
        out.append({"form": f"(noise floor{label}: one measurement against the other calibrations' median)",
                    "median_error": round(float(np.median(e)), 4), "mean_error": round(float(np.mean(e)), 4),
                    "worst_error": round(float(np.max(e)), 4), "predictions": len(e)})
    floor = float(np.median([err for _, err in repeat]))
    product = next(r for r in out if r["form"].startswith("product"))
    best = min((r for r in out if r["form"] in {" + ".join(t) for t in FORMS}), key=lambda r: r["median_error"])
    summary = (f"{len(runs)} stored calibrations ({sum(map(len, runs))} trials): the product's fit {product['median_error']:.1%} median held-out "
               f"error, best fixed form ({best['form']}) {best['median_error']:.1%}; two measurements of one "
               f"configuration differ by {floor:.1%} (median)")
    return save("predictor_forms", out, summary, "no form better than the product's by > 1 point",
                best["median_error"] >= product["median_error"] - 0.01, "python -m benchmarks run predictor_forms", on=SESSIONS_1_8_CPU)


if __name__ == "__main__":
    run()
