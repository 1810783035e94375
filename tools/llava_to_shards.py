"""Convert a LLaVA-format JSON file and its image folder into webdataset shards for one source.

Usage::

    python tools/llava_to_shards.py --json llava_v1_5_mix665k.json --images data/ --source general \
        --out shards/general [--maxcount 10000] [--verify-images]

Writes ``OUT/<source>-%06d.tar``, merges the shard sizes into ``OUT/sizes.json`` and reports every skipped record
(reason counts on stdout, one line per record in ``OUT/<source>-skipped.jsonl``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from mole_lightning.data.llava_json import convert_llava_records, load_llava_json


def build_parser() -> argparse.ArgumentParser:
    """The command line of this tool (also parsed by the documented-commands test)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="LLaVA JSON (list of records) or JSONL file")
    parser.add_argument("--images", required=True, help="folder the records' 'image' paths are relative to")
    parser.add_argument("--source", required=True, help="source name (shard prefix and json 'source' field)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--maxcount", type=int, default=10000, help="samples per shard")
    parser.add_argument("--verify-images", action="store_true", help="decode every image to skip corrupt files")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the conversion; returns the exit code (0, or 1 when nothing could be written)."""
    args = build_parser().parse_args(argv)

    records = load_llava_json(args.json)
    report = convert_llava_records(
        records,
        images_dir=args.images,
        out_dir=args.out,
        source=args.source,
        maxcount=args.maxcount,
        verify_images=args.verify_images,
        progress=not args.no_progress,
        total=len(records),
    )
    skipped_path = os.path.join(args.out, f"{args.source}-skipped.jsonl")
    with open(skipped_path, "w", encoding="utf-8") as handle:
        for entry in report.skipped:
            handle.write(json.dumps(entry) + "\n")
    print(f"{args.source}: wrote {report.written} of {len(records)} records to {len(report.sizes)} shard(s)")
    print(f"  urls: {report.brace_spec}")
    if report.skipped:
        print(f"  skipped {len(report.skipped)} record(s): {json.dumps(report.skipped_by_reason())}")
        for entry in report.skipped[:5]:
            print(f"    #{entry['index']} id={entry['id']}: {entry['reason']} {entry['detail']}")
        print(f"  full list: {skipped_path}")
    return 0 if report.written else 1


if __name__ == "__main__":
    sys.exit(main())
