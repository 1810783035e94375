"""Convert a LLaVA-1.5 benchmark question file (JSONL with question_id, image, text) into webdataset shards.

Usage::

    python tools/convert_llava_questions.py --questions llava_pope_test.jsonl --images val2014/ --source pope \
        --out shards/pope [--answers pope_labels.jsonl] [--task yesno] [--no-prompt] [--limit 500]

The same as ``mole-convert questions ...`` (:mod:`mole_lightning.convert`): references are read from the records
(``answers``/``answer``/``label``/``gt_answer``) or from ``--answers``; the LLaVA-1.5 task suffix is added to each
question unless ``--no-prompt``. Writes ``OUT/<source>-%06d.tar`` and ``OUT/sizes.json``; the shards can be given to
the DataModule as ``val_sources`` and evaluated with ``GenerationEvalCallback`` (``mole-train validate``) or
``mole-train predict``.
"""

from __future__ import annotations

import argparse
import sys

from mole_lightning import convert


def build_parser() -> argparse.ArgumentParser:
    """The command line of this tool (also parsed by the documented-commands test)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    convert.add_question_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs ``mole-convert questions``; returns its exit code (0, 1 when nothing was written, 2 on bad input)."""
    build_parser().parse_args(argv)  # this tool's own usage message on a wrong command line
    return convert.main(["questions", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
