"""Does the planner's scaling law rank the hand-grid runs the way they finished? (No training:
a replay of stored results, seconds on any machine.)

For every pair of grid or autotune runs at one budget (`benchmarks/results/quality-arms-cpu.json`,
each with its parameters and the tokens it trained), the law predicts which of the two ends lower; a pair
counts when the two are different architectures and differ by more than 0.004 bpb (under that,
seeds decide). This is done for the default law (R_N* = 16, our recalibration; 50 in session
33), Muennighoff et al.'s R_N* = 5.3 and other
discounts of excess parameters, together with the training time at which the planner, given the throughput model
fitted on all stored calibrations (`calibrations-cpu.json`), stops choosing the space's smallest
model, what each stored calibration's own model would make it choose at 10, 15 and 30 minutes, and
what those choices cost in measured bpb.

`run()` sweeps R_N* at the planner's R_D*. `variants()` (`law_variants`) replays both
data-constrained constants, R_D* (how fast repeated tokens stop paying) and R_N* (how fast excess
parameters do), over every stored comparison of every machine: the pairs each law orders as they
finished, over all runs and over the shapes the CPU space offers, the measured run it ranks first
among those, the grid shape it would choose with the tokens capped as the full run caps them, and
what the planner would choose with this CPU's throughput model. Session 15 chose the planner's R_D*
(3) and the space's aspect_ratio rule from it; sessions 30-31 ran the R_N* 50 it favoured, session
33 adopted it with the size-dependent data cap, and session 34 went back to 16 (fp32, 10 minutes)."""
from __future__ import annotations

import itertools
import json
import statistics

from benchmarks.common import RESULTS, SESSIONS_1_8_CPU, save
from benchmarks.predictor_forms import shape_of, stored_calibrations
from benchmarks.quality import BF16, all_comparisons, arm_name

R_N = [5.3, 10.0, 15.0, 16.0, 20.0, 30.0, 50.0, 1e9]
CLOSE = 0.004
TRAIN_S = {"10": 525, "15": 790, "20": 1070, "30": 1600}  # autotune's full-run training time per budget


def model_of(r: dict, vocab: int = 4096):
    """The ModelConfig an arm trained: autotune stores its candidate, the other arms the config."""
    from model.config import ModelConfig
    from pipeline.autotune.space import model_config

    cfg = r.get("choice") or {}
    return model_config(cfg, vocab) if "head_dim" in cfg else ModelConfig(**cfg)


def shape_name(cfg) -> str:
    """"d128-L2": width and depth, the two knobs the CPU space and the grid vary."""
    return f"d{cfg.d_model}-L{cfg.n_layers}"


def planner_candidates(space, vocab: int) -> list:
    """(key, candidate, Shape) for every candidate of the space: what `plan` enumerates."""
    from pipeline.autotune.space import candidate_key

    return [(candidate_key(c), c, shape_of(space, vocab, c["n_heads"], c["n_layers"])) for c in space.candidates()]


def pairs_right(law, runs, unique: float) -> tuple[int, int]:
    """(pairs the law orders as they finished, pairs counted) among runs (arm, params, tokens,
    bpb, ...): two seeds of one arm, or two runs within CLOSE, are not counted."""
    good = total = 0
    for (a, na, da, ba, *_), (c, nc, dc, bc, *_) in itertools.combinations(runs, 2):
        if arm_name(a) == arm_name(c) or abs(ba - bc) <= CLOSE:
            continue
        total += 1
        good += (law.loss(na, da, unique) < law.loss(nc, dc, unique)) == (ba < bc)
    return good, total


def _runs(arms: dict) -> dict[str, list[tuple[str, float, float, float, str]]]:
    """{budget: [(arm, law params, tokens, bpb, "d128-L2")]} for the grid and autotune arms that stored
    their tokens (autotune's are runs of the space's own d64-L2 and the like)."""
    from model.config import param_counts

    out = {}
    for minutes, done in arms.items():
        rows = []
        for arm, r in done.items():
            if arm_name(arm).startswith(("grid:", "autotune")) and r.get("tokens"):
                cfg = model_of(r)
                rows.append((arm, float(param_counts(cfg)["active"]), float(r["tokens"]), r["bpb"], shape_name(cfg)))
        if len(rows) >= 2:
            out[minutes] = rows
    return out


def _throughput(space, vocab: int):
    """(model fitted on every stored trial's median, one model per stored calibration)."""
    from pipeline.autotune.fit import ThroughputModel

    pool: dict = {}
    each = []
    for calibration in stored_calibrations():
        knobs = [c for c in calibration if c[1] in space.choices["n_layers"]]  # the current space's
        for c in knobs:
            pool.setdefault(c, []).append(calibration[c][0])
        each.append(ThroughputModel.fit([shape_of(space, vocab, *c) for c in knobs],
                                        [calibration[c][0] for c in knobs]))
    pooled = ThroughputModel.fit([shape_of(space, vocab, *c) for c in pool],
                                 [statistics.median(v) for v in pool.values()])
    return pooled, each


def _by_shape(runs) -> dict[str, float]:
    """{"d128-L2": mean bpb} over a budget's grid runs of that width and depth, or its autotune
    runs where the grid has none (those trained ~90% of the budget: a slightly pessimistic
    figure for that shape)."""
    out: dict = {}
    for arm, *_, bpb, shape in runs:
        out.setdefault(shape, {}).setdefault(arm.startswith("grid:"), []).append(bpb)
    return {k: statistics.mean(v.get(True) or v[False]) for k, v in out.items()}


def _cost(picks: dict[str, int], bpb: dict[str, float]) -> str:
    """Mean bpb of the picks over the best measured, among the picks that were measured."""
    known = [(bpb[k] / min(bpb.values()), n) for k, n in picks.items() if k in bpb]
    if not known:
        return "not measured"
    mean = sum(r * n for r, n in known) / sum(n for _, n in known)
    left = sum(picks.values()) - sum(n for _, n in known)
    return f"{mean:.3f}×" + (f" ({left} unmeasured)" if left else "")


def run(vocab: int = 4096, unique_tokens: float = 1.33e6):
    from pipeline.autotune.fit import MemoryModel
    from pipeline.autotune.plan import ScalingLaw, law_params, plan
    from pipeline.autotune.space import SPACES_DIR, load_space, model_config

    grids = _runs(json.loads((RESULTS / "quality-arms-cpu.json").read_text()))
    measured = {m: _by_shape(rs) for m, rs in grids.items()}
    space = load_space(SPACES_DIR / "cpu.yaml")
    model, each = _throughput(space, vocab)
    cands = planner_candidates(space, vocab)
    smallest = min(cands, key=lambda c: law_params(c[2]))[0]
    rows = []
    for r_n in R_N:
        law = ScalingLaw(r_star_params=r_n)
        row = {"R_N*": "none (D′ only)" if r_n > 1e6 else r_n}
        for minutes, runs in sorted(grids.items(), key=lambda kv: float(kv[0])):
            good, total = pairs_right(law, runs, unique_tokens)
            row[f"pairs right at {minutes} min"] = f"{good}/{total}"
        # the training time at which the plan stops choosing the smallest candidate
        row["grows past the smallest at (training s)"] = next(
            (s for s in range(300, 3600, 10)
             if plan(cands, model, MemoryModel(), s, unique_tokens, law)[0].key != smallest), "> 3600")
        # what each stored calibration's own model would choose: the same law under the noise of
        # one calibration (autotune's full runs train ~525 s at 10 minutes, ~790 s at 15, ~1600 s
        # at 30), and what those choices cost: the measured bpb of the chosen width and depth at
        # that budget over the best measured there (`_by_shape`)
        for minutes in ("10", "15", "30"):
            picks: dict = {}
            for m in each:
                c = plan(cands, m, MemoryModel(), TRAIN_S[minutes], unique_tokens, law)[0].candidate
                name = shape_name(model_config(c, vocab))
                picks[name] = picks.get(name, 0) + 1
            row[f"choices at {minutes} min"] = ", ".join(f"{k} ×{v}" for k, v in
                                                         sorted(picks.items(), key=lambda kv: -kv[1]))
            row[f"cost at {minutes} min"] = _cost(picks, measured.get(minutes, {}))
        rows.append(row)
    best = {m: min((r for r in rs if r[0].startswith("grid:")), key=lambda r: r[3])[0] for m, rs in grids.items()}

    def said(row):
        pairs = ", ".join(f"{v} at {k.split()[-2]} min" for k, v in row.items() if k.startswith("pairs"))
        cost = ", ".join(f"{v} at {k.split()[-2]} min" for k, v in row.items() if k.startswith("cost"))
        return (f"pairs right {pairs}; grows past the smallest at {row['grows past the smallest at (training s)']} s; "
                f"its choices' measured bpb over the best: {cost}")

    default = next(r for r in rows if r["R_N*"] == ScalingLaw().r_star_params)
    summary = (f"default law (R_N* {default['R_N*']:g}): {said(default)}; the paper's R_N* 5.3: {said(rows[0])}; "
               "the grid's best run: " + ", ".join(f"{arm_name(b)[5:]} at {m} min" for m, b in
                                                   sorted(best.items(), key=lambda kv: float(kv[0]))))
    return save("law_check", rows, summary, "the planner's choices cost ≤ 1.02× the best measured run", None,
                "python -m benchmarks run law_check", on=SESSIONS_1_8_CPU)


R_D = [1.5, 2.0, 3.0, 4.0, 8.0, 15.4]
VARIANT_R_N = [5.3, 8.0, 16.0, 30.0, 50.0, 100.0, 1e9]


def _comparisons() -> dict[str, list]:
    """{"sessions 1–8 eager 10 min": runs, "f25m17 compiled bf16 30 min": runs, …}: the grid and
    autotune runs of every stored comparison of every CPU (`<comparison>-arms-cpu-f<family>m<model>-…`),
    so the replay reads the same on any machine."""
    # every comparison `quality` stores, bf16 ones included (the product as it ships on a CPU with bf16)
    files = {"sessions 1–8 eager": RESULTS / "quality-arms-cpu.json"} | {
        path.name.split("-arms-cpu-")[1].split("-")[0] + " " + ("compiled" if compiled else "eager")
        + (" bf16" if name.endswith(BF16) else ""): path
        for name, compiled in all_comparisons().items() for path in sorted(RESULTS.glob(f"{name}-arms-cpu-f*.json"))}
    out = {}
    for label, path in files.items():
        if path.is_file():
            for minutes, runs in sorted(_runs(json.loads(path.read_text())).items(), key=lambda kv: float(kv[0])):
                out[f"{label} {minutes} min"] = runs
    return out


def _this_cpu_throughput(space, vocab: int):
    """A throughput model fitted on the 2-core EPYC's interleaved measurements of eight
    configurations (`predictor-cpu-f25m17-2c.json`, eager, as calibration trials run)."""
    from pipeline.autotune.fit import ThroughputModel

    path = RESULTS / "predictor-cpu-f25m17-2c.json"
    if not path.is_file():
        return None
    rows = [r for r in json.loads(path.read_text())["rows"] if r["config"].startswith("d")]
    knobs = [(int(r["config"].split()[0][1:]) // 64, int(r["config"].split()[1][1:])) for r in rows]
    return ThroughputModel.fit([shape_of(space, vocab, *k) for k in knobs], [r["alone_tokens_per_s"] for r in rows])


def capped_pick(law, runs, unique: float, offered: set) -> str:
    """What the planner would take among a comparison's grid shapes that the space `offered`, each
    at the tokens its grid run trained but no more than the law's data cap (the full run stops
    there), and what that costs: the choice's measured bpb over the best grid run's. A shape whose
    grid run went past the cap is measured by an autotune run of it stopped at this law's cap, or
    not at all."""
    grid: dict = {}  # shape -> its grid runs' (params, tokens, bpb)
    for arm, *run, shape in runs:
        if arm_name(arm).startswith("grid:"):
            grid.setdefault(shape, []).append(run)
    if not grid:
        return "no grid"
    mean = {k: [statistics.mean(column) for column in zip(*v)] for k, v in grid.items()}  # over seeds
    choosable = [k for k in mean if k in offered]
    if not choosable:
        return "no grid shape of the space"
    pick = min(choosable, key=lambda k: law.loss(mean[k][0], min(mean[k][1], law.useful_tokens(unique, mean[k][0])),
                                                   unique))
    params, tokens, bpb = mean[pick]
    cap = law.useful_tokens(unique, params)
    if tokens > cap:
        at_cap = [b for a, _, t, b, s in runs if arm_name(a).startswith("autotune") and s == pick
                  and abs(t / cap - 1) < 0.02]
        if not at_cap:
            return f"{pick} (past the cap, unmeasured)"
        bpb = statistics.mean(at_cap)
    return f"{pick} {bpb / min(v[2] for v in mean.values()):.3f}×"


def variants(unique_tokens: float = 1.33e6, vocab: int = 4096):
    """Every (R_D*, R_N*) of the grid on every stored comparison: pairs ordered as they finished,
    over all runs and over the runs whose shape the CPU space offers (the shapes the planner can
    choose: two or more layers, d_model / n_layers within the space's aspect_ratio rule), and the
    run the law ranks first among those; the grid shape it would choose with each run's tokens
    capped at its data cap, as the full run is (`capped_pick`: the closest replay of a choice,
    since the grid runs' tokens carry their measured compiled speed); then the planner's choice at
    the training time of a 10-, 15- and 30-minute autotune (525, 790, 1600 s) with this CPU's
    throughput model."""
    from pipeline.autotune.fit import MemoryModel
    from pipeline.autotune.plan import ScalingLaw, plan
    from pipeline.autotune.space import SPACES_DIR, load_space, model_config

    space = load_space(SPACES_DIR / "cpu.yaml")
    cands = planner_candidates(space, vocab)
    offered = {shape_name(shape.model) for *_, shape in cands}
    model = _this_cpu_throughput(space, vocab)
    comparisons = _comparisons()
    rows, right = [], []
    for r_d, r_n in itertools.product(R_D, VARIANT_R_N):
        law = ScalingLaw(r_star=r_d, r_star_params=r_n)
        row = {"R_D*": r_d, "R_N*": "none" if r_n > 1e6 else r_n}
        good = total = s_good = s_total = 0
        for label, runs in comparisons.items():
            g, t = pairs_right(law, runs, unique_tokens)
            mine = [r for r in runs if r[4] in offered]
            sg, st = pairs_right(law, mine, unique_tokens)
            first = min(mine, key=lambda r: law.loss(r[1], r[2], unique_tokens))
            row[label] = (f"{g}/{t} ({sg}/{st}), first {first[4]} {first[3] / min(r[3] for r in mine):.3f}×, "
                          f"capped pick {capped_pick(law, runs, unique_tokens, offered)}")
            good, total, s_good, s_total = good + g, total + t, s_good + sg, s_total + st
        row["pairs right"] = f"{good}/{total}"
        row["pairs right, space's shapes"] = f"{s_good}/{s_total}"
        if model is not None:
            row["plan at 10/15/30 min (this CPU)"] = " / ".join(
                shape_name(model_config(plan(cands, model, MemoryModel(), TRAIN_S[m], unique_tokens, law)[0].candidate,
                                        vocab)) for m in ("10", "15", "30"))
        rows.append(row)
        right.append(s_good)
    default = ScalingLaw()
    mine = next(r for r in rows if (r["R_D*"], r["R_N*"]) == (default.r_star, default.r_star_params))
    before = next(r for r in rows if (r["R_D*"], r["R_N*"]) == (15.4, 16.0))  # sessions 7-14's law
    tried = next(r for r in rows if (r["R_D*"], r["R_N*"]) == (3.0, 50.0))  # session 33's law
    best = rows[right.index(max(right))]

    def said(r):
        shapes = r["pairs right, space's shapes"]
        return (f"(R_D* {r['R_D*']:g}, R_N* {r['R_N*']}): pairs right {r['pairs right']}, "
                f"among the space's shapes {shapes}"
                + (f", plans {r['plan at 10/15/30 min (this CPU)']} at 10/15/30 min" if model else ""))
    summary = (f"default law {said(mine)}; R_N* 50 (session 33) {said(tried)}; "
               f"the law before session 15 {said(before)}; "
               f"best of {len(rows)} on the space's shapes {said(best)}; "
               + "; ".join(f"{k}: default {mine[k]}; R_N* 50 {tried[k]}; before {before[k]}" for k in comparisons))
    return save("law_variants", rows, summary, "— (evidence for the planner's law constants)", None,
                "python -m benchmarks run law_variants")


if __name__ == "__main__":
    run()
