"""``mole-convert``: downloaded datasets in their release formats → webdataset shards of one source.

One subcommand per format (the mappings are in :mod:`mole_lightning.data.llava_json`,
:mod:`mole_lightning.data.paper_datasets` and, for LLaVA-1.5 benchmark questions,
:mod:`mole_lightning.eval.questions`)::

    mole-convert llava --json llava_v1_5_mix665k.json --images data/ --source general --out shards/general
    mole-convert m3it --jsonl m3it/data/*/*/train.jsonl --source general --out shards/m3it
    mole-convert sharegpt4v --json sharegpt4v_mix665k_cap23k_coco-ap9k_lcs3k_sam9k_div2k.json --images data/ \
        --source general --out shards/sharegpt4v_ft
    mole-convert ureader --jsonl ureader_json/train.jsonl --images ureader_images/ --source doc --out shards/doc
    mole-convert pathvqa --input path-vqa/train.parquet --upsample-to 400000 --source med --out shards/med
    mole-convert questions --questions llava_pope_test.jsonl --images val2014/ --source pope --out shards/pope

Each writes ``OUT/<source>-%06d.tar``, merges the shard sizes into ``OUT/sizes.json``, prints the counts of skipped
records per reason and lists every skipped record in ``OUT/<source>-skipped.jsonl``. Exit status: 0 when records
were written, 1 when none could be, 2 on bad input (a missing or unreadable file) with a one-line error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

from mole_lightning.data.llava_json import ConversionReport, convert_llava_records, load_llava_json
from mole_lightning.data.paper_datasets import (
    convert_m3it,
    convert_pathvqa,
    convert_sharegpt4v,
    convert_ureader,
    read_pathvqa,
)
from mole_lightning.eval.questions import convert_question_file
from mole_lightning.eval.tasks import task_names


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """``--source``, ``--out``, ``--maxcount``, ``--verify-images``, ``--no-progress`` (every subcommand)."""
    parser.add_argument("--source", required=True, help="source name (shard prefix and json 'source' field)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--maxcount", type=int, default=10000, help="samples per shard")
    parser.add_argument("--verify-images", action="store_true", help="decode every image to skip corrupt files")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--task", help="evaluation task written into every json, with the reply as 'answers'")


def add_llava_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``llava`` subcommand's arguments (also ``tools/llava_to_shards.py``'s command line)."""
    parser.add_argument("--json", required=True, help="LLaVA JSON (list of records) or JSONL file")
    parser.add_argument("--images", required=True, help="folder the records' 'image' paths are relative to")
    add_output_arguments(parser)


def _options(args: argparse.Namespace) -> dict:
    return {
        "maxcount": args.maxcount,
        "verify_images": args.verify_images,
        "progress": not args.no_progress,
        "task": args.task,
    }


def run_llava(args: argparse.Namespace) -> tuple[ConversionReport, int]:
    records = load_llava_json(args.json)
    report = convert_llava_records(records, args.images, args.out, args.source, total=len(records), **_options(args))
    return report, len(records)


def run_m3it(args: argparse.Namespace) -> tuple[ConversionReport, int]:
    report = convert_m3it(args.jsonl, args.out, args.source, **_options(args))
    return report, report.written + len(report.skipped)


def run_sharegpt4v(args: argparse.Namespace) -> tuple[ConversionReport, int]:
    report = convert_sharegpt4v(args.json, args.images, args.out, args.source, **_options(args))
    return report, report.written + len(report.skipped)


def run_ureader(args: argparse.Namespace) -> tuple[ConversionReport, int]:
    report = convert_ureader(args.jsonl, args.images, args.out, args.source, **_options(args))
    return report, report.written + len(report.skipped)


def run_pathvqa(args: argparse.Namespace) -> tuple[ConversionReport, int]:
    records = [record for path in args.input for record in read_pathvqa(path)]
    options = _options(args)
    report = convert_pathvqa(records, args.images, args.out, args.source, args.upsample_to, args.seed, **options)
    return report, len(records)


def run_questions(args: argparse.Namespace) -> tuple[ConversionReport, int]:
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
    return report, report.written + len(report.skipped)


def add_question_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``questions`` subcommand's arguments (also ``tools/convert_llava_questions.py``'s command line)."""
    parser.add_argument("--questions", required=True, help="question file (JSONL or JSON list)")
    parser.add_argument("--images", default=".", help="folder the records' 'image' paths are relative to")
    parser.add_argument("--source", required=True, help="source name (shard prefix)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--answers", help="file of {question_id, answer|answers|label} records")
    parser.add_argument("--task", choices=task_names(), help="task of records without one (default: guessed)")
    parser.add_argument("--no-prompt", action="store_true", help="do not add LLaVA-1.5's task suffix")
    parser.add_argument("--maxcount", type=int, default=10000, help="samples per shard")
    parser.add_argument("--limit", type=int, help="convert only the first N questions")


RUNNERS: dict[str, Callable[[argparse.Namespace], tuple[ConversionReport, int]]] = {
    "llava": run_llava,
    "m3it": run_m3it,
    "sharegpt4v": run_sharegpt4v,
    "ureader": run_ureader,
    "pathvqa": run_pathvqa,
    "questions": run_questions,
}


def build_parser() -> argparse.ArgumentParser:
    """The ``mole-convert`` command line (also parsed by the documented-commands test)."""
    parser = argparse.ArgumentParser(prog="mole-convert", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="format", required=True, metavar="FORMAT")

    add_llava_arguments(commands.add_parser("llava", help="LLaVA JSON + image folder"))

    m3it = commands.add_parser("m3it", help="M3IT jsonl files (instruction/inputs/outputs, base64 images)")
    m3it.add_argument("--jsonl", nargs="+", required=True, help="M3IT .jsonl files (data/<task>/<dataset>/*.jsonl)")
    add_output_arguments(m3it)

    sharegpt4v = commands.add_parser("sharegpt4v", help="ShareGPT4V PT or FT JSON + image root")
    sharegpt4v.add_argument("--json", required=True, help="the PT or FT JSON list")
    sharegpt4v.add_argument("--images", required=True, help="folder the records' 'image' paths are relative to")
    add_output_arguments(sharegpt4v)

    ureader = commands.add_parser("ureader", help="UReader instruction jsonl + image root")
    ureader.add_argument("--jsonl", nargs="+", required=True, help="ureader_json/*.jsonl files")
    ureader.add_argument("--images", required=True, help="folder the records' 'image' paths are relative to")
    add_output_arguments(ureader)

    pathvqa = commands.add_parser("pathvqa", help="PathVQA (HF parquet or LLaVA-Med JSON), upsampled as LLaVA-Med")
    pathvqa.add_argument("--input", nargs="+", required=True, help="HF .parquet, LLaVA-Med .json or .jsonl rows")
    pathvqa.add_argument("--images", default="", help="folder relative image paths are resolved in")
    pathvqa.add_argument("--upsample-to", type=int, default=None, help="samples to write (LLaVA-Med: 400000)")
    pathvqa.add_argument("--seed", type=int, default=0, help="seed of the records repeated once more")
    add_output_arguments(pathvqa)

    questions = commands.add_parser("questions", help="LLaVA-1.5 benchmark questions (question_id, image, text)")
    add_question_arguments(questions)
    return parser


def report_conversion(report: ConversionReport, source: str, out: str, read: int) -> None:
    """Prints the counts and writes ``OUT/<source>-skipped.jsonl`` (one line per skipped record)."""
    skipped_path = os.path.join(out, f"{source}-skipped.jsonl")
    os.makedirs(out, exist_ok=True)
    with open(skipped_path, "w", encoding="utf-8") as handle:
        for entry in report.skipped:
            handle.write(json.dumps(entry, default=str) + "\n")
    print(f"{source}: wrote {report.written} of {read} records to {len(report.sizes)} shard(s)")
    if report.written:
        print(f"  urls: {report.brace_spec}")
    else:  # no shard was written: a URL here would name a file that does not exist
        print(f"  no samples written: {'every record was skipped' if read else 'the input holds no records'}")
    if report.skipped:
        print(f"  skipped {len(report.skipped)} record(s): {json.dumps(report.skipped_by_reason())}")
        for entry in report.skipped[:5]:
            print(f"    #{entry['index']} id={entry['id']}: {entry['reason']} {entry['detail']}")
        print(f"  full list: {skipped_path}")


def main(argv: list[str] | None = None) -> int:
    """Runs one conversion; returns the exit status (0 written, 1 nothing written, 2 bad input)."""
    args = build_parser().parse_args(argv)
    if args.maxcount < 1:
        print(f"mole-convert: error: --maxcount must be >= 1, got {args.maxcount}", file=sys.stderr)
        return 2
    try:
        report, read = RUNNERS[args.format](args)
    except (OSError, ValueError) as error:  # missing/unreadable files, malformed JSON, bad upsampling target
        print(f"mole-convert {args.format}: error: {error}", file=sys.stderr)
        return 2
    report_conversion(report, args.source, args.out, read)
    return 0 if report.written else 1


if __name__ == "__main__":
    sys.exit(main())
