"""Search spaces as data (`search_spaces/*.yaml`): choices per knob plus rules that derive the
rest (width from heads × head dim, KV heads from a ratio, learning rate from width).

Every combination of choices is a valid model by construction (the derived fields are rounded
to valid values), so Optuna can sample knobs independently and the planner can enumerate the
full product without a constraint solver. One optional rule narrows the product: `aspect_ratio:
[lo, hi]` keeps the candidates whose d_model / n_layers lies in that range (`SearchSpace.allows`);
the calibration answers a suggestion outside it without running a trial.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from model.config import ConfigError, ModelConfig
from pipeline.data.cache import DataSettings
from pipeline.train.config import RunConfig, TrainConfig

SPACES_DIR = Path(__file__).resolve().parents[2] / "search_spaces"
MODEL_KNOBS = {"n_heads": int, "head_dim": int, "n_layers": int, "kv_ratio": int, "ffn_ratio": float,
               "n_experts": int, "top_k": int, "pos_encoding": str, "activation_checkpointing": bool}
TRAIN_KNOBS = {"seq_len": int, "micro_batch": int, "compile": bool, "precision": str}
RULES = {"batch_tokens": int, "lr": float, "lr_ref_width": int, "warmup_frac": float, "schedule": str}
# compile_full_run: trials run as the space's `compile` choice says, the full run compiled. On a
# CPU a compile costs 7-11 s per shape (Inductor's C++ kernels), more than a 3-6 s trial window,
# and pays back 1.2-1.4x in steady speed (benchmarks/results/cpu_compile-*.json).
OPTIONAL_RULES = {"compile_full_run": bool}
# aspect_ratio: [lo, hi] bounds on d_model / n_layers. The scaling law sees parameters and tokens,
# not shape; where runs show that shape matters at equal parameters (on 2 CPU cores, wide-shallow
# d192-L2 lost to deeper d128-L3/L4 at every budget), the space rules those shapes out instead.
SHAPE_RULES = {"aspect_ratio"}


@dataclass
class SearchSpace:
    name: str
    choices: dict[str, list]       # knob → allowed values (model and train knobs together)
    rules: dict
    description: str = ""
    path: str | None = None

    @property
    def knobs(self) -> list[str]:
        return list(self.choices)

    def allows(self, cand: dict) -> bool:
        """Whether the space's shape rules admit this combination of choices."""
        bounds = self.rules.get("aspect_ratio")
        return not bounds or bounds[0] <= aspect_ratio(cand) <= bounds[1]

    def candidates(self) -> list[dict]:
        keys = self.knobs
        out = []
        for values in itertools.product(*(self.choices[k] for k in keys)):
            cand = dict(zip(keys, values))
            if cand["n_experts"] == 0:
                if cand["top_k"] != self.choices["top_k"][0]:
                    continue  # top_k is meaningless for dense models: keep one copy
            if self.allows(cand):
                out.append(cand)
        return out

    def __len__(self) -> int:
        return len(self.candidates())


def width(cand: dict) -> int:
    """A candidate's d_model: its heads times their width."""
    return cand["n_heads"] * cand["head_dim"]


def aspect_ratio(cand: dict) -> float:
    """d_model / n_layers: 64 in nanochat's depth rule, 64 in GPT-2 small (768 / 12)."""
    return width(cand) / cand["n_layers"]


def _fail(where: str, message: str):
    raise ConfigError(f"search space {where}: {message}")


def load_space(path: str | Path) -> SearchSpace:
    path = Path(path)
    if not path.is_file():
        alt = SPACES_DIR / f"{path}.yaml"
        if alt.is_file():
            path = alt
        else:
            names = ", ".join(sorted(p.stem for p in SPACES_DIR.glob("*.yaml")))
            raise ConfigError(f"search space {path} not found (built-in spaces: {names})")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        _fail(str(path), f"not valid YAML ({str(exc).splitlines()[0]})")
    if not isinstance(raw, dict) or not raw:
        _fail(str(path), "is empty; it needs model, train and rules sections")
    unknown = sorted(set(raw) - {"name", "description", "model", "train", "rules"})
    if unknown:
        _fail(str(path), f"unknown sections {', '.join(unknown)} (known: name, description, model, train, rules)")
    choices: dict[str, list] = {}
    for section, knobs in (("model", MODEL_KNOBS), ("train", TRAIN_KNOBS)):
        block = raw.get(section) or {}
        if not isinstance(block, dict):
            _fail(str(path), f"{section} must be a mapping of knob → list of choices")
        bad = sorted(set(block) - set(knobs))
        if bad:
            _fail(str(path), f"unknown {section} knob(s) {', '.join(bad)} (known: {', '.join(knobs)})")
        for knob, kind in knobs.items():
            values = block.get(knob)
            if values is None:
                _fail(str(path), f"{section}.{knob} is missing")
            if not isinstance(values, list) or not values:
                _fail(str(path), f"{section}.{knob} must be a non-empty list, got {values!r}")
            for v in values:
                if kind is float and isinstance(v, int) and not isinstance(v, bool):
                    continue
                if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
                    _fail(str(path), f"{section}.{knob} value {v!r} is not {kind.__name__}")
                if kind in (int, float) and v <= 0 and knob != "n_experts":
                    _fail(str(path), f"{section}.{knob} value {v!r} must be positive")
            choices[knob] = values
    rules = raw.get("rules") or {}
    bad = sorted(set(rules) - set(RULES) - set(OPTIONAL_RULES) - SHAPE_RULES)
    if bad:
        _fail(str(path), f"unknown rules {', '.join(bad)} "
                         f"(known: {', '.join([*RULES, *OPTIONAL_RULES, *sorted(SHAPE_RULES)])})")
    for rule, kind in OPTIONAL_RULES.items():
        if rule in rules and not isinstance(rules[rule], kind):
            _fail(str(path), f"rules.{rule} value {rules[rule]!r} is not {kind.__name__}")
    missing = sorted(set(RULES) - set(rules))
    if missing:
        _fail(str(path), f"rules.{missing[0]} is missing")
    moe = [e for e in choices["n_experts"] if e > 0]
    if moe and max(choices["top_k"]) > min(moe):
        _fail(str(path), f"model.top_k choice {max(choices['top_k'])} exceeds the smallest expert "
                         f"count {min(moe)}")
    for p in choices["pos_encoding"]:
        if p not in ("rope", "nope"):
            _fail(str(path), f"model.pos_encoding value {p!r} must be rope or nope")
    for p in choices["precision"]:
        if p not in ("auto", "fp32", "bf16", "fp16"):
            _fail(str(path), f"train.precision value {p!r} must be auto, fp32, bf16 or fp16")
    bounds = rules.get("aspect_ratio")
    if bounds is not None and not (isinstance(bounds, list) and len(bounds) == 2
                                   and all(isinstance(b, (int, float)) and not isinstance(b, bool) and b > 0
                                           for b in bounds) and bounds[0] <= bounds[1]):
        _fail(str(path), f"rules.aspect_ratio must be [low, high], two positive numbers with low ≤ high "
                         f"(d_model / n_layers), got {bounds!r}")
    space = SearchSpace(name=raw.get("name") or path.stem, choices=choices, rules=rules,
                        description=raw.get("description", ""), path=str(path))
    if not space.candidates():
        ratios = sorted(h * w / n for h in choices["n_heads"] for w in choices["head_dim"] for n in choices["n_layers"])
        _fail(str(path), f"rules.aspect_ratio {bounds} leaves no candidate (the choices give d_model / n_layers "
                         f"from {ratios[0]:.3g} to {ratios[-1]:.3g})")
    # Build one candidate so rule errors surface now, not in a Ray worker.
    to_run_config(space.candidates()[0], space, vocab_size=256)
    return space


def default_space_path(kind: str) -> Path:
    return SPACES_DIR / ("gpu.yaml" if kind == "cuda" else "cpu.yaml")


def _largest_divisor_at_most(n: int, limit: float) -> int:
    return max(d for d in range(1, n + 1) if n % d == 0 and d <= max(1, limit))


def model_config(cand: dict, vocab_size: int) -> ModelConfig:
    d_model = width(cand)
    ffn = int(math.ceil(cand["ffn_ratio"] * d_model / 32) * 32)
    return ModelConfig(
        vocab_size=vocab_size, d_model=d_model, n_layers=cand["n_layers"], n_heads=cand["n_heads"],
        n_kv_heads=_largest_divisor_at_most(cand["n_heads"], cand["n_heads"] / cand["kv_ratio"]),
        head_dim=cand["head_dim"], ffn_hidden=ffn, max_seq_len=cand["seq_len"],
        pos_encoding=cand["pos_encoding"], n_experts=cand["n_experts"],
        top_k=min(cand["top_k"], max(1, cand["n_experts"])),
        activation_checkpointing=cand["activation_checkpointing"])


def to_run_config(cand: dict, space: SearchSpace, vocab_size: int, data: DataSettings | None = None,
                  seed: int = 0) -> RunConfig:
    r = space.rules
    mcfg = model_config(cand, -(-vocab_size // 64) * 64)
    lr = r["lr"] * r["lr_ref_width"] / mcfg.d_model  # ~1/width (μP-style) transfer across widths
    batch = max(r["batch_tokens"], cand["micro_batch"] * cand["seq_len"])
    tcfg = TrainConfig(lr=lr, schedule=r["schedule"], warmup_frac=r["warmup_frac"], batch_tokens=batch,
                       micro_batch=cand["micro_batch"], seq_len=cand["seq_len"],
                       compile=cand["compile"], precision=cand["precision"], seed=seed)
    cfg = RunConfig(model=mcfg, train=tcfg, data=data or DataSettings())
    cfg.validate()
    return cfg


# The fewest optimizer steps a full run should take. A GPU space's 262k-token batch would give a
# data-limited run on the embedded corpus (16.8M useful tokens) 64 steps; the CPU space's 10-minute
# runs take ~1,800. Below this the batch is halved (never under one micro-batch), with the learning
# rate scaled by the square root of the batch ratio (the square-root rule for Adam: Malladi et al.
# 2022). Not measured on the runs here: a floor against a degenerate schedule, not a tuned batch.
MIN_STEPS = 500


def fit_batch_to_tokens(cfg: RunConfig, tokens: float) -> RunConfig:
    """Halve the global batch until `tokens` make at least MIN_STEPS optimizer steps."""
    t = cfg.train
    smallest = t.micro_batch * t.seq_len
    batch = t.batch_tokens
    while batch // 2 >= smallest and tokens / batch < MIN_STEPS:
        batch //= 2
    if batch < t.batch_tokens:
        t.lr *= (batch / t.batch_tokens) ** 0.5
        t.batch_tokens = batch
    return cfg


def full_run_config(cand: dict, space: SearchSpace, vocab_size: int, data: DataSettings | None = None,
                    seed: int = 0, tokens: float | None = None) -> RunConfig:
    """The full run's config: the candidate's, compiled if the space's `compile_full_run` says so,
    and with a batch small enough for the planned `tokens` to make MIN_STEPS steps."""
    cfg = to_run_config(cand, space, vocab_size, data, seed)
    cfg.train.compile = cfg.train.compile or bool(space.rules.get("compile_full_run"))
    return fit_batch_to_tokens(cfg, tokens) if tokens else cfg


def candidate_key(cand: dict) -> str:
    return ",".join(f"{k}={cand[k]}" for k in sorted(cand))
