"""Throughput and memory models fitted to calibration trials.

Throughput: seconds per token as a non-negative combination of physically meaningful terms,

    s/token = c_mm · F_mm + c_narrow · F_mm / d_model + c_attn · F_attn
            + c_layer · L / micro_tokens + c_step / micro_tokens

F_mm: matmul FLOPs/token (6·N_active incl. the head); F_attn: attention FLOPs/token (12·L·H·hd·T);
the F_mm/d term lets narrow models run at a lower effective rate than wide ones; the overheads
are per layer and per micro-step (kernel launches, Python), amortised over the tokens in a
micro-batch. (The optimizer step costs ∝ N per global batch; with the batch fixed by the space that
is proportional to F_mm, so it is folded into c_mm rather than fitted as an unidentifiable term.)
Fitted by non-negative least squares on relative errors, with fewer terms when there are few trials.

Memory: bytes = fixed + s_p · 16·N (fp32 weights, grads, AdamW moments) + s_a · activations
+ s_l · logits, with analytical activation sizes; the scales are fitted on GPU trials, where
peak allocated memory is measured exactly, and left at 1 elsewhere.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy.optimize import nnls

from model.config import ModelConfig, param_counts

TERMS = ["mm", "narrow", "attn", "layer", "step"]
# Which terms to fit for a given number of trials (more terms need more measurements). From two
# trials on, the width term comes second, before any overhead: on a CPU, narrow matmuls running at
# a lower FLOP rate is the largest effect after the FLOPs themselves. Fitted on every 2-, 3- and
# 4-trial subset of eight stored CPU calibrations and predicting the other configurations, this
# errs 19/13/11% (median) where the forms before it (`mm` from one trial, `mm + step` from three)
# erred 34/22/18%. On eight Zen 3 calibrations it is level with `mm + step` from two trials and
# 1.2-1.3 points behind from three and four (14/13% against 13/12%). But calibration starts with
# a ladder of widths, and on the ladder's first 2/3/4 rungs (one trial per width) it is the best
# form on the old CPU, and on 14 Zen 3 calibrations 14/9.5/7.7% against `mm + step`'s 16/9.1/8.3%
# (`mm + narrow + step` leads there at three rungs, 8.2%). On a third CPU (Zen 4, bf16; 4
# calibrations) it is the best form at every count, on the ladder
# and on every subset (`python -m benchmarks run predictor_few`; benchmarks/notes/predictor_few.md,
# predictor.md).
TERMS_BY_COUNT = [(7, TERMS), (5, ["mm", "narrow", "attn", "step"]), (2, ["mm", "narrow"]), (1, ["mm"])]


@dataclass
class Shape:
    """What the models need to know about a candidate (all derivable from its RunConfig)."""
    model: ModelConfig
    seq_len: int
    micro_batch: int
    batch_tokens: int

    @classmethod
    def of(cls, cfg) -> "Shape":
        return cls(cfg.model, cfg.train.seq_len, cfg.train.micro_batch,
                   max(cfg.train.batch_tokens, cfg.train.micro_batch * cfg.train.seq_len))


def features(s: Shape) -> dict[str, float]:
    m = s.model
    n_mm = param_counts(m)["active_non_embedding"] + m.vocab_size * m.d_model
    f_mm = 6.0 * n_mm
    f_attn = 12.0 * m.n_layers * m.n_heads * m.head_dim * s.seq_len
    micro_tokens = s.micro_batch * s.seq_len
    return {"mm": f_mm / 1e9, "narrow": f_mm / 1e9 / m.d_model * 64, "attn": f_attn / 1e9,
            "layer": m.n_layers / micro_tokens, "step": 1.0 / micro_tokens}


@dataclass
class ThroughputModel:
    terms: list[str] = field(default_factory=lambda: ["mm"])
    coef: list[float] = field(default_factory=lambda: [1e-3])

    def seconds_per_token(self, s: Shape) -> float:
        f = features(s)
        return sum(c * f[t] for t, c in zip(self.terms, self.coef))

    def tokens_per_s(self, s: Shape) -> float:
        return 1.0 / max(self.seconds_per_token(s), 1e-12)

    @classmethod
    def fit(cls, shapes: list[Shape], tokens_per_s: list[float]) -> "ThroughputModel":
        if not shapes:
            raise ValueError("no successful calibration trials to fit a throughput model on")
        n = len(shapes)
        terms = terms_for(shapes)
        y = np.array([1.0 / v for v in tokens_per_s])
        x = np.array([[features(s)[t] for t in terms] for s in shapes])
        # Relative error: divide each row by its target, so fast and slow configs weigh the same.
        coef, _ = nnls(x / y[:, None], np.ones(n))
        if not np.any(coef > 0):  # degenerate data: fall back to a pure FLOP-rate model
            terms, coef = ["mm"], np.array([float(np.median(y / x[:, 0]))])
        return cls(terms=list(terms), coef=[float(c) for c in coef])

    def to_dict(self) -> dict:
        return asdict(self)


def terms_for(shapes: list[Shape]) -> list[str]:
    """The terms `shapes` can identify: by their number, less the width term when they all have
    one width (there it is the FLOP term over a constant), whose place the step overhead takes."""
    terms = next(t for count, t in TERMS_BY_COUNT if len(shapes) >= count)
    if "narrow" in terms and len({s.model.d_model for s in shapes}) == 1:
        terms = [t for t in terms if t != "narrow"]
        if "step" not in terms:
            terms.append("step")
    return terms


def leave_one_out_predictions(shapes: list[Shape], tokens_per_s: list[float]) -> list[float]:
    """Each trial's tokens/s as predicted by a model fitted on the other trials."""
    out = []
    for i in range(len(shapes)):
        rest = [j for j in range(len(shapes)) if j != i] or [i]
        model = ThroughputModel.fit([shapes[j] for j in rest], [tokens_per_s[j] for j in rest])
        out.append(model.tokens_per_s(shapes[i]))
    return out


def leave_one_out_error(shapes: list[Shape], tokens_per_s: list[float]) -> list[float]:
    """Absolute relative error of each leave-one-out prediction (empty with fewer than 2 trials)."""
    if len(shapes) < 2:
        return []
    preds = leave_one_out_predictions(shapes, tokens_per_s)
    return [abs(p / t - 1.0) for p, t in zip(preds, tokens_per_s)]


# --- memory --------------------------------------------------------------------------------

def memory_terms(s: Shape, amp: bool) -> dict[str, float]:
    m = s.model
    n = param_counts(m)["total"]
    act_bytes = 2 if amp else 4
    tokens = s.micro_batch * s.seq_len
    # Per token per layer ≈ 17·d + 3·ffn activations kept for backward (norms, q/k/v, attention
    # output, residuals, SwiGLU branches), at the compute precision; the attention matrix itself
    # is not stored (SDPA's fused kernels on GPU; on CPU its peak is one layer's worth).
    per_layer = (17 * m.d_model + 3 * (m.moe_ffn_hidden or m.ffn_hidden)) * act_bytes
    if m.activation_checkpointing:
        acts = tokens * (m.n_layers * m.d_model * act_bytes + per_layer)
    else:
        acts = tokens * m.n_layers * per_layer
    attn_peak = s.micro_batch * m.n_heads * s.seq_len * s.seq_len * 4
    logits = tokens * m.vocab_size * (4 + 4 + act_bytes)  # fp32 logits, their grad, the compute copy
    return {"params": 16.0 * n, "acts": float(acts + attn_peak), "logits": float(logits)}


@dataclass
class MemoryModel:
    fixed: float = 0.0
    scale: dict = field(default_factory=lambda: {"params": 1.0, "acts": 1.0, "logits": 1.0})
    amp: bool = False
    fitted: bool = False

    def bytes(self, s: Shape, shards: int = 1) -> float:
        """Peak bytes on one device; `shards` > 1: FSDP over that many workers (weights,
        gradients and optimizer state divided among them, plus two blocks' weights gathered
        at a time — the one computing and the one prefetched)."""
        t = memory_terms(s, self.amp)
        if shards > 1:
            m = s.model
            block = (param_counts(m)["total"] - m.vocab_size * m.d_model) / max(1, m.n_layers)
            t["params"] = t["params"] / shards + 2 * 4 * block
        return self.fixed + sum(self.scale[k] * t[k] for k in t)

    @classmethod
    def fit(cls, shapes: list[Shape], peak_bytes: list[float], amp: bool) -> "MemoryModel":
        if len(shapes) < 4:
            return cls(amp=amp)
        keys = ["params", "acts", "logits"]
        x = np.array([[1.0] + [memory_terms(s, amp)[k] for k in keys] for s in shapes])
        y = np.array(peak_bytes, dtype=float)
        coef, _ = nnls(x / y[:, None], np.ones(len(y)))
        if coef[1] <= 0:
            return cls(amp=amp)
        return cls(fixed=float(coef[0]), scale=dict(zip(keys, map(float, coef[1:]))), amp=amp, fitted=True)

    def to_dict(self) -> dict:
        return asdict(self)


def median_and_max(errors: list[float]) -> tuple[float, float]:
    if not errors:
        return math.nan, math.nan
    return float(np.median(errors)), float(np.max(errors))
