"""`python -m pipeline.data [--data SPEC] ...`: prepare (or reuse) the packed token cache and
print what it holds."""
from __future__ import annotations

import argparse
import json

from pipeline.data.cache import DataSettings, prepare
from pipeline.errors import ArgumentParser, cli, run_script


def add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, help="wiki-en (default) | wiki-fr | wiki-es | PATH/GLOB | HUB_NAME[:CONFIG]")
    g.add_argument("--text-field", default="text", help="text column of JSONL/Parquet/CSV/hub data")
    g.add_argument("--hub-split", default="train")
    g.add_argument("--tokenizer", default=None, help="tokenizer.json, folder or hub name (default: train BPE)")
    g.add_argument("--vocab-size", type=int, default=None)
    g.add_argument("--val-fraction", type=float, default=0.02)
    g.add_argument("--max-tokens", type=int, default=None, help="cap on training tokens prepared")
    g.add_argument("--cache-dir", default=None)


def settings_from_args(args, seed: int = 0) -> DataSettings:
    return DataSettings(data=args.data, text_field=args.text_field, hub_split=args.hub_split,
                        tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                        val_fraction=args.val_fraction, seed=seed, max_tokens=args.max_tokens,
                        cache_dir=args.cache_dir)


@cli
def main(argv=None):
    p = ArgumentParser(prog="python -m pipeline.data", description=__doc__)
    add_data_args(p)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    data = prepare(settings_from_args(args, args.seed))
    print(json.dumps({"folder": str(data.folder), **{k: data.meta[k] for k in
                      ("source", "vocab_size", "dtype", "splits", "bad_bytes", "build_seconds")}}, indent=2))


if __name__ == "__main__":
    run_script(main)
