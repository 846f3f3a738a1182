"""A/B in turns across processes: each side trains one shape of the CPU space alone in its own
process, as the full run does, and the processes take turns, a block of optimizer steps each
(A B B A …), so that the machine's drift falls on both sides.

Why not one fresh process per side, one after the other (what `cpu_compile` and
`cpu_precision` did until session 38): a 2-core VM's speed moves by up to 1.5x within minutes,
and two 20-s runs a minute apart read d128-L2's compile gain at 1.20-1.81x on one instance.
In turns, the same instance read compiled d128-L3 at 0.76-0.81 of compiled d128-L2 in three
runs (benchmarks/notes/cpu_compile.md, session 38). Why not steps interleaved in one process
(`common.interleaved`, the finalists): a side that shares its process shares its allocator,
thread pool and caches with the other, which a full run does not. (On that instance the two
read alike: 0.77-0.83.) The idle process waits on a pipe and takes no CPU."""
from __future__ import annotations

import multiprocessing
import statistics
import time


def cpu_space_trainer(shape: dict, compiled: bool, precision: str | None = None):
    """The engine's trainer for one shape of the CPU space (its first choice of every other
    field), as a calibration trial builds it: 8k-token batches from micro-batch 4, accumulation,
    clipping, AdamW; `precision`: the space's by default."""
    from pipeline.autotune.space import load_space, to_run_config
    from pipeline.data import DataSettings, prepare
    from pipeline.train.engine import Trainer
    from pipeline.train.schedule import Budget

    space = load_space("cpu")
    data = prepare(DataSettings(), log=lambda *_: None)
    cfg = to_run_config({k: v[0] for k, v in space.choices.items()} | shape, space, data.vocab_size)
    cfg.train.compile = compiled
    cfg.train.precision = precision or cfg.train.precision
    return Trainer(cfg, data, Budget(seconds=3600), trial=True, progress=False, log=lambda *_: None)


WARMUP_STEPS = 2  # the first holds the compile; the second is still slower (allocation)


def _serve(conn, shape: dict, compiled: bool, precision: str | None) -> None:
    """One side: build, warm up (timed: the first step holds the compile), then train `n` steps
    each time the parent sends `n`, until it sends 0."""
    trainer = None
    try:
        trainer = cpu_space_trainer(shape, compiled, precision)
        lr = trainer.cfg.train.lr
        warm = []
        for _ in range(WARMUP_STEPS):
            start = time.perf_counter()
            trainer.train_step(lr)
            warm.append(time.perf_counter() - start)
        conn.send({"tokens_per_step": trainer.tokens_per_step, "warmup_s": warm,
                   "compute_dtype": trainer.result.compute_dtype})
        while n := conn.recv():
            times = []
            for _ in range(n):
                start = time.perf_counter()
                trainer.train_step(lr)
                times.append(time.perf_counter() - start)
            conn.send(times)
    except Exception as exc:  # the parent names the side and raises
        conn.send({"error": f"{type(exc).__name__}: {exc}"})
    finally:
        if trainer is not None:
            trainer.loader.close()


def _recv(conn, proc, name: str, timeout: float = 900.0):
    """The side's next message; raises, naming the side, if it failed, died or went silent."""
    deadline = time.monotonic() + timeout
    while not conn.poll(1.0):
        if not proc.is_alive():
            raise RuntimeError(f"side {name} exited ({proc.exitcode}) without an answer")
        if time.monotonic() > deadline:
            raise RuntimeError(f"side {name} did not answer in {timeout:.0f} s")
    msg = conn.recv()
    if isinstance(msg, dict) and "error" in msg:
        raise RuntimeError(f"side {name} failed: {msg['error']}")
    return msg


def in_turns(sides: dict[str, tuple[dict, bool, str | None]], seconds: float, block: int = 4) -> dict[str, dict]:
    """Train each side (name → (shape, compiled, precision)) in its own process, in turns of
    `block` steps, for `seconds` after every side has warmed up. The sides are built one after
    another, so that a compile is timed without the other's build beside it. Per side: steady
    tokens/s (the median step; each block's first step is left out: it runs on caches the other
    process has just used), its compile time, compute dtype and timed steps (seconds each)."""
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: nothing shared with this one
    procs, conns, info = {}, {}, {}
    try:
        for name, (shape, compiled, precision) in sides.items():
            parent, child = ctx.Pipe()
            procs[name] = ctx.Process(target=_serve, args=(child, shape, compiled, precision), daemon=True)
            procs[name].start()
            conns[name] = parent
            info[name] = _recv(parent, procs[name], name)
        times = {name: [] for name in sides}
        order, turn = list(sides), 0
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for name in (order if turn % 2 == 0 else order[::-1]):
                conns[name].send(block)
                times[name] += _recv(conns[name], procs[name], name)[1:]
            turn += 1
    finally:
        for name, conn in conns.items():
            try:
                conn.send(0)
            except (BrokenPipeError, OSError):
                pass
        for proc in procs.values():
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    return {name: {"tokens_per_s": info[name]["tokens_per_step"] / statistics.median(times[name]),
                   "compile_s": max(0.0, info[name]["warmup_s"][0] - statistics.median(times[name])),
                   "steps": len(times[name]), "compute_dtype": info[name]["compute_dtype"],
                   "step_s": times[name]}
            for name in sides}


def over_windows(runs: list[dict], base: str, other: str) -> tuple[float, float, str]:
    """Several `in_turns` windows of the same two sides: each side's median tokens/s over the
    windows, and each window's other/base ratio ("1.29, 1.31")."""
    rate = {side: statistics.median(r[side]["tokens_per_s"] for r in runs) for side in (base, other)}
    per_window = ", ".join(f"{r[other]['tokens_per_s'] / r[base]['tokens_per_s']:.2f}" for r in runs)
    return rate[base], rate[other], per_window
