"""Convert a LLaVA-1.5 benchmark question file (JSONL with question_id, image, text) into webdataset shards.

Usage::

    python tools/convert_llava_questions.py --questions llava_pope_test.jsonl --images val2014/ --source pope \
        --out shards/pope [--answers pope_labels.jsonl] [--task yesno] [--no-prompt] [--limit 500]

References are read from the records (``answers``/``answer``/``label``/``gt_answer``) or from ``--answers``. The
LLaVA-1.5 task suffix is added to each question unless ``--no-prompt``. Writes ``OUT/<source>-%06d.tar`` and
``OUT/sizes.json``; the shards can be given to the DataModule as ``val_sources`` and evaluated with
``GenerationEvalCallback`` (``mole-train validate``) or ``mole-train predict``.
"""

from __future__ import annotations

import argparse
import json
import sys

from mole_lightning.eval.questions import convert_question_file
from mole_lightning.eval.tasks import task_names


def build_parser() -> argparse.ArgumentParser:
    """The command line of this tool (also parsed by the documented-commands test)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", required=True, help="question file (JSONL or JSON list)")
    parser.add_argument("--images", default=".", help="folder the records' 'image' paths are relative to")
    parser.add_argument("--source", required=True, help="source name (shard prefix)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--answers", help="file of {question_id, answer|answers|label} records")
    parser.add_argument("--task", choices=task_names(), help="task of records without one (default: guessed)")
    parser.add_argument("--no-prompt", action="store_true", help="do not add LLaVA-1.5's task suffix")
    parser.add_argument("--maxcount", type=int, default=10000, help="samples per shard")
    parser.add_argument("--limit", type=int, help="convert only the first N questions")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the conversion; returns 0, or 1 when nothing was written."""
    args = build_parser().parse_args(argv)

    report = convert_question_file(
        args.questions,
        args.images,
        args.out,
        args.source,
        task=args.task,
        apply_prompt=not args.no_prompt,
        answers_path=args.answers,
        maxcount=args.maxcount,
        limit=args.limit,
    )
    print(f"{args.source}: wrote {report.written} question(s) to {len(report.sizes)} shard(s): {report.brace_spec}")
    if report.skipped:
        print(f"  skipped {len(report.skipped)}: {json.dumps(report.skipped_by_reason())}")
        for entry in report.skipped[:5]:
            print(f"    id={entry['id']}: {entry['reason']} {entry['detail']}")
    return 0 if report.written else 1


if __name__ == "__main__":
    sys.exit(main())
