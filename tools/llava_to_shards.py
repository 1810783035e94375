"""Convert a LLaVA-format JSON file and its image folder into webdataset shards for one source.

Usage::

    python tools/llava_to_shards.py --json llava_v1_5_mix665k.json --images data/ --source general \
        --out shards/general [--maxcount 10000] [--verify-images]

The same as ``mole-convert llava ...`` (:mod:`mole_lightning.convert`): writes ``OUT/<source>-%06d.tar``, merges the
shard sizes into ``OUT/sizes.json`` and reports every skipped record (reason counts on stdout, one line per record in
``OUT/<source>-skipped.jsonl``).
"""

from __future__ import annotations

import argparse
import sys

from mole_lightning import convert


def build_parser() -> argparse.ArgumentParser:
    """The command line of this tool (also parsed by the documented-commands test)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    convert.add_llava_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs ``mole-convert llava``; returns its exit code (0, 1 when nothing could be written, 2 on bad input)."""
    build_parser().parse_args(argv)  # this tool's own usage message on a wrong command line
    return convert.main(["llava", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
