"""Data-parallel training through Ray Train on CPU (gloo): 2 workers match 1 worker with the same
global batch; a killed worker is replaced and training resumes from the last checkpoint."""
import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_run_config
from pipeline.train import checkpoint as ckpt

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_local():
    from pipeline.autotune.calibrate import ray_session

    with ray_session(None, num_cpus=2, num_gpus=0) as ray:
        yield ray


def _weights(run_dir):
    return load_file(str(ckpt.latest(run_dir / "checkpoints") / "model.safetensors"))


def test_two_workers_match_one_worker_with_the_same_global_batch(ray_local, tiny_data, tmp_path):
    from pipeline.train.distributed import train_distributed

    results = {}
    for workers in (1, 2):
        cfg = tiny_run_config(batch_tokens=2048, micro_batch=16, seq_len=64)
        res, _ = train_distributed(cfg, tiny_data, tmp_path / f"w{workers}", workers, False,
                                   tokens=6 * 2048, use_mlflow=False, log=lambda *_: None)
        results[workers] = res
    assert results[1]["steps"] == results[2]["steps"] == 6
    assert results[1]["tokens"] == results[2]["tokens"]
    a, b = _weights(tmp_path / "w1"), _weights(tmp_path / "w2")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    assert results[2]["final_val_bpb"] == pytest.approx(results[1]["final_val_bpb"], rel=1e-4)


def test_killed_worker_is_replaced_and_resumes_from_checkpoint(ray_local, tiny_data, tmp_path):
    from pipeline.train.distributed import train_distributed

    cfg = tiny_run_config(batch_tokens=2048, micro_batch=16, seq_len=64, checkpoint_every_s=0.0)
    run_dir = tmp_path / "faulty"
    res, _ = train_distributed(cfg, tiny_data, run_dir, 2, False, tokens=8 * 2048, use_mlflow=False,
                               fail_at_step=4, max_failures=1, log=lambda *_: None)
    assert (run_dir / ".fault-injected-4").exists()         # a worker really died at step 4
    assert res["tokens"] == 8 * 2048                        # and the run still finished its budget
    assert ckpt.read_state(ckpt.latest(run_dir / "checkpoints"))["step"] == 8
    assert res["steps"] < 8                                 # the restarted group resumed, not restarted


def test_autotune_runs_on_an_existing_cluster(tmp_path, isolated_home):
    """`ray start --head` on loopback, then `autotune --address` plans there (trials on the cluster)."""
    import json
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray_bin = str(Path(sys.executable).with_name("ray"))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    start = subprocess.run([ray_bin, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
                            "--num-cpus=2", "--include-dashboard=false", "--object-store-memory=300000000",
                            "--disable-usage-stats"], env=env, capture_output=True, text=True, timeout=180)
    assert start.returncode == 0, start.stderr[-2000:]
    try:
        out = subprocess.run([sys.executable, "-m", "pipeline.autotune", "--minutes", "5", "--space", "cpu-tiny",
                              "--plan-only", "--yes", "--address", f"127.0.0.1:{port}", "--vocab-size", "512",
                              "--max-tokens", "100000", "--out", str(tmp_path / "run")],
                             env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        plan = json.loads((tmp_path / "run" / "plan.json").read_text())
        state = json.loads((tmp_path / "run" / "pipeline.json").read_text())
        assert plan["chosen"]["feasible"]
        assert any(t["status"] == "ok" for t in state["stages"]["calibrate"]["trials"])
        assert "Started a local Ray instance" not in out.stderr  # it used the cluster
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True, timeout=120)
