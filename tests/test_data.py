"""Data stage: every source form, the cache's fingerprint/atomicity/locking, bpb, the loader."""
import json
import multiprocessing as mp
import os

import numpy as np
import pytest

from pipeline.data import DataSettings, bits_per_byte, prepare
from pipeline.data import cache as cache_mod
from pipeline.data.loader import BatchLoader, check_window
from pipeline.errors import UserError

WORDS = ("the quick brown fox jumps over the lazy dog while a small model learns to predict "
         "tokens from text that repeats itself often enough for byte pair merges").split()


def doc(i: int, n: int = 40) -> str:
    rng = np.random.default_rng(i)
    return f"document {i}: " + " ".join(rng.choice(WORDS, n))


def settings(path, tmp_path, **kw):
    return DataSettings(data=str(path), vocab_size=300, cache_dir=str(tmp_path / "cache"),
                        val_fraction=0.1, **kw)


def quiet(*_):
    pass


def test_txt_files_split_into_blank_line_documents(tmp_path):
    (tmp_path / "a.txt").write_text("\n\n".join(doc(i) for i in range(30)))
    (tmp_path / "b.md").write_text("\n\n".join(doc(i) for i in range(30, 50)))
    data = prepare(settings(tmp_path, tmp_path), log=quiet)
    s = data.meta["splits"]
    assert s["train"]["documents"] + s["val"]["documents"] == 50
    assert data.meta["files"] == 2
    assert data.tokens("train").dtype == np.uint16


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "csv"])
def test_table_formats_read_the_text_field(tmp_path, fmt):
    import pandas as pd

    df = pd.DataFrame({"body": [doc(i) for i in range(40)], "id": range(40)})
    path = tmp_path / f"corpus.{fmt}"
    {"jsonl": lambda: df.to_json(path, orient="records", lines=True),
     "json": lambda: df.to_json(path, orient="records"),
     "parquet": lambda: df.to_parquet(path),
     "csv": lambda: df.to_csv(path, index=False)}[fmt]()
    data = prepare(settings(path, tmp_path, text_field="body"), log=quiet)
    s = data.meta["splits"]
    assert s["train"]["documents"] + s["val"]["documents"] == 40
    with pytest.raises(UserError, match=r"no field 'text'.*body, id"):
        prepare(settings(path, tmp_path / "other"), log=quiet)


def test_glob_selects_files(tmp_path):
    for i in range(3):
        (tmp_path / f"part{i}.txt").write_text("\n\n".join(doc(10 * i + j) for j in range(10)))
    (tmp_path / "skip.log").write_text("not text data")
    data = prepare(settings(tmp_path / "part*.txt", tmp_path), log=quiet)
    assert data.meta["files"] == 3


def test_embedded_corpus_loads_offline(tiny_data):
    assert tiny_data.meta["source"] == "embedded:wiki-en"
    assert tiny_data.unique_train_tokens >= 150_000 * 0.9
    text = tiny_data.tokenizer().decode(tiny_data.tokens("train")[:200].tolist())
    assert len(text) > 100


def test_hub_loading_code_path_with_a_local_dataset_folder(tmp_path):
    from pipeline.data.sources import HubSource

    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "train.jsonl").write_text("\n".join(json.dumps({"text": doc(i)}) for i in range(5)))
    docs = list(HubSource(description="hub", name=str(folder)).documents())
    assert docs == [doc(i) for i in range(5)]


def test_unreachable_hub_dataset_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(UserError, match="could not be reached.*--data PATH"):
        prepare(DataSettings(data="someone/some-dataset", cache_dir=str(tmp_path)), log=quiet)


def test_fingerprint_reuses_and_invalidates(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("\n\n".join(doc(i) for i in range(40)))
    built = []
    first = prepare(settings(f, tmp_path), log=built.append)
    again = prepare(settings(f, tmp_path), log=built.append)
    assert again.folder == first.folder and len(built) == 2  # tokenizer + prepared, once
    f.write_text("\n\n".join(doc(i) for i in range(41)))
    changed = prepare(settings(f, tmp_path), log=quiet)
    assert changed.folder != first.folder
    other_vocab = prepare(DataSettings(data=str(f), vocab_size=320, cache_dir=str(tmp_path / "cache"),
                                       val_fraction=0.1), log=quiet)
    assert other_vocab.folder not in (first.folder, changed.folder)


def test_crash_mid_build_leaves_no_entry_and_next_run_builds(tmp_path, monkeypatch):
    f = tmp_path / "c.txt"
    f.write_text("\n\n".join(doc(i) for i in range(40)))
    real_build = cache_mod._build

    def crashing(settings_, source, out, log):
        out.mkdir(parents=True)
        (out / "train.bin").write_bytes(b"\0" * 10)
        raise KeyboardInterrupt  # the process dies half-way
    monkeypatch.setattr(cache_mod, "_build", crashing)
    with pytest.raises(KeyboardInterrupt):
        prepare(settings(f, tmp_path), log=quiet)
    root = tmp_path / "cache"
    assert not [p for p in root.iterdir() if not p.name.startswith(".") and p.is_dir()]
    monkeypatch.setattr(cache_mod, "_build", real_build)
    data = prepare(settings(f, tmp_path), log=quiet)
    assert cache_mod.verify(data.folder) is not None


def test_corrupt_or_truncated_cache_is_rebuilt(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("\n\n".join(doc(i) for i in range(40)))
    data = prepare(settings(f, tmp_path), log=quiet)
    good = data.tokens("train").copy()
    path = data.folder / "train.bin"
    path.write_bytes(path.read_bytes()[:-10])            # truncated
    notes = []
    again = prepare(settings(f, tmp_path), log=notes.append)
    assert any("corrupt" in n for n in notes)
    assert np.array_equal(again.tokens("train"), good)
    raw = bytearray(path.read_bytes())
    raw[5] ^= 0xFF                                       # same size, flipped bits
    path.write_bytes(bytes(raw))
    assert cache_mod.verify(data.folder) is None
    assert np.array_equal(prepare(settings(f, tmp_path), log=quiet).tokens("train"), good)


def _build_in_process(args):
    path, cache_dir = args
    data = prepare(DataSettings(data=path, vocab_size=300, cache_dir=cache_dir, val_fraction=0.1),
                   log=quiet)
    return str(data.folder)


def test_two_concurrent_builders_yield_one_valid_cache(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("\n\n".join(doc(i) for i in range(300)))
    ctx = mp.get_context("spawn")
    with ctx.Pool(2) as pool:
        folders = pool.map(_build_in_process, [(str(f), str(tmp_path / "cache"))] * 2)
    assert folders[0] == folders[1]
    assert cache_mod.verify(cache_mod.Path(folders[0])) is not None
    entries = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert len(entries) == 1  # no temporary folders left behind


def test_bits_per_byte_hand_computed():
    # 10 tokens at 2 bits each (loss 2·ln 2 nats) over 20 bytes = 1 bit per byte
    assert bits_per_byte(2 * np.log(2), tokens=10, n_bytes=20) == pytest.approx(1.0)
    assert bits_per_byte(np.log(2), tokens=4, n_bytes=1) == pytest.approx(4.0)


def test_train_and_val_are_disjoint_documents(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("\n\n".join(doc(i) for i in range(200)))
    data = prepare(settings(f, tmp_path), log=quiet)
    tok = data.tokenizer()
    ids = lambda split: {int(s.split(":")[0].split()[-1]) for s in
                         tok.decode(data.tokens(split).tolist()).split("<|endoftext|>") if ":" in s}
    train, val = ids("train"), ids("val")
    assert train and val and not train & val and len(train | val) == 200
    assert data.bytes_per_token("val") > 1.0


def test_split_is_deterministic_given_seed(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("\n\n".join(doc(i) for i in range(100)))
    a = prepare(settings(f, tmp_path), log=quiet)
    b = prepare(settings(f, tmp_path / "b"), log=quiet)
    assert np.array_equal(a.tokens("val"), b.tokens("val"))


def test_loader_position_restore_gives_identical_next_batch(tiny_data):
    a = BatchLoader(tiny_data.tokens("train"), 32, 4, seed=7)
    for _ in range(5):
        a.next()
    state = a.state_dict()
    expected = a.next()
    a.close()
    b = BatchLoader(tiny_data.tokens("train"), 32, 4, seed=1)
    b.load_state_dict(state)
    got = b.next()
    b.close()
    assert all(np.array_equal(e, g) for e, g in zip(expected, got))
    x, y = got
    assert x.shape == (4, 32) and np.array_equal(x[:, 1:], y[:, :-1])


# --- bad input -------------------------------------------------------------------------------

def test_missing_path(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        prepare(settings(tmp_path / "missing.txt", tmp_path), log=quiet)


def test_empty_corpus(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n   \n")
    with pytest.raises(UserError, match="no text"):
        prepare(settings(tmp_path / "empty.txt", tmp_path), log=quiet)


def test_corpus_smaller_than_one_window_names_the_need(tmp_path):
    with pytest.raises(UserError, match="needs 257"):
        check_window(np.zeros(100, dtype=np.uint16), 256, "train")


def test_binary_file_refused_and_bad_bytes_counted(tmp_path):
    (tmp_path / "bin.txt").write_bytes(os.urandom(4000))
    with pytest.raises(UserError, match="not UTF-8"):
        prepare(settings(tmp_path / "bin.txt", tmp_path), log=quiet)
    text = "\n\n".join(doc(i) for i in range(40)).encode() + b"\n\n\xff\xfe broken \xc3"
    (tmp_path / "mixed.txt").write_bytes(text)
    notes = []
    data = prepare(settings(tmp_path / "mixed.txt", tmp_path), log=notes.append)
    assert data.meta["bad_bytes"] == 3
    assert any("3 bytes were not valid UTF-8" in n for n in notes)


def test_vocab_larger_than_corpus_supports(tmp_path):
    (tmp_path / "small.txt").write_text("\n\n".join(doc(i, 5) for i in range(10)))
    with pytest.raises(UserError, match="supports only"):
        prepare(DataSettings(data=str(tmp_path / "small.txt"), vocab_size=50_000,
                             cache_dir=str(tmp_path / "c")), log=quiet)
    assert not any((tmp_path / "c").glob("[!.]*/meta.json"))


def test_cli_error_is_one_line_and_nonzero(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "pipeline.data", "--data", str(tmp_path / "nope.txt"),
                          "--cache-dir", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and out.stderr.startswith("error: ")
