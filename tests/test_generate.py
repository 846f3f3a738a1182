"""Generation: KV cache equivalence, greedy equals transformers, beams, sampling, bad input."""
import subprocess
import sys

import pytest
import torch

from conftest import run_cli
from model import ModelConfig, Transformer
from model.hf import export_hf, save_native
from pipeline.errors import UserError
from pipeline.generate import Sampling, load_generator


@pytest.fixture(scope="module")
def model_dir(tiny_data, tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("model")
    m = Transformer(ModelConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                max_seq_len=48))
    tok = tiny_data.tokenizer()
    save_native(m, folder / "native")
    tok.save_pretrained(folder / "native")
    export_hf(m, folder / "hf", tokenizer=tok)
    return folder


@pytest.fixture(scope="module")
def gen(model_dir):
    return load_generator(model_dir, "cpu")


def test_kv_cache_generation_equals_no_cache(gen):
    ids = gen.encode("The history of the city")
    for s in (Sampling(30, 0.0), Sampling(30, 1.0, top_k=40, seed=3), Sampling(30, 0.9, top_p=0.8, seed=5)):
        assert gen.generate_ids(ids, s, use_cache=True) == gen.generate_ids(ids, s, use_cache=False)


def test_sliding_window_past_the_context(gen):
    ids = gen.encode("The history of the city")
    out = gen.generate_ids(ids, Sampling(100, 0.0))  # context is 48 tokens
    assert len(out) == 100 or out[-1] == gen.eos


def test_seeded_sampling_is_deterministic_and_seeds_differ(gen):
    ids = gen.encode("Once upon a time")
    a = gen.generate_ids(ids, Sampling(20, 1.0, seed=1))
    assert a == gen.generate_ids(ids, Sampling(20, 1.0, seed=1))
    assert a != gen.generate_ids(ids, Sampling(20, 1.0, seed=2))


def test_greedy_equals_transformers_generate_on_the_export(gen, model_dir):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir / "hf", dtype=torch.float32, attn_implementation="eager")
    ids = gen.encode("The river flows")
    ours = gen.generate_ids(ids, Sampling(20, 0.0))
    ours = ours[: ours.index(gen.eos) + 1] if gen.eos in ours else ours
    theirs = hf.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False,
                         eos_token_id=gen.eos, pad_token_id=gen.eos)[0, len(ids):].tolist()
    assert ours == theirs


def test_beam_search_returns_n_sorted_sequences(gen):
    ids = gen.encode("The king")
    beams = gen.beam_search(ids, 4, 8)
    assert len(beams) == 4
    scores = [s for _, s in beams]
    assert scores == sorted(scores, reverse=True)
    assert len({tuple(seq) for seq, _ in beams}) == 4
    greedy = gen.generate_ids(ids, Sampling(8, 0.0))
    logp = torch.log_softmax(gen.model(torch.tensor([ids + greedy])).logits[0].float(), -1)
    greedy_score = sum(logp[len(ids) - 1 + i, t].item() for i, t in enumerate(greedy))
    assert scores[0] >= greedy_score - 1e-4  # beam search never does worse than greedy


def test_top_k_one_is_greedy(gen):
    ids = gen.encode("A")
    assert gen.generate_ids(ids, Sampling(10, 1.5, top_k=1, seed=9)) == gen.generate_ids(ids, Sampling(10, 0.0))


@pytest.mark.parametrize("s, message", [
    (Sampling(10, -1.0), "temperature"), (Sampling(10, 1e6), "temperature"),
    (Sampling(0, 1.0), "max-new-tokens"), (Sampling(10, 1.0, top_k=0), "top-k"),
    (Sampling(10, 1.0, top_p=1.5), "top-p"),
])
def test_bad_sampling_values(gen, s, message):
    with pytest.raises(UserError, match=message):
        gen.generate_ids([1, 2], s)


def test_empty_prompt_and_corrupt_artifact(gen, model_dir, tmp_path):
    with pytest.raises(UserError, match="empty"):
        gen.encode("   ")
    broken = tmp_path / "broken" / "native"
    broken.mkdir(parents=True)
    (broken / "config.json").write_text((model_dir / "native" / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="corrupt"):
        load_generator(broken.parent)


def test_cli_generates_from_a_folder_and_refuses_bad_input(model_dir, capsys):
    run = lambda *a: subprocess.run([sys.executable, "-m", "pipeline.generate", "--model", str(model_dir), *a],
                                    capture_output=True, text=True)
    ok = run("--prompt", "The city", "--max-new-tokens", "5", "--temperature", "0")
    assert ok.returncode == 0 and ok.stdout.startswith("The city")
    beams = run("--prompt", "The city", "--max-new-tokens", "4", "--beams", "3")
    assert beams.returncode == 0 and len(beams.stdout.strip().splitlines()) == 3
    bad = run("--prompt", "")
    assert bad.returncode == 2 and "empty" in bad.stderr and bad.stderr.count("\n") == 1
    for args, message in ((["--prompt", "x", "--temperature", "-2"], "temperature"),
                          (["--prompt", "x", "--beams", "0"], "beams"), (["--promt", "x"], "unrecognized")):
        code, _, err = run_cli("pipeline.generate", ["--model", str(model_dir), *args], capsys)
        assert code == 2 and message in err and err.count("\n") == 1, err


def test_repl_reads_prompts_and_settings(model_dir):
    out = subprocess.run([sys.executable, "-m", "pipeline.generate", "--model", str(model_dir),
                          "--max-new-tokens", "3"], input="/set temperature 0\nThe city\n/exit\n",
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "The city" in out.stdout
