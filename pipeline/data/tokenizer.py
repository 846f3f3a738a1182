"""Tokenizers: a byte-level BPE trained on the training split, or a pretrained one.

Either way the result is a `transformers.PreTrainedTokenizerFast`, so it saves next to the
Hugging Face export and `AutoTokenizer` loads it back.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable

from pipeline.errors import UserError

EOS = "<|endoftext|>"


def default_vocab_size(corpus_bytes: int) -> int:
    """A vocabulary the corpus can fill and a small model can afford (the embedding matrix of a
    CPU-sized model should not dwarf its body)."""
    for limit, vocab in ((8 << 20, 4096), (64 << 20, 8192), (512 << 20, 16384)):
        if corpus_bytes < limit:
            return vocab
    return 32768


def train_bpe(texts: Iterable[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 257 + 1:
        raise UserError(f"--vocab-size {vocab_size} is too small: byte-level BPE needs ≥ 258 "
                        "(256 bytes + end-of-document)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    got = tok.get_vocab_size()
    if got < vocab_size:
        raise UserError(f"the corpus supports only {got} BPE tokens but --vocab-size is {vocab_size}; "
                        f"pass --vocab-size {got // 64 * 64 or got} or more text")
    return wrap(tok)


def wrap(tok):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS,
                                   pad_token=EOS, unk_token=None)


def load_pretrained(name_or_path: str):
    """A local tokenizer.json, a tokenizer folder, or a hub name (offline → clear error)."""
    from transformers import AutoTokenizer

    path = Path(name_or_path).expanduser()
    if not path.exists():
        from pipeline.data.sources import hub_reachable, hub_unreachable_error

        if not hub_reachable():
            raise hub_unreachable_error(f"tokenizer {name_or_path}",
                                        "pass a local tokenizer.json or folder with --tokenizer")
    try:
        if path.is_file() and path.name.endswith(".json"):
            from tokenizers import Tokenizer

            tok = wrap(Tokenizer.from_file(str(path)))
        else:
            tok = AutoTokenizer.from_pretrained(str(path) if path.exists() else name_or_path)
    except (OSError, ValueError, Exception) as exc:
        raise UserError(f"tokenizer {name_or_path} could not be loaded "
                        f"({str(exc).splitlines()[0][:120]}); pass a local tokenizer.json or folder") from exc
    if tok.eos_token_id is None:
        tok.add_special_tokens({"eos_token": EOS})
    return tok


def tokenizer_hash(tok) -> str:
    return hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest()[:16]


def load_saved(folder: str | Path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(folder))
