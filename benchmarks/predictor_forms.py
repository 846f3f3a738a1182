"""Throughput-model forms, replayed on stored calibrations (no training: seconds on any machine).

`benchmarks/results/calibrations-cpu.json` keeps the successful trials of eight real calibrations
on the default CPU space (6-second windows, 2 EPYC cores). Each calibration in turn plays the
calibration: every candidate form is fitted on its trials alone and predicts the configurations
it did not measure; the truth for those is the median of the other calibrations' measurements.
Two questions: does another form of `pipeline/autotune/fit.py` predict held-out configurations
better, and how far apart are two measurements of the same configuration (the noise floor no
form can go below)?"""
from __future__ import annotations

import functools
import itertools
import json
import statistics
import time
from pathlib import Path

import numpy as np
from scipy.optimize import nnls

from benchmarks.common import RESULTS, SESSIONS_1_8_CPU, save

FORMS = [["mm"], ["mm", "step"], ["mm", "attn"], ["mm", "attn", "step"], ["mm", "narrow", "step"],
         ["mm", "narrow", "attn"], ["mm", "narrow", "attn", "step"], ["mm", "attn", "layer", "step"],
         ["mm", "narrow", "attn", "layer", "step"]]


PRODUCT = "product (terms by trial count)"  # the product's own fit, `ThroughputModel.fit`


def stored_calibrations(path=RESULTS / "calibrations-cpu.json") -> list[dict]:
    """One {(n_heads, n_layers): (tokens/s, steps)} per stored calibration (the other knobs are
    the CPU space's single choices)."""
    return by_config(json.loads(path.read_text())["calibrations"])


def by_config(calibrations: list[dict]) -> list[dict]:
    """A calibrations file's entries as {(n_heads, n_layers): (tokens/s, steps)}, one per calibration."""
    return [{(t["n_heads"], t["n_layers"]): (t["tokens_per_s"], t["steps"]) for t in c["trials"]} for c in calibrations]


def store_calibration(records: list, window_s: float, source: str) -> Path | None:
    """Add a calibration's ok trials to this machine's `calibrations-<slug>.json`, the input of
    `predictor_few`, when they are the default CPU space's (heads and layers vary, the rest is
    fixed); None otherwise."""
    from benchmarks.common import machine, slug
    from pipeline.autotune.space import SPACES_DIR, load_space

    fixed = {k: v[0] for k, v in load_space(SPACES_DIR / "cpu.yaml").choices.items() if k not in ("n_heads", "n_layers")}
    ok = [r for r in records if r.status == "ok"]
    if not ok or not slug().startswith("cpu") or any(r.candidate.get(k) != v for r in ok for k, v in fixed.items()):
        return None
    path = RESULTS / f"calibrations-{slug()}.json"
    stored = json.loads(path.read_text()) if path.is_file() else {
        "space": "search_spaces/cpu.yaml", "machine": machine(),
        "note": "the ok trials of calibrations on the default CPU space, in trial order", "calibrations": []}
    stored["calibrations"].append({"when": time.strftime("%Y-%m-%d %H:%M"), "source": source, "window_s": window_s,
                                   "trials": [{"n_heads": r.candidate["n_heads"], "n_layers": r.candidate["n_layers"],
                                               "tokens_per_s": round(r.tokens_per_s, 1), "steps": r.steps} for r in ok]})
    path.write_text(json.dumps(stored, indent=1))
    return path


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
    forms = {PRODUCT: lambda sh, v: ThroughputModel.fit(sh, v).tokens_per_s}
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
    product = next(r for r in out if r["form"] == PRODUCT)
    best = min((r for r in out if r["form"] in {" + ".join(t) for t in FORMS}), key=lambda r: r["median_error"])
    summary = (f"{len(runs)} stored calibrations ({sum(map(len, runs))} trials): the product's fit {product['median_error']:.1%} median held-out "
               f"error, best fixed form ({best['form']}) {best['median_error']:.1%}; two measurements of one "
               f"configuration differ by {floor:.1%} (median)")
    return save("predictor_forms", out, summary, "no form better than the product's by > 1 point",
                best["median_error"] >= product["median_error"] - 0.01, "python -m benchmarks run predictor_forms", on=SESSIONS_1_8_CPU)


# The forms a fit on a handful of trials can afford (short budgets: a 10-minute CPU calibration
# reads 4-9 candidates, the first two or three of them the seeds).
FEW = (2, 3, 4)
FEW_FORMS = [["mm"], ["mm", "step"], ["mm", "narrow"], ["mm", "narrow", "step"]]


def ladder(trials: dict) -> list:
    """A calibration's trials as calibration's width ladder would have given them (`seed_points`):
    the shallowest measured model at each width, narrowest first."""
    rungs: dict = {}
    for heads, layers in sorted(trials):
        rungs.setdefault(heads, (heads, layers))
    return list(rungs.values())


def _first_rungs(trials: dict, k: int) -> list[list]:
    """The ladder's first `k` rungs as the one subset of a calibration (none if it has fewer)."""
    rungs = ladder(trials)
    return [rungs[:k]] if len(rungs) >= k else []


def few_trials(vocab: int = 4096) -> list[dict]:
    """The forms fitted on few trials, per stored calibration file (each a machine). Two kinds of
    subsets of 2, 3 and 4 trials of each calibration fit each form, which predicts every other
    configuration the file measured (truth: the median of all its measurements there):
    - `ladder`: the first rungs of the calibration's width ladder, one trial per width, narrowest
      first. Since session 21 calibration starts with this ladder, so at short budgets these are
      the trials the product's fit gets; the goal is judged on them.
    - `random`: every subset, as TPE's picks would be (reported, not judged)."""
    from pipeline.autotune.fit import ThroughputModel
    from pipeline.autotune.space import SPACES_DIR, load_space

    space = load_space(SPACES_DIR / "cpu.yaml")
    shape = functools.lru_cache(maxsize=None)(lambda c: shape_of(space, vocab, *c))
    forms = {PRODUCT: lambda sh, v: ThroughputModel.fit(sh, v).tokens_per_s}
    forms |= {" + ".join(t): (lambda t: lambda sh, v: _fixed_form(t, sh, v))(t) for t in FEW_FORMS}
    subsets = {"ladder": _first_rungs, "random": itertools.combinations}
    results = []
    for path in sorted(RESULTS.glob("calibrations-*.json")):
        stored = json.loads(path.read_text())
        runs = [{c: v for c, (v, _) in r.items()} for r in by_config(stored["calibrations"])]
        pooled: dict = {}
        for r in runs:
            for c, v in r.items():
                pooled.setdefault(c, []).append(v)
        truth = {c: statistics.median(v) for c, v in pooled.items()}
        rows = []
        for kind, pick in subsets.items():
            for k in FEW:
                fitted = {name: form for name, form in forms.items() if len(name.split(" + ")) <= k}  # terms ≤ trials
                errors = {name: [] for name in fitted}
                for r in runs:
                    for subset in pick(r, k):
                        shapes, rates = [shape(c) for c in subset], [r[c] for c in subset]
                        for name, form in fitted.items():
                            predict = form(shapes, rates)
                            errors[name] += [abs(predict(shape(c)) / t - 1) for c, t in truth.items() if c not in subset]
                rows += [{"subsets": kind, "trials": k, "form": name, "median_error": round(float(np.median(e)), 4),
                          "mean_error": round(float(np.mean(e)), 4), "predictions": len(e)}
                         for name, e in errors.items() if e]
        met, parts = True, []
        for kind in subsets:
            by_k = {k: {r["form"]: r["median_error"] for r in rows if r["subsets"] == kind and r["trials"] == k} for k in FEW}
            counts = [k for k in FEW if PRODUCT in by_k[k]]
            product = [by_k[k].pop(PRODUCT) for k in counts]
            best = [min(by_k[k].values()) for k in counts]
            if kind == "ladder":
                met = bool(counts) and all(p <= b + 0.01 for p, b in zip(product, best))
            label = ("the ladder's first rungs (one trial per width, narrowest first, as calibration starts)"
                     if kind == "ladder" else "every subset")
            parts.append(f"{label}, {'/'.join(map(str, counts))} trials: the product's fit "
                         + "/".join(f"{p:.1%}" for p in product) + " median error on the rest; "
                         + "; ".join(f"{form} " + "/".join(f"{by_k[k][form]:.1%}" if form in by_k[k] else "—"
                                                         for k in counts)
                                     for form in (" + ".join(t) for t in FEW_FORMS)))
        summary = f"{len(runs)} calibration(s), fitted on " + "; and on ".join(parts)
        on = (path.stem[len("calibrations-"):], stored["machine"])
        results.append(save("predictor_few", rows, summary, "the product's form within 1 point of the best at "
                            "each trial count, on the ladder's first rungs", met,
                            "python -m benchmarks run predictor_few", on=on))
    return results


if __name__ == "__main__":
    run()
