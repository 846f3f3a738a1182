"""The headline: for the same budget, hardware and data, validation bpb of
(a) the autotuned model, (b) the predecessor's fixed-table configuration for that budget
(its data share applied), (c) a nanochat-style depth heuristic (tokens ≈ 10.5 × params),
each trained for the same wall-clock by the same engine and evaluated on the same split."""
from __future__ import annotations

import json
import subprocess
import sys
import time
import tempfile
from pathlib import Path

import yaml

from benchmarks.common import save

GOAL = "autotune ≤ 0.90 × table and ≤ 1.02 × the heuristic"
# ../shared/docs/field-facts.md: target hours → (layers, width, data share)
TABLE = [(0.01, 1, 64, None), (0.1, 4, 256, 0.05), (0.5, 12, 512, 0.10), (1, 20, 768, 0.20),
         (3, 30, 768, 0.30), (6, 30, 768, 0.50), (12, 30, 768, 0.70), (float("inf"), 30, 768, 0.90)]


def table_config(hours: float, vocab: int) -> dict:
    for limit, layers, width, share in TABLE:
        if hours < limit:
            break
    return {"model": {"vocab_size": vocab, "d_model": width, "n_layers": layers, "n_heads": 16 if width >= 256 else 4,
                      "n_kv_heads": 4 if width >= 256 else 1, "ffn_hidden": 1024, "max_seq_len": 256,
                      "rope_theta": 1e5, "norm_eps": 1e-6},
            "train": {"lr": 1e-3, "warmup_frac": 0.01, "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95,
                      "batch_tokens": 8192, "micro_batch": 16, "seq_len": 256, "data_fraction": share or 0.001}}


def nanochat_config(seconds: float, data, vocab: int) -> tuple[dict, list]:
    """Largest depth whose tokens-at-10.5×-params fit the time, from a short measured trial per depth."""
    from model.config import ModelConfig, param_counts
    from pipeline.autotune.calibrate import run_candidate
    from pipeline.autotune.space import SearchSpace

    choices = {"n_heads": [1], "head_dim": [64], "n_layers": [1], "kv_ratio": [1], "ffn_ratio": [4.0],
               "n_experts": [0], "top_k": [2], "pos_encoding": ["rope"], "activation_checkpointing": [False],
               "seq_len": [256], "micro_batch": [16], "compile": [False], "precision": ["fp32"]}
    rules = {"batch_tokens": 8192, "lr": 0.003, "lr_ref_width": 128, "warmup_frac": 0.02, "schedule": "linear"}
    space = {"name": "nanochat", "choices": choices, "rules": rules}
    best, trace = 1, []
    for depth in range(1, 9):
        cand = {k: v[0] for k, v in choices.items()} | {"n_heads": depth, "n_layers": depth}
        m = run_candidate(cand, {"space": space, "data_folder": str(data.folder), "window_s": 4, "max_steps": 12,
                                 "full_seconds": seconds, "unique_tokens": data.unique_train_tokens})
        cfg = ModelConfig(vocab_size=vocab, d_model=64 * depth, n_layers=depth, n_heads=depth, ffn_hidden=256 * depth)
        n = param_counts(cfg)["active_non_embedding"] + vocab * cfg.d_model
        affordable = m["tokens_per_s"] * seconds
        trace.append({"depth": depth, "params": n, "tokens_per_s": round(m["tokens_per_s"]),
                      "affordable_tokens": round(affordable), "wanted_tokens": round(10.5 * n)})
        if affordable >= 10.5 * n:
            best = depth
    d = best
    return ({"model": {"vocab_size": vocab, "d_model": 64 * d, "n_layers": d, "n_heads": d, "ffn_hidden": 256 * d,
                       "max_seq_len": 256},
             "train": {"lr": 0.003 * 128 / (64 * d), "batch_tokens": 8192, "micro_batch": 16, "seq_len": 256}}, trace)


def _train(cfg: dict, minutes: float, out: Path) -> float:
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.yaml").write_text(yaml.safe_dump(cfg))
    res = subprocess.run([sys.executable, "-m", "pipeline.train", "--config", str(out / "run.yaml"),
                          "--minutes", str(minutes), "--out", str(out / "run")], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-2000:])
    return json.loads((out / "run" / "summary.json").read_text())["result"]["final_val_bpb"]


def run(minutes=(10,)):
    from pipeline.data import DataSettings, prepare

    data = prepare(DataSettings(), log=lambda *_: None)
    vocab = -(-data.vocab_size // 64) * 64
    tmp = Path(tempfile.mkdtemp())
    rows = []
    for m in minutes:
        started = time.monotonic()
        auto = subprocess.run([sys.executable, "-m", "pipeline.autotune", "--minutes", str(m), "--yes",
                               "--out", str(tmp / f"auto{m}"), "--model-name", "bench-quality"],
                              capture_output=True, text=True)
        if auto.returncode != 0:
            raise RuntimeError(auto.stderr[-2000:])
        auto_wall = time.monotonic() - started
        state = json.loads((tmp / f"auto{m}" / "pipeline.json").read_text())
        auto_bpb = state["stages"]["train"]["val_bpb"]
        table_bpb = _train(table_config(m / 60, vocab), m, tmp / f"table{m}")
        nano_cfg, trace = nanochat_config(m * 60 * 0.9, data, vocab)
        nano_bpb = _train(nano_cfg, m, tmp / f"nano{m}")
        rows.append({"budget_min": m, "autotune_bpb": round(auto_bpb, 4), "table_bpb": round(table_bpb, 4),
                     "nanochat_bpb": round(nano_bpb, 4), "autotune_over_table": round(auto_bpb / table_bpb, 4),
                     "autotune_over_nanochat": round(auto_bpb / nano_bpb, 4),
                     "autotune_wall_over_budget": round(auto_wall / (m * 60), 4),
                     "autotune_timings_s": {k: round(v, 1) for k, v in state["timings"].items()},
                     "autotune_choice": state["stages"]["plan"]["chosen"],
                     "table_choice": table_config(m / 60, vocab)["model"] | {"data_fraction": table_config(m / 60, vocab)["train"]["data_fraction"]},
                     "nanochat_choice": nano_cfg["model"], "nanochat_depth_trials": trace})
    ok = all(r["autotune_over_table"] <= 0.90 and r["autotune_over_nanochat"] <= 1.02 for r in rows)
    summary = "; ".join(f"{r['budget_min']} min: autotune {r['autotune_bpb']} bpb vs table {r['table_bpb']} "
                        f"({r['autotune_over_table']:.3f}×) vs nanochat heuristic {r['nanochat_bpb']} "
                        f"({r['autotune_over_nanochat']:.3f}×)" for r in rows)
    return save("quality", rows, summary, GOAL, ok, "python -m benchmarks run quality")
