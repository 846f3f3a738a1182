"""Chat data for fine-tuning: reading conversations, the chat template, and loss masks.

Template (special tokens are added to the tokenizer, and the template is stored with it as a
Jinja `chat_template`, so `transformers` users get the same format):

    <|system|>\\n{content}<|end|>\\n<|user|>\\n{content}<|end|>\\n<|assistant|>\\n{content}<|end|>\\n

Only assistant content and its closing <|end|> are trained on (the mask); <|end|> is where
generation stops in `generate --chat`.
"""
from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import numpy as np

from pipeline.errors import UserError

ROLES = ("system", "user", "assistant")
END = "<|end|>"
SPECIAL = [f"<|{r}|>" for r in ROLES] + [END]
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
# More than this share of unreadable lines means the file is not chat JSONL at all.
MAX_BAD_SHARE = 0.5


def add_chat_tokens(tok) -> int:
    """Register the template's special tokens and the template itself; returns tokens added."""
    added = tok.add_special_tokens({"additional_special_tokens": SPECIAL})
    tok.chat_template = TEMPLATE
    return added


def encode_chat(tok, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """Token ids and loss mask (1 = assistant content or its <|end|>) for one conversation."""
    ids, mask = [], []
    end_id = tok.convert_tokens_to_ids(END)

    def add(text_ids, trained):
        ids.extend(text_ids)
        mask.extend([int(trained)] * len(text_ids))

    for m in messages:
        add(tok.convert_tokens_to_ids([f"<|{m['role']}|>"]) + tok("\n", add_special_tokens=False)["input_ids"], False)
        assistant = m["role"] == "assistant"
        add(tok(m["content"], add_special_tokens=False)["input_ids"], assistant)
        add([end_id], assistant)
        add(tok("\n", add_special_tokens=False)["input_ids"], False)
    if add_generation_prompt:
        add(tok.convert_tokens_to_ids(["<|assistant|>"]) + tok("\n", add_special_tokens=False)["input_ids"], False)
    return ids, mask


def _normalise(row: dict) -> list[dict] | None:
    if isinstance(row.get("messages"), list):
        msgs = [m for m in row["messages"] if isinstance(m, dict)]
        if not all(m.get("role") in ROLES and isinstance(m.get("content"), str) for m in msgs):
            return None
        return [{"role": m["role"], "content": m["content"]} for m in msgs]
    if isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
        return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
    return None


def read_conversations(spec: str, log=print) -> list[list[dict]]:
    """Conversations from local JSONL files/globs, or a hub dataset name (same conventions as
    pretraining data). Bad lines are skipped and counted (refused when most are bad)."""
    files = sorted(glob.glob(os.path.expanduser(spec))) if any(c in spec for c in "*?[") else [spec]
    if files and all(Path(f).is_file() for f in files):
        rows, bad = [], []
        for f in files:
            for n, line in enumerate(Path(f).read_text(encoding="utf-8", errors="replace").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    conv = _normalise(row) if isinstance(row, dict) else None
                except json.JSONDecodeError:
                    conv = None
                if conv is None:
                    bad.append(f"{Path(f).name}:{n}")
                else:
                    rows.append(conv)
        total = len(rows) + len(bad)
        if total == 0:
            raise UserError(f"--data {spec} holds no conversations")
        if bad and len(bad) / total > MAX_BAD_SHARE:
            raise UserError(f"--data {spec}: {len(bad)} of {total} lines are not chat JSONL "
                            f"(first: {', '.join(bad[:5])}); each line needs 'messages' or 'prompt'/'completion'")
        if bad:
            log(f"warning: skipped {len(bad)} malformed lines ({', '.join(bad[:5])}{' …' if len(bad) > 5 else ''})")
    elif Path(spec).suffix or os.sep in spec:
        raise UserError(f"--data {spec}: no such file; pass chat JSONL files")
    else:
        rows = _hub_conversations(spec)
    kept = [c for c in rows if any(m["role"] == "assistant" and m["content"].strip() for m in c)]
    if len(kept) < len(rows):
        log(f"warning: skipped {len(rows) - len(kept)} conversations with no assistant turn")
    if len(kept) < 2:
        raise UserError(f"--data {spec} has {len(kept)} usable conversation(s); fine-tuning needs at least 2 "
                        "(one held out for validation) with an assistant turn")
    return kept


def _hub_conversations(name: str) -> list[list[dict]]:
    from pipeline.data.sources import hub_reachable, hub_unreachable_error

    if not hub_reachable():
        raise hub_unreachable_error(f"dataset {name}", "pass local chat JSONL files with --data PATH")
    import datasets

    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as exc:
        raise UserError(f"dataset {name} could not be loaded ({str(exc).splitlines()[0][:160]}); "
                        "pass local chat JSONL files with --data PATH") from exc
    return [c for c in (_normalise(dict(r)) for r in ds) if c]


def pack(tok, conversations: list[list[dict]], out: Path, val_fraction: float, seed: int) -> dict:
    """Write train/val token arrays and masks (conversation-level split) plus meta.json."""
    rng = np.random.default_rng(seed)
    is_val = rng.random(len(conversations)) < val_fraction
    is_val[rng.integers(len(conversations))] = True
    if is_val.all():
        is_val[0] = False
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out / "tokenizer")
    eos = tok.eos_token_id
    dtype = np.uint16 if len(tok) <= 65535 else np.uint32
    splits = {}
    for split, flag in (("train", False), ("val", True)):
        ids, mask, n_bytes, n = [], [], 0, 0
        for conv, v in zip(conversations, is_val):
            if v != flag:
                continue
            i, m = encode_chat(tok, conv)
            ids += i + [eos]
            mask += m + [0]
            n_bytes += sum(len(x["content"].encode()) for x in conv if x["role"] == "assistant")
            n += 1
        np.asarray(ids, dtype=dtype).tofile(out / f"{split}.bin")
        np.asarray(mask, dtype=np.uint8).tofile(out / f"{split}.mask")
        trained = max(1, int(sum(mask)))
        # bytes per *trained* token: bpb here measures the assistant text only
        splits[split] = {"tokens": len(ids), "bytes": int(n_bytes * len(ids) / trained), "documents": n,
                         "trained_tokens": trained}
    meta = {"format_version": 1, "source": "chat", "vocab_size": len(tok), "dtype": np.dtype(dtype).name,
            "eos_id": eos, "splits": splits, "tokenizer": "base+chat", "tokenizer_hash": ""}
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    return meta
