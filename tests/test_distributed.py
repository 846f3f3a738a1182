"""Data-parallel training through Ray Train on CPU (gloo): 2 workers (DDP or FSDP) match 1 worker
with the same global batch; checkpoints are registered with Ray Train; a killed worker is replaced
and training resumes from the last checkpoint."""
import pytest
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
    from pipeline.train.engine import Trainer
    from pipeline.train.schedule import Budget

    cfg = tiny_run_config(batch_tokens=2048, micro_batch=16, seq_len=64)
    # one worker: the same engine in this process (2 micro-steps of accumulation)
    single = Trainer(cfg, tiny_data, Budget(tokens=6 * 2048), run_dir=tmp_path / "w1", progress=False,
                     log=lambda *_: None).run()
    # two Ray Train workers with DDP over gloo (1 micro-step each)
    double, _ = train_distributed(tiny_run_config(batch_tokens=2048, micro_batch=16, seq_len=64), tiny_data,
                                  tmp_path / "w2", 2, False, tokens=6 * 2048, use_mlflow=False,
                                  log=lambda *_: None)
    assert single.steps == double["steps"] == 6 and single.tokens == double["tokens"]
    a, b = _weights(tmp_path / "w1"), _weights(tmp_path / "w2")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    assert double["final_val_bpb"] == pytest.approx(single.final_val_bpb, rel=1e-4)
    # checkpoints went through Ray Train, which also prunes them (keep_checkpoints = 2)
    assert double["checkpoint"] == str(ckpt.latest(tmp_path / "w2" / "checkpoints"))
    assert len(ckpt.list_checkpoints(tmp_path / "w2" / "checkpoints")) == cfg.train.keep_checkpoints


def test_fsdp_two_workers_match_one_worker_and_export_a_whole_model(ray_local, tiny_data, tmp_path):
    from model.hf import load_native
    from pipeline.train.distributed import train_distributed
    from pipeline.train.engine import Trainer
    from pipeline.train.schedule import Budget

    single = Trainer(tiny_run_config(batch_tokens=2048, micro_batch=8, seq_len=64), tiny_data,
                     Budget(tokens=5 * 2048), run_dir=tmp_path / "w1", progress=False, log=lambda *_: None).run()
    cfg = tiny_run_config(batch_tokens=2048, micro_batch=8, seq_len=64, parallel="fsdp")
    sharded, _ = train_distributed(cfg, tiny_data, tmp_path / "fsdp", 2, False, tokens=5 * 2048,
                                   use_mlflow=False, log=lambda *_: None)
    assert sharded["steps"] == single.steps == 5
    a, b = _weights(tmp_path / "w1"), _weights(tmp_path / "fsdp")
    assert a.keys() == b.keys()                              # a full (gathered) state dict, not shards
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    assert sharded["final_val_bpb"] == pytest.approx(single.final_val_bpb, rel=1e-4)
    model = load_native(tmp_path / "fsdp" / "model" / "native")   # the exported model is whole
    assert model.embed_tokens.weight.shape == (cfg.model.vocab_size, cfg.model.d_model)
    # its checkpoint (full state dicts, optimizer included) resumes in a single process
    more = Trainer(cfg, tiny_data, Budget(tokens=6 * 2048), run_dir=tmp_path / "fsdp", resume=True,
                   progress=False, log=lambda *_: None)
    assert more.step == 5 and more.optimizer.state
    assert more.run().steps == 1


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
    assert res["checkpoint"] == str(ckpt.latest(run_dir / "checkpoints"))  # Ray Train's own record

