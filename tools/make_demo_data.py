"""Write the synthetic demo data set: ``general``/``doc``/``med`` shards (train and val) and a demo tokenizer.

Usage::

    python tools/make_demo_data.py --out data/demo [--train 2000 --val 100 --seed 0]

Writes ``OUT/train/<source>-%06d.tar``, ``OUT/val/<source>-%06d.tar`` (each with ``sizes.json``) and
``OUT/tokenizer/``.
"""

from __future__ import annotations

import argparse
import json
import time

from mole_lightning.data.demo import make_demo_data


def build_parser() -> argparse.ArgumentParser:
    """The command line of this tool (also parsed by the documented-commands test)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--train", type=int, default=2000, help="training samples per source")
    parser.add_argument("--val", type=int, default=100, help="validation samples per source")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--maxcount", type=int, default=1000, help="samples per shard")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Parses arguments and writes the demo data."""
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    demo = make_demo_data(args.out, train=args.train, val=args.val, seed=args.seed, maxcount=args.maxcount)
    summary = {"tokenizer": demo.tokenizer, "train": demo.train, "val": demo.val}
    print(json.dumps(summary, indent=1))
    print(f"wrote demo data to {args.out} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
