"""`python -m pipeline.generate --model models:/NAME@champion --prompt "..."`: generate text.

Sampling (temperature, top-k, top-p, seed), greedy (temperature 0), beam search (`--beams N`,
the N best with their log-probabilities), streaming, and a REPL when no prompt is given.
Decoding uses the KV cache. When prompt + generation outgrow the model's context, the window
slides: the most recent half-context is re-encoded and decoding continues (documented in README).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from model.hf import load_native, read_config
from model.llama import KVCache, Transformer
from pipeline.errors import ArgumentParser, UserError, cli, run_script


@dataclass
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 0.8
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0

    def validate(self, vocab: int) -> None:
        if not 1 <= self.max_new_tokens <= 100_000:
            raise UserError(f"--max-new-tokens must be between 1 and 100000, got {self.max_new_tokens}")
        if not 0 <= self.temperature <= 100:
            raise UserError(f"--temperature must be between 0 (greedy) and 100, got {self.temperature}")
        if self.top_k is not None and not 1 <= self.top_k <= vocab:
            raise UserError(f"--top-k must be between 1 and the vocabulary size {vocab}, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1], got {self.top_p}")


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already reach top_p
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


class Generator:
    def __init__(self, model: Transformer, tokenizer, device: str | torch.device = "cpu"):
        self.model = model.eval().to(device)
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.eos = tokenizer.eos_token_id

    @property
    def context(self) -> int:
        return self.model.cfg.max_seq_len

    def encode(self, text: str) -> list[int]:
        if not text or not text.strip():
            raise UserError("the prompt is empty; type some text to continue")
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def _prefill(self, ids: list[int], batch: int = 1) -> tuple[KVCache, torch.Tensor]:
        cache = KVCache(self.model.cfg, batch, device=self.device,
                        dtype=next(self.model.parameters()).dtype)
        x = torch.tensor([ids] * batch, device=self.device)
        return cache, self.model(x, cache=cache).logits[:, -1]

    @torch.no_grad()
    def generate_ids(self, ids: list[int], s: Sampling, use_cache: bool = True,
                     on_token: Callable[[int], None] | None = None,
                     stop_ids: set[int] | None = None) -> list[int]:
        s.validate(self.model.cfg.vocab_size)
        gen = torch.Generator(device="cpu").manual_seed(s.seed)
        window = self.context
        ids = list(ids)[-(window - 1):]  # a prompt longer than the context keeps its end
        out: list[int] = []
        cache, logits = self._prefill(ids) if use_cache else (None, None)
        for _ in range(s.max_new_tokens):
            if not use_cache:
                x = torch.tensor([(ids + out)[-window:]], device=self.device)
                logits = self.model(x).logits[:, -1]
            nxt = self._pick(logits[0].float(), s, gen)
            out.append(nxt)
            if on_token:
                on_token(nxt)
            if nxt == self.eos or (stop_ids and nxt in stop_ids):
                break
            if use_cache:
                if cache.length >= window:  # slide: re-encode the most recent half-context
                    cache, logits = self._prefill((ids + out)[-(window // 2):])
                else:
                    logits = self.model(torch.tensor([[nxt]], device=self.device), cache=cache).logits[:, -1]
        return out

    @staticmethod
    def _pick(logits: torch.Tensor, s: Sampling, gen: torch.Generator) -> int:
        if s.temperature == 0:
            return int(torch.argmax(logits))
        logits = filter_logits(logits / s.temperature, s.top_k, s.top_p)
        probs = torch.softmax(logits, dim=-1).cpu()
        return int(torch.multinomial(probs, 1, generator=gen))

    @torch.no_grad()
    def beam_search(self, ids: list[int], beams: int, max_new_tokens: int) -> list[tuple[list[int], float]]:
        """The `beams` most likely continuations with their total log-probabilities, best first."""
        if not 1 <= beams <= 64:
            raise UserError(f"--beams must be between 1 and 64, got {beams}")
        ids = list(ids)[-(self.context - max_new_tokens):] if max_new_tokens < self.context else None
        if ids is None:
            raise UserError(f"beam search keeps the whole sequence in context: --max-new-tokens must "
                            f"be below the model's context ({self.context})")
        cache, logits = self._prefill(ids)
        live = [([], 0.0)]
        finished: list[tuple[list[int], float]] = []
        for _ in range(max_new_tokens):
            logp = torch.log_softmax(logits.float(), dim=-1)
            scores = torch.tensor([s for _, s in live])[:, None] + logp.cpu()
            top = torch.topk(scores.flatten(), min(beams * 2, scores.numel()))
            vocab = logp.size(-1)
            chosen, rows = [], []
            for score, flat in zip(top.values.tolist(), top.indices.tolist()):
                row, tok = divmod(flat, vocab)
                seq = live[row][0] + [tok]
                if tok == self.eos:
                    finished.append((seq, score))
                else:
                    chosen.append((seq, score))
                    rows.append(row)
                if len(chosen) == beams:
                    break
            if not chosen or len(finished) >= beams and max(s for _, s in finished) >= chosen[0][1]:
                break
            live = chosen
            cache.reorder(torch.tensor(rows, device=self.device))
            step = torch.tensor([[seq[-1]] for seq, _ in live], device=self.device)
            logits = self.model(step, cache=cache).logits[:, -1]
        best = sorted(finished + live, key=lambda p: p[1], reverse=True)
        return best[:beams]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode([i for i in ids if i != self.eos])

    def complete(self, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int = 0) -> str:
        s = Sampling(max_new_tokens, temperature, top_k, top_p, seed)
        return self.decode(self.generate_ids(self.encode(prompt), s))


def load_generator(model_dir: Path, device: str | None = None) -> Generator:
    """From a model folder (`native/` inside, or an HF/native folder itself); config detected."""
    from pipeline.data.tokenizer import load_saved

    folder = model_dir / "native" if (model_dir / "native").is_dir() else model_dir
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        read_config(folder)
        model = load_native(folder, device)
        tok = load_saved(folder)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"{folder} could not be loaded as a model ({str(exc).splitlines()[0][:160]}); "
                        "the artifact is corrupt or incomplete") from exc
    return Generator(model, tok, device)


# --- command line ----------------------------------------------------------------------------

def _stream_printer(gen: Generator, prompt_ids: list[int]):
    """Print decoded text as tokens arrive (decoding the whole tail keeps multi-byte chars whole)."""
    state = {"ids": [], "printed": ""}

    def on_token(tok: int) -> None:
        state["ids"].append(tok)
        text = gen.decode(state["ids"])
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[len(state["printed"]):])
            sys.stdout.flush()
            state["printed"] = text
    return on_token


def run_once(gen: Generator, prompt: str, s: Sampling, beams: int, stream: bool) -> None:
    ids = gen.encode(prompt)
    if beams > 1:
        for seq, score in gen.beam_search(ids, beams, s.max_new_tokens):
            print(f"[{score:8.3f}] {prompt}{gen.decode(seq)}")
        return
    if stream:
        sys.stdout.write(prompt)
        gen.generate_ids(ids, s, on_token=_stream_printer(gen, ids))
        sys.stdout.write("\n")
    else:
        print(prompt + gen.decode(gen.generate_ids(ids, s)))


def _lines(prompt: str):
    """Input lines for a REPL (readline history when available) until EOF or /exit."""
    try:
        import readline  # noqa: F401  (history and line editing for input())
    except ImportError:
        pass
    while True:
        try:
            line = input(prompt)
        except EOFError:
            return
        if line.strip() in ("/exit", "/quit"):
            return
        yield line


def chat_repl(gen: Generator, s: Sampling) -> None:
    """A conversation: the model's chat template wraps every turn; replies stop at <|end|>."""
    from pipeline.chat import END, encode_chat

    if END not in gen.tokenizer.get_vocab():
        raise UserError("this model has no chat template; fine-tune it first with python -m pipeline.finetune")
    end_id = gen.tokenizer.convert_tokens_to_ids(END)
    messages: list[dict] = []
    print("Chat. /reset clears the conversation; /exit quits.")
    for line in _lines("you> "):
        if line.strip() == "/reset":
            messages = []
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        ids, _ = encode_chat(gen.tokenizer, messages, add_generation_prompt=True)
        out = gen.generate_ids(ids, s, stop_ids={end_id})
        reply = gen.decode([t for t in out if t != end_id]).strip()
        print(f"model> {reply}")
        messages.append({"role": "assistant", "content": reply})


def repl(gen: Generator, s: Sampling, beams: int, stream: bool) -> None:
    print("Type a prompt. /set KEY VALUE changes temperature, top_k, top_p, max_new_tokens, seed, "
          "beams; /exit quits.")
    for line in _lines("> "):
        if line.startswith("/set "):
            parts = line.split()
            if len(parts) != 3:
                print("usage: /set KEY VALUE")
                continue
            key, value = parts[1], parts[2]
            try:
                if key == "beams":
                    beams = int(value)
                elif key in ("top_k", "max_new_tokens", "seed"):
                    setattr(s, key, None if value == "none" else int(value))
                elif key in ("temperature", "top_p"):
                    setattr(s, key, None if value == "none" else float(value))
                else:
                    print(f"unknown setting {key}")
                    continue
            except ValueError:
                print(f"{value!r} is not a number")
            continue
        try:
            run_once(gen, line, s, beams, stream)
        except UserError as exc:
            print(f"error: {exc}")


@cli
def main(argv=None):
    p = ArgumentParser(prog="python -m pipeline.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="models:/NAME@ALIAS | models:/NAME/VERSION | runs:/ID/model | PATH")
    p.add_argument("--prompt", help="omit for an interactive REPL")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--beams", type=int, default=1)
    p.add_argument("--stream", action="store_true")
    p.add_argument("--chat", action="store_true", help="conversation REPL using the model's chat template")
    p.add_argument("--device")
    p.add_argument("--mlflow-uri")
    args = p.parse_args(argv)
    if args.prompt is not None and not args.prompt.strip():
        raise UserError("the prompt is empty; pass some text with --prompt or omit it for the REPL")
    s = Sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    if args.beams < 1 or args.beams > 64:
        raise UserError(f"--beams must be between 1 and 64, got {args.beams}")
    if args.model.startswith(("models:/", "runs:/")):
        from pipeline import tracking

        tracking.setup(args.mlflow_uri)
    from pipeline.registry import resolve_model_dir

    gen = load_generator(resolve_model_dir(args.model), args.device)
    s.validate(gen.model.cfg.vocab_size)
    if args.chat:
        chat_repl(gen, s)
    elif args.prompt is None:
        repl(gen, s, args.beams, args.stream)
    else:
        run_once(gen, args.prompt, s, args.beams, args.stream)


if __name__ == "__main__":
    run_script(main)
