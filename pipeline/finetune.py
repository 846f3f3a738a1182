"""`python -m pipeline.finetune --model models:/NAME@champion --data chat.jsonl --minutes M`:
instruction-tune a registered model with LoRA (default) or fully (`--full`), on the same
deadline-tied engine, checkpoints, resume and MLflow logging as pretraining; the result (LoRA
merged into the weights) is registered as a new model version with its lineage in tags."""
from __future__ import annotations

import time

STARTED = time.monotonic()

import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from pipeline.errors import ArgumentParser, UserError, cli, run_script  # noqa: E402
from pipeline.train.__main__ import add_budget_args, budget_from_args  # noqa: E402

def log(message: str) -> None:
    print(message, file=sys.stderr)


DEFAULT_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def resize_embeddings(model, vocab: int) -> None:
    """Grow the (tied) embedding to `vocab` rows; new rows start at the mean embedding, which
    keeps the new special tokens' initial logits ordinary instead of random."""
    import torch

    old = model.embed_tokens.weight.data
    if vocab <= old.shape[0]:
        return
    new = torch.nn.Embedding(vocab, old.shape[1]).to(old.device, old.dtype)
    new.weight.data[: old.shape[0]] = old
    fresh = vocab - old.shape[0]  # mean + a little noise, so the new tokens are distinguishable
    new.weight.data[old.shape[0]:] = old.mean(0, keepdim=True) + 0.1 * old.std() * torch.randn(fresh, old.shape[1])
    model.embed_tokens = new
    if model.lm_head is not None:
        head = torch.nn.Linear(old.shape[1], vocab, bias=False).to(old.device, old.dtype)
        head.weight.data[: old.shape[0]] = model.lm_head.weight.data
        head.weight.data[old.shape[0]:] = model.lm_head.weight.data.mean(0, keepdim=True)
        model.lm_head = head
    model.cfg.vocab_size = vocab


@cli
def main(argv=None):
    p = ArgumentParser(prog="python -m pipeline.finetune", description=__doc__)
    p.add_argument("--model", help="models:/NAME@ALIAS | models:/NAME/VERSION | PATH")
    p.add_argument("--data", help="chat JSONL file(s)/glob, or a hub dataset name")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted fine-tune on its deadline")
    add_budget_args(p, tokens=False)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    g.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--lora-targets", default=DEFAULT_TARGETS)
    p.add_argument("--no-mask", action="store_true", help="train on every token, not only the assistant's")
    p.add_argument("--lr", type=float, help="default 2e-3 with LoRA, 3e-4 full")
    p.add_argument("--model-name", help="registry name (default: <base name>-chat)")
    p.add_argument("--out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mlflow-uri")
    args = p.parse_args(argv)
    if args.resume:
        return _resume(args)
    if not args.model or not args.data:
        raise UserError("give --model and --data (or --resume RUN_DIR)")
    budget = budget_from_args(args)
    if budget is None:
        raise UserError("give a budget: --minutes M or --hours H")
    if not args.full and args.lora_rank <= 0:
        raise UserError(f"--lora-rank must be ≥ 1, got {args.lora_rank} (or use --full)")

    import dataclasses

    from model.config import ModelConfig
    from model.hf import load_native
    from model.lora import apply_lora
    from pipeline import chat, tracking
    from pipeline.data.cache import PreparedData
    from pipeline.data.tokenizer import load_saved, tokenizer_hash
    from pipeline.registry import resolve_model_dir
    from pipeline.train.config import RunConfig, TrainConfig
    from pipeline.train.run import new_run_dir, train_run

    tracking.setup(args.mlflow_uri)
    base_dir = resolve_model_dir(args.model)
    base = load_native(base_dir / "native")
    tok = load_saved(base_dir / "native")
    targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    if not args.full:  # fail on bad targets before reading any data
        import copy

        apply_lora(copy.deepcopy(base), targets, args.lora_rank, args.lora_alpha)
    conversations = chat.read_conversations(args.data, log=log)
    chat.add_chat_tokens(tok)
    run_dir = new_run_dir(args.out, prefix="finetune")
    data_dir = run_dir / "data"
    meta = chat.pack(tok, conversations, data_dir, val_fraction=0.1, seed=args.seed)
    meta["tokenizer_hash"] = tokenizer_hash(tok)
    (data_dir / "meta.json").write_text(json.dumps(meta, indent=2))
    if args.no_mask:
        for split in ("train", "val"):
            (data_dir / f"{split}.mask").unlink()
    data = PreparedData(data_dir, meta)

    vocab = -(-len(tok) // 64) * 64
    resize_embeddings(base, vocab)
    from safetensors.torch import save_file

    init = run_dir / "init.safetensors"
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(init))
    mcfg = dataclasses.replace(base.cfg, vocab_size=vocab, lora_rank=0 if args.full else args.lora_rank,
                               lora_alpha=args.lora_alpha, lora_targets=targets)
    seq = mcfg.max_seq_len
    tcfg = TrainConfig(lr=args.lr or (3e-4 if args.full else 2e-3), warmup_frac=0.05, seq_len=seq,
                       batch_tokens=max(seq, 4096), micro_batch=max(1, min(16, 4096 // seq)),
                       weight_decay=0.0 if not args.full else 0.1, eval_every_s=60, seed=args.seed)
    cfg = RunConfig(model=ModelConfig.from_dict(dataclasses.asdict(mcfg)), train=tcfg)
    mode = "full" if args.full else f"lora r={args.lora_rank} alpha={args.lora_alpha}"
    lineage = {"base_model": args.model, "finetune": mode, "data": args.data, "model_name": args.model_name}
    (run_dir / "finetune.json").write_text(json.dumps(lineage))
    from pipeline.train.engine import Interrupted

    try:
        result, run_id = train_run(cfg, budget, run_dir, mlflow_uri=args.mlflow_uri, data=data, log=log,
                                   budget_started=STARTED, model_init=init, fit_vocab_to_data=False,
                                   tags={"pufferfish.kind": "finetune", "base_model": args.model,
                                         "finetune": mode, "data.path": args.data})
    except Interrupted:
        print(f"interrupted; resume with: python -m pipeline.finetune --resume {run_dir}", file=sys.stderr)
        sys.exit(130)
    _register(result, run_id, lineage, meta)


def _register(result, run_id, lineage: dict, meta: dict) -> None:
    from pipeline.registry import register

    base = lineage["base_model"]
    base_name = base.split("/")[1].split("@")[0] if base.startswith("models:/") else Path(base).name
    name = lineage.get("model_name") or f"{base_name}-chat"
    reg = register(Path(result.model_dir), name, run_id=run_id, val_bpb=result.final_val_bpb,
                   data_fingerprint=f"chat:{meta['splits']['val']['tokens']}:{Path(lineage['data']).name}",
                   tokenizer_hash=meta["tokenizer_hash"],
                   tags={"base_model": base, "finetune": lineage["finetune"], "data": lineage["data"],
                         "val_loss": f"{result.final_val_loss:.6f}"},
                   description=f"{lineage['finetune']} fine-tune of {base} on {lineage['data']}", log=log)
    print(f"validation loss on held-out conversations: {result.final_val_loss:.4f}", file=sys.stderr)
    print(f"chat with it: python -m pipeline.generate --model models:/{reg.name}@champion --chat")


def _resume(args) -> None:
    from pipeline import tracking
    from pipeline.data.cache import PreparedData
    from pipeline.train.engine import Interrupted
    from pipeline.train.run import load_resume, train_run
    from pipeline.train.schedule import Budget

    run_dir = Path(args.resume).resolve()
    if not (run_dir / "finetune.json").is_file():
        raise UserError(f"{run_dir} is not a fine-tuning run folder (no finetune.json)")
    cfg, state = load_resume(run_dir, None)
    lineage = json.loads((run_dir / "finetune.json").read_text())
    meta = json.loads((run_dir / "data" / "meta.json").read_text())
    tracking.setup(args.mlflow_uri)
    try:
        result, run_id = train_run(cfg, Budget(seconds=state["budget_seconds"]), run_dir, resume=True,
                                   mlflow_uri=args.mlflow_uri, run_id=state.get("mlflow_run_id"),
                                   data=PreparedData(run_dir / "data", meta), log=log, budget_started=STARTED)
    except Interrupted as exc:
        print(str(exc).replace("pipeline.train", "pipeline.finetune"), file=sys.stderr)
        sys.exit(130)
    _register(result, run_id, lineage, meta)


if __name__ == "__main__":
    run_script(main)
