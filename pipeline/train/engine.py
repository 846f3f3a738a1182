"""The training engine. One engine serves the short calibration trials and the full run, so
what calibration measures is exactly what the full run executes.

A run trains until its budget (seconds or tokens) is spent. With a time budget, the cost of the
final evaluation and save is measured up front and reserved, the learning rate follows
progress = seconds used / seconds allowed, and the last optimizer step lands at the deadline.
"""
from __future__ import annotations

import contextlib
import math
import os
import resource
import signal
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from model.config import flops_per_token, param_counts
from model.hf import export_hf, exportable, save_native
from model.llama import Transformer
from pipeline.data.cache import PreparedData, bits_per_byte
from pipeline.data.loader import BatchLoader, check_window, eval_batches
from pipeline.errors import UserError
from pipeline.hardware import cpu_has_native_bf16
from pipeline.train import checkpoint as ckpt
from pipeline.train.config import RunConfig
from pipeline.train.schedule import Budget, OverfitCooldown, lr_multiplier


STOPS = ["", "signal", "deadline", "tokens", "steps", "overfit"]


class Interrupted(Exception):
    """SIGTERM/SIGINT arrived; a checkpoint was written and the run can be resumed (a trainer
    without a run directory, as in a trial or a benchmark, saved nothing and says so)."""

    def __init__(self, run_dir: Path | None):
        super().__init__(f"interrupted; resume with: python -m pipeline.train --resume {run_dir}" if run_dir
                         else "interrupted; this run had no run directory, so nothing was saved to resume")
        self.run_dir = run_dir


class Diverged(UserError):
    pass


@dataclass
class TrainResult:
    steps: int = 0
    tokens: int = 0
    elapsed_s: float = 0.0
    tokens_per_s: float = 0.0          # steady state: warm-up/compile steps excluded
    step_time_s: float = 0.0
    compile_s: float = 0.0             # first step's extra time over a steady step
    peak_memory_bytes: int = 0
    mfu: float | None = None
    final_val_loss: float | None = None
    final_val_bpb: float | None = None
    loss_trace: list = field(default_factory=list)   # (elapsed seconds, train loss)
    stopped: str = ""                  # deadline | tokens | steps | overfit | diverged
    overfit_at_tokens: int | None = None  # where rising validation bpb started the cooldown
    nan_rollbacks: int = 0
    oom_halvings: int = 0
    micro_batch: int = 0
    compute_dtype: str = "fp32"        # what the matmuls ran in: fp32, or bf16/fp16 autocast
    reserve_s: float = 0.0
    final_eval_s: float = 0.0
    save_s: float = 0.0                # the longest checkpoint save (what the reserve is sized by)
    eval_s: float = 0.0                # every validation pass, the first and the final included
    checkpoint_s: float = 0.0          # every checkpoint saved and the final model folders
    model_dir: str | None = None
    run_dir: str | None = None


def pick_device(name: str | None = None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `train.precision` on this device (None: plain fp32). Weights,
    gradients and optimizer state stay fp32 either way; the loss is taken on fp32 logits."""
    if precision == "fp32":
        return None
    if device.type == "cpu":
        # CPU autocast: bf16 where the hardware has it ("auto") or where asked; fp16 has no
        # fast CPU path, so it trains fp32 as before.
        if precision == "bf16" or (precision == "auto" and cpu_has_native_bf16()):
            return torch.bfloat16
        return None
    if device.type != "cuda":
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def build_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    # Weight decay on matrices only: norms, biases and balancing buffers are never decayed.
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adafactor":
        return torch.optim.Adafactor(groups, lr=cfg.lr)
    fused = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused or None)


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # process peak RSS


def cpu_compiler_missing() -> str | None:
    """Why Inductor cannot build CPU kernels on this machine, or None. Its generated C++ needs a
    compiler and Python's headers (some modules include Python.h); without either, the first
    compiled step would fail mid-run."""
    import sysconfig

    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as exc:  # InvalidCxxCompiler, or whatever this torch version raises
        return f"torch.compile on a CPU needs a C++ compiler: {str(exc).strip().splitlines()[0][:120]}; install g++"
    include = sysconfig.get_paths().get("include") or ""
    if not (Path(include) / "Python.h").is_file():
        return f"torch.compile on a CPU needs Python's headers, and {include}/Python.h is missing; install python3-dev"
    return None


class Trainer:
    def __init__(self, cfg: RunConfig, data: PreparedData, budget: Budget, *,
                 run_dir: Path | None = None, device: str | None = None, tracker=None,
                 resume: bool | Path = False, trial: bool = False, peak_flops: float | None = None,
                 log: Callable[[str], None] = print, loss_hook: Callable | None = None,
                 stop_after_steps: int | None = None, progress: bool = True,
                 log_every_s: float = 5.0, model_init: Path | None = None,
                 rank: int = 0, world: int = 1, wrap: Callable | None = None,
                 resume_elapsed: bool = True, fault_hook: Callable | None = None,
                 on_checkpoint: Callable[[Path | None], None] | None = None, min_steps: int = 0):
        cfg.validate()
        self.cfg, self.data, self.budget = cfg, data, budget
        self.run_dir = Path(run_dir) if run_dir else None
        self.trial = trial                  # calibration: no checkpoints, no final eval, OOM raises
        # A trial runs past its window (up to twice it) until it has this many steps: with the
        # first two dropped as warm-up, one steady step read ±40% on 2 CPU cores (session 9).
        self.min_steps = min_steps if trial else 0
        self.device = pick_device(device)
        self.tracker = tracker if rank == 0 else None
        self.log = log if rank == 0 else (lambda *_: None)
        self.loss_hook = loss_hook
        self.stop_after_steps, self.show_progress, self.log_every_s = stop_after_steps, progress, log_every_s
        self.peak_flops = peak_flops
        # Data parallelism is applied from outside: `wrap` (e.g. Ray Train's prepare_model → DDP)
        # produces the module the forward runs through; rank 0 evaluates, saves and logs.
        self.rank, self.world, self.is_main = rank, world, rank == 0
        self.resume_elapsed, self.fault_hook = resume_elapsed, fault_hook
        # Called on every rank after each checkpoint (with its folder on rank 0, None elsewhere):
        # Ray Train registers it (`ray.train.report`) and then owns retention.
        self.on_checkpoint = on_checkpoint
        tc = cfg.train
        if exportable(cfg.model) and not trial:
            import transformers  # noqa: F401  (seconds to import: pay it now, not after the deadline)
        if data.vocab_size > cfg.model.vocab_size:
            raise UserError(f"the tokenizer has {data.vocab_size} tokens but model.vocab_size is "
                            f"{cfg.model.vocab_size}; set model.vocab_size ≥ {data.vocab_size}")
        check_window(data.tokens("val"), tc.seq_len, "validation")
        torch.manual_seed(tc.seed)
        self.model = Transformer(cfg.model).to(self.device)
        if model_init is not None:  # fine-tuning: start from a base model's weights
            from safetensors.torch import load_file

            missing, unexpected = self.model.load_state_dict(
                load_file(str(model_init), device=str(self.device)), strict=False)
            if unexpected or any("lora_" not in k for k in missing):
                raise UserError(f"{model_init} does not match the model config (missing {missing[:3]}, "
                                f"unexpected {unexpected[:3]})")
        self.amp_dtype = autocast_dtype(tc.precision, self.device)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.cuda.reset_peak_memory_stats(self.device)
        self.forward = wrap(self.model) if wrap else self.model
        # FSDP (`fully_shard`) turns the model's parameters into sharded DTensors in place, so
        # the optimizer is built after wrapping, and forward, evaluation and state-dict
        # gathering become collectives every rank joins.
        self.sharded = ckpt.is_sharded(self.model)
        self.optimizer = build_optimizer(self.model, tc)
        missing = cpu_compiler_missing() if tc.compile and self.device.type == "cpu" else None
        if missing:
            self.log(f"warning: not compiling ({missing}); training eagerly")
        elif tc.compile:
            # Static shapes, compiled afresh: a process that compiled another shape before (the
            # MFU benchmark's variants, a trial before the run) would otherwise get a
            # dynamic-shape graph (dynamo's automatic dynamic), measured 20-25% slower on an H200.
            torch._dynamo.reset()
            self.forward = torch.compile(self.forward, dynamic=False)
        # On a GPU with the fused AdamW, a non-finite step is skipped on the device (found_inf),
        # so the update is queued without waiting for the loss to reach the host, and the host's
        # per-step bookkeeping overlaps the optimizer's kernels (see `train_step`).
        self.device_skip = (self.device.type == "cuda" and self.scaler is None and not self.sharded
                            and all(g.get("fused") for g in self.optimizer.param_groups))
        self.micro_batch = tc.micro_batch
        self.accum = max(1, tc.batch_tokens // (tc.micro_batch * tc.seq_len * world))
        train_tokens, train_mask = data.tokens("train"), data.mask("train")
        if tc.data_fraction < 1:
            keep = max(tc.seq_len + 1, int(len(train_tokens) * tc.data_fraction))
            train_tokens = train_tokens[:keep]
            train_mask = train_mask[:keep] if train_mask is not None else None
        self.loader = BatchLoader(train_tokens, tc.seq_len, self.micro_batch, seed=tc.seed,
                                  rank=self.rank, world=self.world, accum=self.accum, device=self.device,
                                  mask=train_mask)
        self.step = 0
        self.tokens = 0
        self.elapsed_before = 0.0          # training seconds spent by earlier processes (resume)
        self.train_from = 0.0              # elapsed seconds at the first step: the schedule starts there
        self.lr_scale = 1.0
        self.overfit = OverfitCooldown()
        self.unique_train_tokens = len(train_tokens)  # what one epoch is (after data_fraction)
        self.failures_since_checkpoint = 0
        self.result = TrainResult(run_dir=str(self.run_dir) if self.run_dir else None,
                                  compute_dtype={torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.amp_dtype, "fp32"))
        self._stop_signal: int | None = None
        self.ckpt_root = self.run_dir / "checkpoints" if self.run_dir and not trial else None
        if self.ckpt_root is not None:
            self._check_writable(self.ckpt_root)
        if resume:  # True: the newest checkpoint in the run folder; a path: that checkpoint
            self._resume(None if resume is True else Path(resume))

    # --- setup helpers ---------------------------------------------------------------------
    @staticmethod
    def _check_writable(folder: Path) -> None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".write-test-{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise UserError(f"checkpoint folder {folder} is not writable ({exc.strerror}); "
                            "choose another --out") from exc

    def _resume(self, folder: Path | None = None) -> None:
        last = folder or (ckpt.latest(self.ckpt_root) if self.ckpt_root else None)
        if last is None:
            raise UserError(f"{self.run_dir} holds no checkpoint to resume from")
        state = ckpt.load(last, self.model, self.optimizer)
        if state.get("config_fingerprint") != self.cfg.fingerprint():
            raise UserError(f"{last} belongs to a different config; resume without --config or "
                            "start a new run folder")
        self._restore_state(state)
        self.log(f"resumed from {last.name}: step {self.step}, {self.tokens:,} tokens, "
                 f"{self.elapsed_before:.1f}s already trained")

    def _restore_state(self, state: dict) -> None:
        self.step, self.tokens = state["step"], state["tokens"]
        if self.resume_elapsed:  # else the clock is absolute (wall time since the run's start)
            self.elapsed_before = state["elapsed_s"]
        self.lr_scale = state.get("lr_scale", 1.0)
        self.train_from = state.get("train_from_s", 0.0)
        if state.get("micro_batch", self.micro_batch) != self.micro_batch:
            self._set_micro_batch(state["micro_batch"])
        self.loader.load_state_dict(state["loader"])
        self.result.nan_rollbacks = state.get("nan_rollbacks", 0)
        self.overfit = OverfitCooldown()
        self.overfit.load_state_dict(state.get("overfit", {}))

    def _set_micro_batch(self, micro: int) -> None:
        total = self.micro_batch * self.accum
        self.micro_batch, self.accum = micro, max(1, total // micro)
        self.loader.regroup(micro, self.accum)

    # --- time ------------------------------------------------------------------------------
    def elapsed(self) -> float:
        return self.elapsed_before + self.budget.clock() - self._t0

    def progress(self, reserve: float) -> float:
        # A timed schedule spans the training window, from the first step to the deadline less the
        # final work; counted from process start, its warmup would pass during start-up.
        # With both a deadline and a token cap the schedule follows whichever binds first.
        p = 0.0
        if self.budget.timed:
            window = self.budget.seconds - reserve - self.train_from
            p = (self.elapsed() - self.train_from) / max(1e-9, window)
        if self.budget.tokens is not None:
            p = max(p, self.tokens / self.budget.tokens)
        return p

    @property
    def tokens_per_step(self) -> int:
        return self.micro_batch * self.accum * self.cfg.train.seq_len * self.world

    # --- one optimizer step ----------------------------------------------------------------
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def train_step(self, lr: float) -> tuple[float, float]:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        total = 0.0
        for i in range(self.accum):
            x, y = self.loader.next()
            with self._grad_sync(i == self.accum - 1):
                with self._autocast():
                    loss = self.forward(x, y).loss / self.accum
                if self.loss_hook is not None:
                    loss = self.loss_hook(self, loss)
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            total += loss.detach()
        if self.world > 1:  # every rank sees the global mean loss (the NaN decision must agree)
            import torch.distributed as dist

            total = total.to(self.device) if isinstance(total, torch.Tensor) else torch.tensor(total)
            dist.all_reduce(total)
            total = total / self.world
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        clip = self.cfg.train.grad_clip if self.cfg.train.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        if self.sharded:  # FSDP: a DTensor; the norm over all shards
            grad_norm = grad_norm.full_tensor()
        if self.device_skip:
            return self._step_on_device(total, grad_norm)
        loss_value, norm_value = float(total), float(grad_norm)
        if math.isfinite(loss_value) and math.isfinite(norm_value):
            if self.scaler:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self._sum_expert_load()
            self.model.update_router_bias()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value, norm_value

    def _step_on_device(self, total: torch.Tensor, grad_norm: torch.Tensor) -> tuple[float, float]:
        """The update without a host round trip before it. Reading the loss first left the GPU
        idle three times a step (loss, gradient norm, next batch; ~1 ms each under the profiler,
        for a 124M model's 70-ms step on an H200). Here the fused AdamW skips a non-finite step
        itself (`found_inf`), the loss and norm travel to pinned memory behind the gradient
        clipping, and the host waits for that copy alone, not for the optimizer. (Measured
        unprofiled, this bought under 1%: `benchmarks/notes/mfu.md`.)"""
        finite = torch.isfinite(total) & torch.isfinite(grad_norm)
        self.optimizer.found_inf = (~finite).float()
        stats = torch.stack([total.float(), grad_norm.float()]).to("cpu", non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        self.optimizer.step()
        # (MoE routing biases move on a skipped step too: the rollback that follows restores them)
        self._sum_expert_load()
        self.model.update_router_bias()
        self.optimizer.zero_grad(set_to_none=True)
        copied.synchronize()
        loss_value, norm = stats.tolist()
        return loss_value, norm

    def _grad_sync(self, last: bool):
        """Reduce gradients only on the last micro-step of an accumulation (DDP `no_sync`,
        FSDP `set_requires_gradient_sync`)."""
        if self.world == 1:
            return contextlib.nullcontext()
        if self.sharded:
            self.model.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if last else self.forward.no_sync()

    def _sum_expert_load(self) -> None:
        """MoE balancing: every rank updates its routing biases from the global expert load, so
        the biases stay identical across data-parallel ranks."""
        if self.world == 1:
            return
        import torch.distributed as dist

        for layer in self.model.moe_layers():
            dist.all_reduce(layer.load_counts)

    @property
    def evaluates(self) -> bool:
        """Whether this rank runs evaluation: rank 0, or every rank when the model is sharded
        (its forward all-gathers parameters, so all ranks must take part)."""
        return self.is_main or self.sharded

    # --- evaluation ------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, max_tokens: int) -> tuple[float, float, int]:
        """Mean validation loss (nats/token), bits per byte, tokens evaluated."""
        self.model.eval()
        total, count = 0.0, 0
        for x, y in eval_batches(self.data.tokens("val"), self.cfg.train.seq_len,
                                 self.micro_batch, max_tokens, mask=self.data.mask("val")):
            x, y = x.to(self.device), y.to(self.device)
            n = int((y != -100).sum())
            if n == 0:
                continue
            with self._autocast():
                loss = self.model(x, y).loss
            total += float(loss) * n
            count += n
        if count == 0:
            raise UserError("the validation split has no trained-on tokens (every target is masked)")
        mean = total / count
        bpb = bits_per_byte(mean, count, count * self.data.bytes_per_token("val"))
        return mean, bpb, count

    # --- checkpoints -----------------------------------------------------------------------
    def trainer_state(self) -> dict:
        return {"step": self.step, "tokens": self.tokens, "elapsed_s": self.elapsed(),
                "lr_scale": self.lr_scale, "train_from_s": self.train_from, "micro_batch": self.micro_batch,
                "loader": self.loader.state_dict(), "config_fingerprint": self.cfg.fingerprint(),
                "budget_seconds": self.budget.seconds, "budget_tokens": self.budget.tokens,
                "nan_rollbacks": self.result.nan_rollbacks, "overfit": self.overfit.state_dict(),
                "mlflow_run_id": self.tracker.id if self.tracker else None}

    def save_checkpoint(self) -> float:
        """Every rank calls this at the same step (the decision is broadcast); rank 0 writes."""
        if self.ckpt_root is None:
            return 0.0
        t = time.monotonic()
        folder = None
        if self.is_main or self.sharded:
            weights, optim = ckpt.full_state(self.model, self.optimizer)
            if self.is_main:
                folder = ckpt.save(self.ckpt_root, self.step, weights, optim, self.trainer_state(),
                                   keep=None if self.on_checkpoint else self.cfg.train.keep_checkpoints)
        self.failures_since_checkpoint = 0
        if self.on_checkpoint is not None:
            self.on_checkpoint(folder)
        return time.monotonic() - t

    def _rollback(self, loss: float) -> None:
        self.failures_since_checkpoint += 1
        last = ckpt.latest(self.ckpt_root) if self.ckpt_root else None
        if last is None or self.failures_since_checkpoint >= 2:
            raise Diverged(f"training diverged (loss {loss}) at step {self.step} "
                           f"{'twice in a row ' if last else ''}; lower train.lr (now {self.cfg.train.lr})")
        elapsed = self.elapsed()
        state = ckpt.load(last, self.model, self.optimizer)
        self._restore_state(state)
        self.elapsed_before, self._t0 = elapsed, self.budget.clock()  # wall-clock never rolls back
        self.lr_scale = state.get("lr_scale", 1.0) * 0.5
        self.result.nan_rollbacks += 1
        self.log(f"warning: non-finite loss or gradients at step {self.step}; rolled back to {last.name} "
                 f"and halved the learning rate (scale {self.lr_scale:g})")
        if self.tracker:
            self.tracker.log_metrics({"nan_rollbacks": self.result.nan_rollbacks}, self.step)

    # --- signals ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def _signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            self._stop_signal = signum

        old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    # --- the loop --------------------------------------------------------------------------
    def run(self) -> TrainResult:
        tc, res = self.cfg.train, self.result
        self._t0 = self.budget.start if self.budget.start is not None else self.budget.clock()
        res.micro_batch = self.micro_batch
        reserve = 0.0
        if not self.trial:
            t = time.monotonic()
            _, bpb0, n = self.evaluate(tc.eval_tokens) if self.evaluates else (0.0, 0.0, 1)
            spent = time.monotonic() - t
            res.eval_s += spent
            per_token = spent / n
            val_tokens = min(len(self.data.tokens("val")), tc.final_eval_tokens)
            res.final_eval_s = per_token * val_tokens
            if self.step == 0:
                self.train_from = self.elapsed()
                res.save_s = self.save_checkpoint()  # the rollback point, and a measured save time
                res.checkpoint_s += res.save_s
            # final work: full-split eval + a checkpoint + native and HF model folders
            reserve = 1.2 * (res.final_eval_s + 3 * max(res.save_s, 0.05)) + 0.5
            reserve = self._broadcast([reserve])[0]  # every rank plans with rank 0's reserve
            self._log_metrics({"val_bpb": bpb0})
        res.reserve_s = reserve
        step_times: list[float] = []
        step_est = 0.0
        last_eval = last_ckpt = last_log = self.elapsed()
        from pipeline.train.progress import ProgressDisplay

        display = ProgressDisplay(self.budget, enabled=self.show_progress and not self.trial and self.is_main)
        with self._signals(), display:
            while True:
                # Decide on rank 0 and share the decision, so data-parallel ranks never disagree
                # about stopping, evaluating or checkpointing (a disagreement would hang them).
                now = self.elapsed()
                stop = ""
                if self._stop_signal is not None:
                    stop = "signal"
                elif self.budget.timed and now + step_est + reserve > self.budget.seconds and not (
                        res.steps < self.min_steps and now + step_est <= 2 * self.budget.seconds):
                    stop = "deadline"
                elif self.budget.tokens is not None and self.tokens + self.tokens_per_step > self.budget.tokens:
                    stop = "tokens"
                elif self.stop_after_steps is not None and res.steps >= self.stop_after_steps:
                    stop = "steps"
                elif self.overfit.cooling and self.tokens + self.tokens_per_step > self.overfit.end_tokens:
                    stop = "overfit"
                do_eval = not self.trial and res.steps > 0 and now - last_eval >= tc.eval_every_s
                do_ckpt = not self.trial and res.steps > 0 and now - last_ckpt >= tc.checkpoint_every_s
                # (rank 0's progress too: ranks with their own clocks would step at different rates)
                code, do_eval, do_ckpt, p = self._broadcast([STOPS.index(stop), do_eval, do_ckpt,
                                                             self.progress(reserve)])
                stop = STOPS[int(code)]
                if do_eval:
                    last_eval = now
                    if self.evaluates:
                        t = time.monotonic()
                        val_loss, bpb, _ = self.evaluate(tc.eval_tokens)
                        res.eval_s += time.monotonic() - t
                        self._log_metrics({"val_loss": val_loss, "val_bpb": bpb})
                        display.note(f"step {self.step}: val bpb {bpb:.4f}")
                    if tc.stop_on_overfit:
                        self._watch_overfit(bpb if self.evaluates else math.nan, p, display)
                if do_ckpt:
                    last_ckpt = now
                    saved = self.save_checkpoint()
                    res.save_s, res.checkpoint_s = max(res.save_s, saved), res.checkpoint_s + saved
                if stop == "signal":
                    self.save_checkpoint()
                    self.loader.close()
                    raise Interrupted(self.run_dir)
                if stop:
                    if stop == "deadline" and res.steps == 0 and not self.trial:
                        self._deadline_error(None, reserve)
                    res.stopped = stop
                    break
                lr = tc.lr * self.lr_scale * self._lr_multiplier(p)
                t = time.monotonic()
                try:
                    loss, grad_norm = self.train_step(lr)
                except torch.OutOfMemoryError:
                    self.optimizer.zero_grad(set_to_none=True)
                    if self.trial or self.micro_batch == 1:
                        raise
                    if self.device.type == "cuda":
                        torch.cuda.empty_cache()
                    self._set_micro_batch(self.micro_batch // 2)
                    res.oom_halvings += 1
                    res.micro_batch = self.micro_batch
                    self.log(f"warning: out of memory; micro-batch halved to {self.micro_batch}, "
                             f"accumulation doubled to {self.accum} (global batch unchanged)")
                    continue
                # The loss is on the host. (On a GPU this step's update may still be running;
                # the next step queues behind it, so steady-state step times are unaffected.)
                dt = time.monotonic() - t
                if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                    if self.trial:
                        res.stopped = "diverged"
                        res.loss_trace.append((self.elapsed(), float("inf")))
                        break
                    self._rollback(loss)
                    continue
                self.step += 1
                res.steps += 1
                self.tokens += self.tokens_per_step
                step_times.append(dt)
                step_est = dt if len(step_times) == 1 else 0.8 * step_est + 0.2 * dt
                if len(step_times) == 1 and self.trial:
                    # A trial's window measures steady steps: its first step (allocation,
                    # torch.compile: 15-20 s on a GPU) is timed apart, as compile_s. Counted in the
                    # window, it left a 3-s trial one step and a reading of 5% of the real speed
                    # (session 17, H200).
                    self._t0 = self.budget.clock()
                    step_est = 0.0
                step_est = self._broadcast([step_est])[0]
                if len(step_times) == 1 and self.budget.timed and not self.trial:
                    self._check_deadline_feasible(dt, reserve)
                now = self.elapsed()
                res.loss_trace.append((round(now, 3), loss))
                display.update(self, loss, step_times)
                if self.fault_hook is not None:
                    self.fault_hook(self)
                if now - last_log >= self.log_every_s or res.steps <= 1:
                    last_log = now
                    tps = self._tps(step_times)
                    self._log_metrics({"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tps,
                                       "memory_bytes": peak_memory(self.device), "mfu": self._mfu(tps)})
        self.loader.close()
        self._finish(step_times)
        return res

    @property
    def epochs(self) -> float:
        return self.tokens / self.unique_train_tokens

    def _lr_multiplier(self, progress: float) -> float:
        """The schedule's multiplier at `progress`, capped by an overfitting cooldown."""
        tc = self.cfg.train
        return min(lr_multiplier(progress, tc.schedule, tc.warmup_frac, tc.decay_frac),
                   self.overfit.multiplier(self.tokens))

    def _watch_overfit(self, bpb: float, progress: float, display) -> None:
        """Feed a periodic validation reading to the overfitting watch (rank 0 decides; every
        rank takes its cooldown, so data-parallel ranks stop together)."""
        multiplier = self._lr_multiplier(progress)
        started = self.is_main and self.overfit.observe(bpb, self.tokens, self.epochs, multiplier,
                                                        self.tokens_per_step)
        if self.world > 1:
            flag, end, mult = self._broadcast([started, self.overfit.end_tokens or 0, multiplier])
            if flag and not self.is_main:
                self.overfit.start_tokens, self.overfit.end_tokens = self.tokens, int(end)
                self.overfit.start_multiplier, started = mult, True
        if not started:
            return
        message = (f"validation bpb stayed above its best ({self.overfit.best:.4f}) for {self.overfit.patience} "
                   f"readings at {self.epochs:.1f} epochs: cooling the "
                   f"learning rate to zero over {self.overfit.end_tokens - self.tokens:,} more tokens, then "
                   "stopping (train.stop_on_overfit=false trains on)")
        if self.is_main:
            display.note(message)
        if self.tracker:
            self.tracker.log_metrics({"overfit_cooldown_from_tokens": self.tokens}, self.step)

    def _broadcast(self, values: list) -> list:
        """Rank 0's values on every rank (identity without data parallelism)."""
        if self.world == 1:
            return values
        import torch.distributed as dist

        t = torch.tensor([float(v) for v in values], dtype=torch.float64,
                         device=self.device if dist.get_backend() == "nccl" else "cpu")
        dist.broadcast(t, src=0)
        return [type(v)(x) if isinstance(v, bool) else x for v, x in zip(values, t.tolist())]

    def _check_deadline_feasible(self, step_s: float, reserve: float) -> None:
        if self.elapsed() + step_s + reserve > self.budget.seconds:
            self._deadline_error(step_s, reserve)

    def _deadline_error(self, step_s: float | None, reserve: float) -> None:
        needed = self.elapsed() + (step_s or 0.0) + reserve
        step = f"one step ({step_s:.1f}s)" if step_s else "set-up"
        self.loader.close()
        raise UserError(f"the deadline ({self.budget.seconds:.1f}s) is shorter than {step} plus the "
                        f"reserved final evaluation and save ({reserve:.1f}s); give at least "
                        f"{math.ceil(needed * 1.5 + 1)}s")

    def _tps(self, step_times: list[float]) -> float:
        # Steady state: drop the first steps (allocation warm-up, torch.compile). A calibration
        # trial uses the median step, robust to a background process stealing a core for a
        # moment; a full run reports its true average.
        warm = min(len(step_times) - 1, max(2, len(step_times) // 10))
        steady = step_times[warm:] if warm > 0 else step_times
        if self.trial:
            return self.tokens_per_step / max(1e-9, statistics.median(steady))
        return self.tokens_per_step * len(steady) / max(1e-9, sum(steady))

    def _mfu(self, tps: float) -> float | None:
        if not self.peak_flops:
            return None
        return tps * flops_per_token(self.cfg.model, self.cfg.train.seq_len) / self.peak_flops

    def _log_metrics(self, metrics: dict) -> None:
        load = self.model.expert_load()
        if load is not None:
            mean_load = load.mean(0)
            metrics["expert_load_max_over_mean"] = float(load.max() / load.mean())
            metrics.update({f"expert_load.e{i}": float(v) for i, v in enumerate(mean_load)})
        if self.tracker:
            self.tracker.log_metrics(metrics, self.step)

    def _finish(self, step_times: list[float]) -> None:
        res, tc = self.result, self.cfg.train
        res.tokens, res.elapsed_s = self.tokens, self.elapsed()
        res.overfit_at_tokens = self.overfit.start_tokens
        if step_times:
            res.tokens_per_s = self._tps(step_times)
            res.step_time_s = statistics.median(step_times)
            res.compile_s = max(0.0, step_times[0] - res.step_time_s)
        res.peak_memory_bytes = peak_memory(self.device)
        res.mfu = self._mfu(res.tokens_per_s)
        if self.trial:
            return
        res.checkpoint_s += self.save_checkpoint()
        if res.stopped == "steps" or not self.evaluates:
            return
        t = time.monotonic()
        res.final_val_loss, res.final_val_bpb, _ = self.evaluate(tc.final_eval_tokens)
        res.final_eval_s = time.monotonic() - t
        res.eval_s += res.final_eval_s
        if self.run_dir is not None:
            t = time.monotonic()
            model_dir = self.save_model(self.run_dir / "model")
            res.model_dir = str(model_dir) if model_dir else None
            res.checkpoint_s += time.monotonic() - t
        if not self.is_main:
            return
        res.elapsed_s = self.elapsed()
        self._log_metrics({"final_val_bpb": res.final_val_bpb, "final_val_loss": res.final_val_loss,
                           "tokens_per_s": res.tokens_per_s, "train_tokens": res.tokens,
                           "elapsed_s": res.elapsed_s})
        self.log(f"finished: {res.steps} steps, {res.tokens:,} tokens, {res.tokens_per_s:,.0f} tok/s, "
                 f"val bpb {res.final_val_bpb:.4f}, {res.elapsed_s:.1f}s ({res.compute_dtype})"
                 + (f"; ended early at {self.epochs:.1f} epochs, cooled down as "
                    "validation bpb rose" if res.stopped == "overfit" else ""))

    def save_model(self, folder: Path) -> Path | None:
        """The final model folder: native weights + config, tokenizer, and the HF export
        (written by rank 0; with FSDP every rank first joins the gathering of full weights)."""
        model = self.model
        if self.sharded:
            weights, _ = ckpt.full_state(self.model)
            if not self.is_main:
                return None
            model = Transformer(self.cfg.model)
            model.load_state_dict(weights)
        folder.mkdir(parents=True, exist_ok=True)
        model = model.merged()  # LoRA folds into the weights: exports are plain models
        save_native(model, folder / "native")
        tok = self.data.tokenizer()
        tok.save_pretrained(folder / "native")
        if exportable(model.cfg):
            export_hf(model, folder / "hf", tokenizer=tok)
        self.cfg.save(folder / "run.yaml")
        return folder


def summarize_params(cfg: RunConfig) -> dict:
    counts = param_counts(cfg.model)
    return {**{f"params_{k}": v for k, v in counts.items()},
            "flops_per_token": flops_per_token(cfg.model, cfg.train.seq_len)}


def result_dict(res: TrainResult) -> dict:
    d = asdict(res)
    trace = d["loss_trace"]
    stride = max(1, len(trace) // 500)  # keep the curve's shape, not every step
    d["loss_trace"] = trace[::stride] + ([trace[-1]] if trace and (len(trace) - 1) % stride else [])
    return d
