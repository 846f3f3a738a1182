"""Batches of (input, target) windows from a packed token array.

The windows of optimizer step s are drawn at once, `default_rng([seed, s])` → micro × accum ×
world offsets, and micro-batch a of rank r takes slice (a·world + r). So

* the loader's whole state is one integer (`position`, micro-batches consumed), which a
  checkpoint restores exactly;
* data-parallel ranks never read the same window in a step;
* the global batch is the same set of windows whatever the split into ranks × accumulation
  (1 worker × 2 micro-steps reads exactly what 2 workers × 1 micro-step read), which is what
  lets a 2-worker run match a 1-worker run.

A background thread prepares the next batches (pinned memory, non-blocking copies on CUDA).
"""
from __future__ import annotations

import queue
import threading

import numpy as np
import torch

from pipeline.errors import UserError


def check_window(tokens: np.ndarray, seq_len: int, split: str) -> None:
    if len(tokens) < seq_len + 1:
        raise UserError(f"the {split} split has {len(tokens)} tokens but one training window needs "
                        f"{seq_len + 1}; give more text or a smaller seq_len")


class BatchLoader:
    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int = 0,
                 rank: int = 0, world: int = 1, accum: int = 1,
                 device: str | torch.device = "cpu", prefetch: int = 4, mask: np.ndarray | None = None):
        check_window(tokens, seq_len, "train")
        self.mask = mask  # optional per-token loss mask (fine-tuning): 0 → target ignored (-100)
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.seed, self.rank, self.world, self.accum = seed, rank, world, accum
        self.device = torch.device(device)
        self.prefetch = prefetch
        self.position = 0          # index of the next batch handed out
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def make_batch(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Micro-batch number k (counting every micro-step of this rank)."""
        mb = self.batch_size
        step, a = divmod(k, self.accum)
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, len(self.tokens) - self.seq_len, size=mb * self.accum * self.world)
        first = (a * self.world + self.rank) * mb
        starts = starts[first:first + mb]
        idx = starts[:, None] + np.arange(self.seq_len + 1)[None, :]
        return _window(self.tokens, self.mask, idx)

    # --- prefetching iterator --------------------------------------------------------------
    def _worker(self, start: int) -> None:
        k = start
        pin = self.device.type == "cuda"
        while not self._stop.is_set():
            x, y = self.make_batch(k)
            if pin:
                x, y = x.pin_memory(), y.pin_memory()
            while not self._stop.is_set():
                try:
                    self._queue.put((k, x, y), timeout=0.1)
                    break
                except queue.Full:
                    continue
            k += 1

    def _start(self) -> None:
        self.close()
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.prefetch)
        self._thread = threading.Thread(target=self._worker, args=(self.position,), daemon=True)
        self._thread.start()

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._thread is None:
            self._start()
        k, x, y = self._queue.get()
        assert k == self.position, "prefetch order broken"
        self.position += 1
        nb = self.device.type == "cuda"
        return x.to(self.device, non_blocking=nb), y.to(self.device, non_blocking=nb)

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def regroup(self, batch_size: int, accum: int) -> None:
        """New micro-batch size and accumulation with the same global batch, restarting at the
        start of the step in progress (its windows are then re-read in the new split)."""
        self.close()
        step = self.position // self.accum
        self.batch_size, self.accum = batch_size, accum
        self.position = step * accum

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "accum": self.accum}

    def load_state_dict(self, state: dict) -> None:
        self.close()
        self.position, self.seed = int(state["position"]), int(state["seed"])
        step = self.position // int(state.get("accum", self.accum))
        self.position = step * self.accum


def _window(tokens: np.ndarray, mask: np.ndarray | None, idx: np.ndarray):
    window = torch.from_numpy(tokens[idx].astype(np.int64))
    # Both contiguous: a strided view, pinned, still went to the GPU through a pageable staging
    # copy, which blocked the host until the optimizer's kernels ahead of it had finished.
    x, y = window[:, :-1].contiguous(), window[:, 1:].clone()
    if mask is not None:
        y[torch.from_numpy(mask[idx][:, 1:] == 0)] = -100  # cross_entropy's ignore_index
    return x, y


def eval_batches(tokens: np.ndarray, seq_len: int, batch_size: int, max_tokens: int | None = None,
                 mask: np.ndarray | None = None):
    """Non-overlapping windows in order over a split (deterministic; the same every evaluation)."""
    check_window(tokens, seq_len, "validation")
    n = len(tokens) - 1
    if max_tokens:
        n = min(n, max_tokens)
    n_windows = max(1, n // seq_len)
    starts = np.arange(n_windows) * seq_len
    for i in range(0, n_windows, batch_size):
        s = starts[i:i + batch_size]
        idx = s[:, None] + np.arange(seq_len + 1)[None, :]
        yield _window(tokens, mask, idx)
