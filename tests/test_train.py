"""The training engine: learning, the deadline-tied schedule, checkpoints, resume, failures."""
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import run_cli, tiny_run_config
from pipeline.errors import UserError
from pipeline.train import checkpoint as ckpt
from pipeline.train.config import ConfigError, RunConfig, apply_overrides
from pipeline.train.engine import Diverged, Interrupted, Trainer
from pipeline.train.schedule import Budget, OverfitCooldown, lr_multiplier


def quiet(*_):
    pass


def make(tiny_data, budget, run_dir=None, **kw):
    cfg = kw.pop("cfg", None) or tiny_run_config()
    return Trainer(cfg, tiny_data, budget, run_dir=run_dir, progress=False, log=kw.pop("log", quiet), **kw)


def test_tiny_model_learns_and_validation_bpb_falls(tiny_data, tmp_path):
    t = make(tiny_data, Budget(tokens=120 * 1024), run_dir=tmp_path)
    _, bpb_before, _ = t.evaluate(4096)
    res = t.run()
    assert res.stopped == "tokens" and res.steps == 120
    assert res.final_val_bpb < 0.8 * bpb_before
    assert (tmp_path / "model" / "hf" / "config.json").is_file()
    # where its time went, for the autotune summary: every validation pass (the final one among
    # them) and every save (the final model folders among them), inside the run's own time
    assert 0 < res.final_eval_s <= res.eval_s and res.checkpoint_s > 0
    assert res.eval_s + res.checkpoint_s < res.elapsed_s
    assert (tmp_path / "model" / "native" / "tokenizer.json").is_file()


def test_schedule_function_shapes():
    assert lr_multiplier(0.0, warmup_frac=0.1) == 0.0
    assert lr_multiplier(0.1, warmup_frac=0.1) == pytest.approx(1.0)
    assert lr_multiplier(0.55, warmup_frac=0.1) == pytest.approx(0.5)
    assert lr_multiplier(1.0) == 0.0 and lr_multiplier(1.3) == 0.0
    assert lr_multiplier(0.5, "wsd", 0.0, 0.2) == 1.0
    assert lr_multiplier(0.9, "wsd", 0.0, 0.2) == pytest.approx(1 - (0.5 ** 0.5))
    assert lr_multiplier(1.0, "wsd", 0.0, 0.2) == 0.0


def test_time_schedule_reaches_zero_at_the_deadline_with_a_fake_clock(tiny_data):
    now = [0.0]
    lrs = []

    def tick(trainer, loss):  # every micro-step "takes" 2 seconds of fake time
        now[0] += 2.0
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
        return loss

    t = make(tiny_data, Budget(seconds=100.0, clock=lambda: now[0]), trial=True, loss_hook=tick)
    res = t.run()
    assert res.stopped == "deadline"
    first = 2.0 * t.accum                           # a trial's window starts after its first step
    assert 95.0 <= now[0] - first <= 100.0          # the last step ended at the deadline, not after
    peak = max(lrs)
    assert lrs[-1] < 0.05 * peak                    # and its learning rate had decayed to ~zero
    assert lrs == sorted(lrs[: lrs.index(peak) + 1]) + lrs[lrs.index(peak) + 1:]


def test_a_trial_runs_past_its_window_for_a_reading_but_never_past_twice_it(tiny_data):
    def trial(min_steps):
        now = [0.0]

        def tick(trainer, loss):  # every micro-step "takes" 1 second of fake time
            now[0] += 1.0
            return loss

        res = make(tiny_data, Budget(seconds=10.0, clock=lambda: now[0]), trial=True, loss_hook=tick,
                   min_steps=min_steps).run()
        return res.steps, now[0]

    first = 2.0                                     # the first step (2 micro-steps) is outside the window
    base, t = trial(0)
    assert base >= 1 and t - first <= 10.0          # the window alone
    more, t = trial(base + 2)
    assert more == base + 2 and t - first > 10.0    # past it, for the steps a reading needs
    capped, t = trial(1000)
    assert more < capped < 1000 and t - first <= 20.0  # but never past twice the window


def test_a_trial_times_its_first_step_apart_so_a_slow_compile_leaves_a_reading(tiny_data):
    # torch.compile makes a trial's first step 15-20 s on a GPU, far longer than a 3-s window:
    # counted in the window, it left one step and a tokens/s of 5% of the real rate (session 17).
    first = [True]

    def compile_once(trainer, loss):  # the first micro-step "compiles" for 2 s of real time
        if first[0]:
            first[0] = False
            time.sleep(2.0)
        return loss

    trainer = make(tiny_data, Budget(seconds=0.5), trial=True, loss_hook=compile_once, min_steps=5)
    started = time.monotonic()
    res = trainer.run()
    assert res.steps >= 5                           # a reading, not the compile step alone
    assert res.compile_s >= 1.9 and res.step_time_s < 0.5
    assert time.monotonic() - started < 2.0 + 2 * 0.5 + 1.5  # twice the window at most, after the compile

def test_a_deadline_with_a_token_cap_ends_at_whichever_comes_first(tiny_data):
    # autotune's run on little data: the most tokens worth training, or the deadline
    def run(seconds, tokens):
        now, lrs = [0.0], []

        def tick(trainer, loss):  # every micro-step "takes" 1 second of fake time
            now[0] += 1.0
            lrs.append(trainer.optimizer.param_groups[0]["lr"])
            return loss

        res = make(tiny_data, Budget(seconds=seconds, tokens=tokens, clock=lambda: now[0]), trial=True,
                   loss_hook=tick).run()
        return res, now[0], lrs

    step_tokens = make(tiny_data, Budget(tokens=1)).tokens_per_step
    res, t, lrs = run(1000.0, 20 * step_tokens)
    assert res.stopped == "tokens" and res.tokens == 20 * step_tokens and t < 100.0
    assert lrs[-1] < 0.1 * max(lrs)                 # the schedule followed the tokens: it decayed
    res, t, lrs = run(20.0, 10_000 * step_tokens)
    assert res.stopped == "deadline" and t <= 20.0 + 4.0 and lrs[-1] < 0.2 * max(lrs)
    with pytest.raises(ValueError):
        Budget()


def test_the_overfit_watch_needs_repeated_data_and_a_sustained_rise():
    w = OverfitCooldown(margin=0.002, patience=2, cooldown=0.1)
    for bpb in (2.0, 1.9, 1.8, 1.8015):             # falling, then a rise inside the margin
        assert not w.observe(bpb, 1000, epochs=3.0, multiplier=0.5, step_tokens=10)
    assert not w.observe(1.81, 1000, epochs=3.0, multiplier=0.5, step_tokens=10)   # one rise: no
    assert not w.observe(1.79, 1000, epochs=3.0, multiplier=0.5, step_tokens=10)   # a new best resets
    assert not w.observe(1.85, 1000, epochs=0.9, multiplier=0.5, step_tokens=10)   # first epoch:
    assert not w.observe(1.85, 1000, epochs=0.9, multiplier=0.5, step_tokens=10)   # not overfitting
    assert not w.cooling and w.multiplier(5000) == 1.0
    assert not w.observe(1.80, 2000, epochs=2.0, multiplier=0.5, step_tokens=10)
    assert w.observe(1.80, 2000, epochs=2.0, multiplier=0.5, step_tokens=10)
    assert w.cooling and (w.start_tokens, w.end_tokens) == (2000, 2200)
    assert w.multiplier(2000) == 0.5 and w.multiplier(2100) == pytest.approx(0.25) and w.multiplier(2200) == 0.0
    again = OverfitCooldown()
    again.load_state_dict(json_round_trip(w.state_dict()))
    assert again == w
    fresh = OverfitCooldown()
    fresh.load_state_dict(json_round_trip(fresh.state_dict()))   # no best yet: stored as null
    assert fresh.best == math.inf


def json_round_trip(d):
    import json

    return json.loads(json.dumps(d, allow_nan=False))


def overfitting_run(tiny_data, run_dir, stop_on_overfit=True, **kw):
    """A run whose validation bpb falls until 30 steps and rises after (a fake evaluation),
    on 8-step epochs, with a fake clock: a reading every 2 steps."""
    now = [0.0]
    lrs = []

    def tick(trainer, loss):
        now[0] += 1.0 / trainer.accum
        lrs.append((trainer.tokens, trainer.optimizer.param_groups[0]["lr"]))
        return loss

    cfg = tiny_run_config(eval_every_s=2.0, data_fraction=0.06, stop_on_overfit=stop_on_overfit, warmup_frac=0.0)
    t = make(tiny_data, Budget(tokens=200 * 1024, clock=lambda: now[0]), run_dir=run_dir, cfg=cfg,
             loss_hook=tick, **kw)
    real = t.evaluate

    def evaluate(max_tokens):
        if max_tokens == cfg.train.final_eval_tokens:
            return real(max_tokens)
        steps = t.tokens / t.tokens_per_step
        return 0.0, 2.0 - 0.01 * min(steps, 30) + 0.001 * max(0.0, steps - 30), 1

    t.evaluate = evaluate
    return t, lrs


def test_a_run_that_overfits_cools_down_and_stops_early_and_resumes_so(tiny_data, tmp_path):
    t, lrs = overfitting_run(tiny_data, tmp_path / "a")
    assert t.unique_train_tokens < 10 * 1024         # epochs of ~8 steps: the data repeats
    res = t.run()
    step = t.tokens_per_step
    # readings at 32 steps (above the best, within the margin), 34 and 36 (two rises): the
    # cooldown starts at 36 steps and spans a tenth of the tokens so far
    assert res.stopped == "overfit" and res.overfit_at_tokens == 36 * step
    assert res.tokens == 40 * step                  # 36 + round(3.6) steps
    at_trigger = next(lr for tokens, lr in lrs if tokens == 36 * step)
    cooling = [lr for tokens, lr in lrs if tokens >= 36 * step][::t.accum]
    assert cooling == pytest.approx([at_trigger * k / 4 for k in (4, 3, 2, 1)])  # linearly toward zero
    assert res.final_val_bpb is not None and (tmp_path / "a" / "model" / "hf").is_dir()

    # interrupted inside the cooldown, the resumed run keeps it and stops at the same place
    first, _ = overfitting_run(tiny_data, tmp_path / "b", stop_after_steps=37)
    assert first.run().stopped == "steps"
    resumed, _ = overfitting_run(tiny_data, tmp_path / "b", resume=True)
    assert resumed.overfit.cooling
    assert resumed.run().tokens == res.tokens

    off, _ = overfitting_run(tiny_data, tmp_path / "c", stop_on_overfit=False)
    assert off.run().stopped == "tokens"            # train.stop_on_overfit=false trains on


def test_warmup_starts_at_the_first_step_not_at_process_start(tiny_data, tmp_path):
    # 30 s of start-up (imports, data, MLflow) are inside the deadline; the warmup (10% of the
    # training window) must still happen, or the first steps run at full rate from cold weights.
    now = [30.0]
    lrs = []

    def tick(trainer, loss):
        now[0] += 2.0
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
        return loss

    cfg = tiny_run_config()
    cfg.train.warmup_frac = 0.1
    t = make(tiny_data, Budget(seconds=130.0, clock=lambda: now[0], start=0.0), run_dir=tmp_path, cfg=cfg,
             loss_hook=tick)
    res = t.run()
    assert res.stopped == "deadline" and now[0] <= 130.0
    peak = max(lrs)
    assert lrs[0] < 0.2 * peak and lrs.index(peak) >= 3     # ramped up from the first step
    assert lrs[-1] < 0.1 * peak                               # and decayed to ~zero at the deadline


def test_resume_is_bitwise_identical_on_cpu(tiny_data, tmp_path):
    budget = Budget(tokens=16 * 1024)
    straight = make(tiny_data, budget, run_dir=tmp_path / "a")
    straight.run()
    first = make(tiny_data, budget, run_dir=tmp_path / "b", stop_after_steps=8)
    assert first.run().stopped == "steps"
    resumed = make(tiny_data, budget, run_dir=tmp_path / "b", resume=True)
    assert resumed.step == 8
    resumed.run()
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_crash_mid_checkpoint_leaves_previous_loadable(tiny_data, tmp_path, monkeypatch):
    t = make(tiny_data, Budget(tokens=4 * 1024), run_dir=tmp_path)
    t.run()
    before = ckpt.latest(tmp_path / "checkpoints")

    def dies(*a, **k):
        raise OSError("disk died mid-write")
    monkeypatch.setattr(torch, "save", dies)  # weights written, optimizer state never lands
    t.step += 1
    with pytest.raises(OSError):
        t.save_checkpoint()
    monkeypatch.undo()
    assert ckpt.latest(tmp_path / "checkpoints") == before
    fresh = make(tiny_data, Budget(tokens=8 * 1024), run_dir=tmp_path, resume=True)
    assert fresh.step == 4


def test_injected_nan_rolls_back_and_halves_lr(tiny_data, tmp_path):
    seen = {"done": False}

    def poison(trainer, loss):
        if trainer.step == 5 and not seen["done"]:
            seen["done"] = True
            return loss * float("nan")
        return loss

    notes = []
    t = make(tiny_data, Budget(tokens=10 * 1024), run_dir=tmp_path, loss_hook=poison, log=notes.append)
    res = t.run()
    assert res.nan_rollbacks == 1 and t.lr_scale == 0.5
    assert any("rolled back" in n for n in notes)
    assert res.stopped == "tokens" and torch.isfinite(torch.tensor(res.final_val_loss))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the on-device skip is the CUDA fused-AdamW path")
def test_gpu_step_skips_a_nonfinite_update_on_the_device(tiny_data):
    poisoned = {"on": True}
    t = make(tiny_data, Budget(tokens=10 * 1024),
             loss_hook=lambda tr, loss: loss * float("nan") if poisoned["on"] else loss)
    assert t.device_skip
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    loss, _ = t.train_step(1e-3)
    assert not math.isfinite(loss)
    assert all(torch.equal(before[k], v) for k, v in t.model.state_dict().items())
    assert all(int(s["step"]) == 0 for s in t.optimizer.state.values())
    poisoned["on"] = False
    loss, norm = t.train_step(1e-3)
    assert math.isfinite(loss) and math.isfinite(norm)
    assert any(not torch.equal(before[k], v) for k, v in t.model.state_dict().items())
    assert all(int(s["step"]) == 1 for s in t.optimizer.state.values())
    t.loader.close()


@pytest.mark.slow
@pytest.mark.parametrize("precision,rel,atol", [("fp32", 1e-4, 1e-5), ("bf16", 2e-2, 1e-2)])
def test_a_compiled_cpu_step_trains_like_the_eager_one(tiny_data, precision, rel, atol):
    """The CPU space's full run compiles (Inductor's C++ kernels): same losses, same weights
    (in bf16 autocast, as the CPU space trains where the CPU has bf16, to bf16's rounding)."""
    eager = make(tiny_data, Budget(tokens=10 * 1024), cfg=tiny_run_config(precision=precision))
    compiled = make(tiny_data, Budget(tokens=10 * 1024), cfg=tiny_run_config(compile=True, precision=precision))
    assert compiled.forward is not compiled.model  # it did compile, not fall back
    for _ in range(3):
        a, b = eager.train_step(1e-3), compiled.train_step(1e-3)
        assert a[0] == pytest.approx(b[0], rel=rel) and a[1] == pytest.approx(b[1], rel=10 * rel)
    for (k, v), w in zip(eager.model.state_dict().items(), compiled.model.state_dict().values()):
        assert torch.allclose(v, w, atol=atol), k
    eager.loader.close()
    compiled.loader.close()


def test_cpu_precision_follows_the_hardware_unless_forced(monkeypatch):
    from pipeline.train import engine

    cpu = torch.device("cpu")
    for native, auto in ((True, torch.bfloat16), (False, None)):
        monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda native=native: native)
        assert engine.autocast_dtype("auto", cpu) == auto
        assert engine.autocast_dtype("fp32", cpu) is None
        assert engine.autocast_dtype("bf16", cpu) == torch.bfloat16  # asked for: emulated if need be
        assert engine.autocast_dtype("fp16", cpu) is None            # no fast CPU path: fp32
    # what the autotune log says `auto` means, from the probe's plain data
    from pipeline.hardware import GPU, Hardware

    assert Hardware("cpu", cpu_bf16=True).auto_precision == "bf16" and Hardware("cpu").auto_precision == "fp32"
    assert Hardware("cuda", gpus=[GPU("NVIDIA H100", 80 << 30, (9, 0))]).auto_precision == "bf16"
    assert Hardware("cuda", gpus=[GPU("Tesla T4", 16 << 30, (7, 5))]).auto_precision == "fp16"
    # the override that lets a bf16 CPU measure what an fp32-only CPU would do
    from pipeline.hardware import cpu_has_native_bf16

    monkeypatch.setenv("PUFFERFISH_CPU_BF16", "0")
    assert cpu_has_native_bf16() is False


def test_a_bf16_cpu_run_learns_keeps_fp32_weights_and_says_so(tiny_data, tmp_path):
    from safetensors.torch import load_file

    t = make(tiny_data, Budget(tokens=60 * 1024), run_dir=tmp_path, cfg=tiny_run_config(precision="bf16"))
    _, bpb_before, _ = t.evaluate(4096)
    res = t.run()
    assert res.compute_dtype == "bf16" and res.final_val_bpb < 0.85 * bpb_before
    assert all(p.dtype == torch.float32 for p in t.model.parameters())
    weights = load_file(tmp_path / "model" / "native" / "model.safetensors")
    assert all(w.dtype == torch.float32 for w in weights.values())


def test_without_a_cxx_compiler_a_cpu_run_trains_eagerly_and_says_why(tiny_data, monkeypatch):
    from pipeline.train import engine

    monkeypatch.setattr(engine, "cpu_compiler_missing", lambda: "torch.compile on a CPU needs a C++ compiler")
    lines = []
    t = make(tiny_data, Budget(tokens=2 * 1024), cfg=tiny_run_config(compile=True), log=lines.append)
    assert t.forward is t.model
    assert any("not compiling" in line and "C++ compiler" in line for line in lines)
    assert math.isfinite(t.train_step(1e-3)[0])
    t.loader.close()


def test_missing_python_headers_are_named_before_a_cpu_compile(tmp_path, monkeypatch):
    import sysconfig

    from pipeline.train.engine import cpu_compiler_missing

    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"include": str(tmp_path)})
    why = cpu_compiler_missing()
    assert why is not None and "Python.h" in why and "python3-dev" in why


def test_repeated_nan_ends_the_run_clearly(tiny_data, tmp_path):
    t = make(tiny_data, Budget(tokens=10 * 1024), run_dir=tmp_path,
             loss_hook=lambda tr, loss: loss * float("nan") if tr.step >= 2 else loss)
    with pytest.raises(Diverged, match="lower train.lr"):
        t.run()


def test_oom_halves_micro_batch_and_keeps_global_batch(tiny_data, tmp_path):
    hit = {"n": 0}

    def oom_once(trainer, loss):
        if trainer.step == 2 and hit["n"] == 0:
            hit["n"] += 1
            raise torch.OutOfMemoryError("simulated CUDA out of memory")
        return loss

    t = make(tiny_data, Budget(tokens=6 * 1024), run_dir=tmp_path, loss_hook=oom_once)
    before = t.tokens_per_step
    res = t.run()
    assert res.oom_halvings == 1 and t.micro_batch == 4 and t.accum == 4
    assert t.tokens_per_step == before and res.steps == 6


def test_sigterm_in_process_writes_checkpoint_and_resumes(tiny_data, tmp_path):
    def term(trainer, loss):
        if trainer.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    t = make(tiny_data, Budget(tokens=8 * 1024), run_dir=tmp_path, loss_hook=term)
    with pytest.raises(Interrupted, match="--resume"):
        t.run()
    assert ckpt.read_state(ckpt.latest(tmp_path / "checkpoints"))["step"] == 4
    res = make(tiny_data, Budget(tokens=8 * 1024), run_dir=tmp_path, resume=True).run()
    assert res.steps == 4 and res.stopped == "tokens"


def test_sigterm_without_a_run_dir_says_nothing_was_saved_instead_of_a_resume_command(tiny_data):
    # a benchmark's in-memory trainer once printed "resume with: ... --resume None" (session 28)
    def term(trainer, loss):
        if trainer.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    with pytest.raises(Interrupted, match="nothing was saved to resume") as err:
        make(tiny_data, Budget(tokens=8 * 1024), loss_hook=term).run()
    assert "None" not in str(err.value)


@pytest.mark.slow
def test_cli_sigterm_then_resume(tmp_path):
    """The real command: SIGTERM mid-run → checkpoint, exit 130, resume finishes the run."""
    cfg = tiny_run_config()
    cfg.save(tmp_path / "run.yaml")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "pipeline.train", "--config", str(tmp_path / "run.yaml"),
           "--tokens", str(400 * 1024), "--out", str(tmp_path / "run"), "--no-mlflow"]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    ckdir = tmp_path / "run" / "checkpoints"
    deadline = time.time() + 120
    while not ckpt.latest(ckdir) and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "--resume" in err
    stopped_at = ckpt.read_state(ckpt.latest(ckdir))["step"]
    assert stopped_at > 0
    out = subprocess.run([sys.executable, "-m", "pipeline.train", "--resume", str(tmp_path / "run"),
                          "--no-mlflow"], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert ckpt.read_state(ckpt.latest(ckdir))["step"] == 400


def test_mlflow_run_holds_params_metrics_and_tags(tiny_data, tmp_path):
    from mlflow import MlflowClient

    from pipeline.train.run import train_run

    cfg = tiny_run_config()
    res, run_id = train_run(cfg, Budget(tokens=6 * 1024), tmp_path / "run", data=tiny_data, log=quiet)
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.d_model"] == "64" and run.data.params["train.seq_len"] == "64"
    assert {"loss", "lr", "tokens_per_s", "val_bpb", "final_val_bpb", "grad_norm"} <= set(run.data.metrics)
    assert run.data.tags["torch"] == torch.__version__ and "hardware" in run.data.tags
    assert run.data.metrics["final_val_bpb"] == pytest.approx(res.final_val_bpb)


def test_moe_run_logs_expert_load(tiny_data, tmp_path):
    cfg = tiny_run_config()
    cfg.model.n_experts, cfg.model.top_k = 4, 2
    cfg.model.moe_ffn_hidden = 64
    logged = []

    class Recorder:
        id = "x"

        def log_metrics(self, metrics, step):
            logged.append(metrics)
    t = make(tiny_data, Budget(tokens=4 * 1024), run_dir=tmp_path, cfg=cfg, tracker=Recorder())
    t.run()
    assert any("expert_load.e3" in m and "expert_load_max_over_mean" in m for m in logged)
    assert t.model.layers[0].mlp.route_bias.abs().sum() > 0  # the balancing bias moved


# --- bad input -------------------------------------------------------------------------------

def test_unknown_config_keys_are_named(tmp_path):
    (tmp_path / "c.yaml").write_text("model:\n  d_model: 64\n  n_layer: 3\ntrain:\n  lr: 0.001\n")
    with pytest.raises(ConfigError, match="n_layer"):
        RunConfig.load(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("trian:\n  lr: 0.001\n")
    with pytest.raises(ConfigError, match="trian"):
        RunConfig.load(tmp_path / "d.yaml")
    with pytest.raises(ConfigError, match="no key 'lrr'"):
        apply_overrides(RunConfig(), ["train.lrr=1"])


def test_impossible_config_is_refused():
    with pytest.raises(ConfigError, match="seq_len"):
        RunConfig.from_dict({"model": {"max_seq_len": 64}, "train": {"seq_len": 128}})


def test_deadline_shorter_than_one_step_says_the_minimum(tiny_data, tmp_path):
    with pytest.raises(UserError, match="give at least"):
        make(tiny_data, Budget(seconds=0.01), run_dir=tmp_path).run()


def test_unwritable_checkpoint_folder(tiny_data, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(UserError, match="not writable"):
        make(tiny_data, Budget(tokens=1024), run_dir=tmp_path / "file" / "run")


def test_resume_refuses_non_checkpoint_and_other_config(tiny_data, tmp_path):
    from pipeline.train.run import load_resume

    with pytest.raises(UserError, match="not a run folder"):
        load_resume(tmp_path, None)
    cfg = tiny_run_config()
    t = make(tiny_data, Budget(tokens=2 * 1024), run_dir=tmp_path, cfg=cfg)
    t.run()
    cfg.save(tmp_path / "config.yaml")
    other = tiny_run_config(lr=1e-4)
    with pytest.raises(UserError, match="different config"):
        load_resume(tmp_path, other)
    with pytest.raises(UserError, match="different config"):
        make(tiny_data, Budget(tokens=4 * 1024), run_dir=tmp_path, cfg=other, resume=True)


def test_a_deadline_and_a_token_budget_combine_on_the_command_line():
    """`--minutes 30 --tokens N`: whichever comes first (a fixed configuration on a small corpus,
    stopped at the most tokens worth training, as autotune's full run is); two deadlines do not."""
    import argparse

    from pipeline.train.__main__ import add_budget_args, budget_from_args

    p = argparse.ArgumentParser()
    add_budget_args(p)
    both = budget_from_args(p.parse_args(["--minutes", "30", "--tokens", "5000"]))
    assert (both.seconds, both.tokens) == (1800, 5000)
    assert (budget_from_args(p.parse_args(["--tokens", "5000"])).seconds, budget_from_args(p.parse_args([]))) == (None, None)
    with pytest.raises(SystemExit):
        p.parse_args(["--minutes", "3", "--hours", "1"])


def test_train_cli_refuses_existing_run_folder_and_missing_budget(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("x: 1")
    out = subprocess.run([sys.executable, "-m", "pipeline.train", "--no-mlflow", "--minutes", "1",
                          "--out", str(tmp_path / "run")], capture_output=True, text=True)
    assert out.returncode == 2 and "already holds a run" in out.stderr
    for args, message in ([["--out", str(tmp_path / "new")], "give a budget"],
                          [["--minutes", "-3"], "must be > 0"]):
        code, _, err = run_cli("pipeline.train.__main__", ["--no-mlflow", *args], capsys)
        assert code == 2 and message in err and err.count("\n") == 1, err
    assert (tmp_path / "run" / "config.yaml").read_text() == "x: 1"


def test_a_command_skips_the_teardown_but_keeps_its_status_output_threads_and_exit_handlers(tmp_path):
    """`run_script` leaves with os._exit (the interpreter's teardown cost seconds past a deadline);
    what the teardown would have done that a user can see must still happen."""
    script = tmp_path / "command.py"
    script.write_text(
        "import atexit, sys, threading, time\n"
        "from pathlib import Path\n"
        "from pipeline.errors import UserError, cli, run_script\n"
        "out, mode = Path(sys.argv[1]), sys.argv[2]\n"
        "@cli\n"
        "def main(argv=None):\n"
        "    atexit.register(lambda: (out / 'handler').write_text('ran'))\n"
        "    threading.Thread(target=lambda: (time.sleep(0.3), (out / 'thread').write_text('done'))).start()\n"
        "    global pool  # idle workers, kept alive, never shut down by the command\n"
        "    from concurrent.futures import ThreadPoolExecutor\n"
        "    pool = ThreadPoolExecutor(2)\n"
        "    pool.submit(lambda: None)\n"
        "    sys.stdout.write('summary, still in the buffer')\n"
        "    if mode == 'user':\n"
        "        raise UserError('bad input')\n"
        "    if mode == 'message':\n"
        "        sys.exit('fatal')\n"
        "run_script(main)\n")
    for mode, code, err in (("ok", 0, ""), ("user", 2, "error: bad input\n"), ("message", 1, "fatal\n")):
        out = tmp_path / mode
        out.mkdir()
        proc = subprocess.run([sys.executable, str(script), str(out), mode], capture_output=True, text=True,
                              timeout=120)  # a thread left waiting once hung a command after its summary
        assert (proc.returncode, proc.stderr) == (code, err), (mode, proc.stderr)
        assert proc.stdout == "summary, still in the buffer", mode
        assert (out / "handler").read_text() == "ran" and (out / "thread").read_text() == "done", mode
