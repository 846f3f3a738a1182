"""Packed token cache: documents → tokens joined by end-of-document → flat memmaps on disk.

Layout of one entry, `<cache_dir>/<fingerprint>/`:
    meta.json           source, tokenizer hash, vocab, dtype, per-split token/byte/doc counts and
                        checksums, bad bytes, creation time
    train.bin, val.bin  the token arrays (uint16 when the vocab fits, else uint32)
    tokenizer/          a PreTrainedTokenizerFast folder

An entry is keyed by a fingerprint of (source, tokenizer, settings), built in a temporary folder
and renamed into place under a file lock, and verified (sizes and checksums) before every use, so
a crash or a concurrent builder can never leave a half-written entry that gets read.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock

from pipeline.data import sources, tokenizer as toklib
from pipeline.errors import UserError

FORMAT_VERSION = 1
SPLITS = ("train", "val")


@dataclass
class DataSettings:
    data: str | None = None            # see pipeline/data/sources.py for the forms
    text_field: str = "text"
    hub_split: str = "train"
    tokenizer: str | None = None       # None: train a byte-level BPE on the training split
    vocab_size: int | None = None      # None: chosen from the corpus size
    val_fraction: float = 0.02
    seed: int = 0
    max_tokens: int | None = None      # cap on training tokens to prepare (hub streams, big corpora)
    cache_dir: str | None = None       # None: the user cache dir (PUFFERFISH_CACHE overrides)

    def validate(self) -> None:
        if not 0 < self.val_fraction < 0.5:
            raise UserError(f"--val-fraction must be in (0, 0.5), got {self.val_fraction}")
        if self.max_tokens is not None and self.max_tokens <= 0:
            raise UserError(f"--max-tokens must be positive, got {self.max_tokens}")
        if self.vocab_size is not None and self.tokenizer is None and self.vocab_size < 258:
            raise UserError(f"--vocab-size must be ≥ 258 for byte-level BPE, got {self.vocab_size}")


def default_cache_dir() -> Path:
    env = os.environ.get("PUFFERFISH_CACHE")
    if env:
        return Path(env).expanduser().resolve()
    import platformdirs

    return Path(platformdirs.user_cache_dir("pufferfish")) / "data"


@dataclass
class PreparedData:
    folder: Path
    meta: dict

    def tokens(self, split: str) -> np.ndarray:
        return np.memmap(self.folder / f"{split}.bin", dtype=self.meta["dtype"], mode="r")

    def mask(self, split: str) -> np.ndarray | None:
        """Per-token loss mask (uint8, 1 = trained on) for fine-tuning data; None for pretraining."""
        path = self.folder / f"{split}.mask"
        return np.memmap(path, dtype=np.uint8, mode="r") if path.is_file() else None

    @property
    def vocab_size(self) -> int:
        return self.meta["vocab_size"]

    def bytes_per_token(self, split: str) -> float:
        s = self.meta["splits"][split]
        return s["bytes"] / s["tokens"]

    @property
    def unique_train_tokens(self) -> int:
        return self.meta["splits"]["train"]["tokens"]

    def tokenizer(self):
        return toklib.load_saved(self.folder / "tokenizer")


def bits_per_byte(mean_loss_nats: float, tokens: int, n_bytes: int) -> float:
    """bpb = (loss / ln 2) · tokens / bytes: the tokenizer-independent compression figure."""
    return mean_loss_nats / float(np.log(2)) * tokens / n_bytes


def _checksum(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(16 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(folder: Path) -> dict | None:
    """The entry's metadata if every file is present and intact, else None."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            return None
        itemsize = np.dtype(meta["dtype"]).itemsize
        for split in SPLITS:
            path, info = folder / f"{split}.bin", meta["splits"][split]
            if path.stat().st_size != info["tokens"] * itemsize or _checksum(path) != info["checksum"]:
                return None
        if not (folder / "tokenizer" / "tokenizer.json").is_file():
            return None
        return meta
    except (OSError, ValueError, KeyError, TypeError):
        return None


def fingerprint(settings: DataSettings, source: sources.Source) -> str:
    tok_id = settings.tokenizer
    if tok_id and Path(tok_id).expanduser().exists():
        p = Path(tok_id).expanduser()
        target = p / "tokenizer.json" if p.is_dir() else p
        tok_id = _checksum(target) if target.is_file() else str(p.resolve())
    key = {"v": FORMAT_VERSION, "source": source.fingerprint(), "tokenizer": tok_id,
           "vocab": settings.vocab_size, "val": settings.val_fraction, "seed": settings.seed,
           "max_tokens": settings.max_tokens}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def prepare(settings: DataSettings, log=print) -> PreparedData:
    """Return the packed data for these settings, building it once (concurrency- and crash-safe)."""
    settings.validate()
    source = sources.resolve(settings.data, settings.text_field, settings.hub_split)
    root = Path(settings.cache_dir).expanduser().resolve() if settings.cache_dir else default_cache_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cache folder {root} cannot be created ({exc.strerror}); "
                        "pass --cache-dir or set PUFFERFISH_CACHE") from exc
    key = fingerprint(settings, source)
    final = root / key
    meta = verify(final)
    if meta is not None:
        return PreparedData(final, meta)
    with FileLock(str(root / f"{key}.lock")):
        meta = verify(final)  # another process may have finished it while we waited
        if meta is not None:
            return PreparedData(final, meta)
        if final.exists():
            log(f"cache entry {final} is incomplete or corrupt; rebuilding it")
        for stale in root.glob(f".{key}.tmp-*"):  # left by a crashed builder (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = root / f".{key}.tmp-{os.getpid()}"
        try:
            meta = _build(settings, source, tmp, log)
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return PreparedData(final, meta)


def _build(settings: DataSettings, source: sources.Source, out: Path, log) -> dict:
    started = time.time()
    max_bytes = settings.max_tokens * 8 if settings.max_tokens else None  # over-read, trim later
    docs = list(source.documents(max_bytes=max_bytes))
    stats = source.stats
    if not docs:
        raise UserError(f"--data {settings.data or sources.DEFAULT_DATA} holds no text "
                        "(every document was empty); point it at files with text in them")
    if stats.bad_bytes:
        log(f"warning: {stats.bad_bytes} bytes were not valid UTF-8 and were replaced with U+FFFD")
    # Document-level split, seeded: a document is wholly train or wholly validation.
    rng = np.random.default_rng(settings.seed)
    is_val = rng.random(len(docs)) < settings.val_fraction
    if len(docs) >= 2:
        is_val[rng.integers(len(docs))] = True     # at least one validation document...
        if is_val.all():
            is_val[np.flatnonzero(is_val)[0]] = False  # ...and at least one training document
    split_docs = {"train": [d for d, v in zip(docs, is_val) if not v],
                  "val": [d for d, v in zip(docs, is_val) if v]}
    if not split_docs["val"] or not split_docs["train"]:
        raise UserError(f"--data {settings.data} has a single document; a validation split needs ≥ 2 "
                        "(separate documents with a blank line)")

    if settings.tokenizer:
        tok = toklib.load_pretrained(settings.tokenizer)
    else:
        train_bytes = sum(len(d.encode("utf-8")) for d in split_docs["train"])
        vocab = settings.vocab_size or toklib.default_vocab_size(train_bytes)
        log(f"training a byte-level BPE tokenizer (vocab {vocab}) on {len(split_docs['train'])} documents")
        tok = toklib.train_bpe(split_docs["train"], vocab)
    vocab_size = len(tok)
    dtype = np.uint16 if vocab_size <= 65535 else np.uint32
    eos = tok.eos_token_id
    out.mkdir(parents=True)
    tok.save_pretrained(out / "tokenizer")

    split_meta = {}
    for split in SPLITS:
        arrays, n_bytes, n_docs, total = [], 0, 0, 0
        texts = split_docs[split]
        for i in range(0, len(texts), 1000):
            chunk = texts[i:i + 1000]
            for ids in tok(chunk, add_special_tokens=False)["input_ids"]:
                arrays.append(np.asarray(ids + [eos], dtype=dtype))
                total += len(ids) + 1
            n_bytes += sum(len(t.encode("utf-8")) for t in chunk)
            n_docs += len(chunk)
            if split == "train" and settings.max_tokens and total >= settings.max_tokens:
                break
        flat = np.concatenate(arrays) if arrays else np.zeros(0, dtype=dtype)
        if split == "train" and settings.max_tokens and flat.size > settings.max_tokens:
            # Trim to the cap; bytes scale by the kept share so bytes/token stays right.
            n_bytes = int(round(n_bytes * settings.max_tokens / flat.size))
            flat = flat[: settings.max_tokens]
        path = out / f"{split}.bin"
        flat.tofile(path)
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
        split_meta[split] = {"tokens": int(flat.size), "bytes": int(n_bytes), "documents": n_docs,
                             "checksum": _checksum(path)}
    meta = {
        "format_version": FORMAT_VERSION, "source": source.description,
        "source_fingerprint": source.fingerprint(), "settings": asdict(settings),
        "tokenizer": settings.tokenizer or "bpe", "tokenizer_hash": toklib.tokenizer_hash(tok),
        "vocab_size": vocab_size, "dtype": np.dtype(dtype).name, "eos_id": eos,
        "splits": split_meta, "bad_bytes": stats.bad_bytes, "files": stats.files,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "build_seconds": round(time.time() - started, 2),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    log(f"prepared {split_meta['train']['tokens']:,} train / {split_meta['val']['tokens']:,} val tokens "
        f"from {source.description} in {meta['build_seconds']:.1f}s")
    return meta
