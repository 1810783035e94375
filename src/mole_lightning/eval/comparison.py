"""Method x benchmark tables in the LLaVA-MoLE paper's layout: one row per run, one column per benchmark.

A run is the ``metrics.json`` its prediction writer left (``mole-train predict``: flat
``"<source>/<task>/<value>"`` keys of :class:`~mole_lightning.eval.metrics.SourceTaskMetrics`). A :class:`Column`
names which key it shows; a layout is a tuple of columns:

* :data:`PAPER_COLUMNS`: the paper's table -- the five Tiny LVLM-eHub categories and their sum (each category's
  accuracy x 100, so the sum is out of 500, as the paper's "overall 306.3"), ChartQA relaxed accuracy, DocVQA ANLS,
  PathVQA open (recall) and closed (accuracy), all x 100. The eval shards carry these ``source`` names (see
  docs/reproduce.md): ``lvlm_vp``, ``lvlm_vka``, ``lvlm_vr``, ``lvlm_vc``, ``lvlm_oh``, ``chartqa``, ``docvqa`` and
  ``pathvqa`` (with tasks ``pathvqa_open`` and ``pathvqa_closed``).
* :data:`DEMO_COLUMNS`: the same layout on the demo data -- one column per demo domain (its mean sample score) and
  the mean over domains.

Rows are the runs in the order given, e.g. LoRA r32, LoRA r128, dense (parameter-matched), MoLE official, MoLE
variant. A value a run lacks is ``-``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from mole_lightning.eval.tasks import task_spec
from mole_lightning.eval.writer import score_jsonl


@dataclass(frozen=True)
class Column:
    """One benchmark column.

    Attributes:
        header: Column title.
        source: ``source`` of the eval samples (``overall`` for all sources).
        task: Their task (``None``: the source's mean sample score, ``"<source>/score"``).
        value: The task's metric value shown (``None``: the task's primary value).
        scale: Factor applied to the value (100: percentages).
        sum_of: Headers of earlier columns whose values this column adds up (a total; ``source`` unused).
    """

    header: str
    source: str = "overall"
    task: str | None = None
    value: str | None = None
    scale: float = 100.0
    sum_of: tuple[str, ...] = ()

    def key(self) -> str:
        """The ``metrics.json`` key this column reads."""
        if self.task is None:
            return f"{self.source}/score"
        return f"{self.source}/{self.task}/{self.value or task_spec(self.task).primary}"


LVLM_EHUB_CATEGORIES = (
    ("VP", "lvlm_vp"),  # visual perception
    ("VKA", "lvlm_vka"),  # visual knowledge acquisition
    ("VR", "lvlm_vr"),  # visual reasoning
    ("VC", "lvlm_vc"),  # visual commonsense
    ("OH", "lvlm_oh"),  # object hallucination
)

PAPER_COLUMNS: tuple[Column, ...] = (
    *(Column(header, source, "lvlm_ehub") for header, source in LVLM_EHUB_CATEGORIES),
    Column("LVLM-eHub", sum_of=tuple(header for header, _ in LVLM_EHUB_CATEGORIES)),
    Column("ChartQA", "chartqa", "relaxed"),
    Column("DocVQA", "docvqa", "anls"),
    Column("PathVQA open", "pathvqa", "pathvqa_open"),
    Column("PathVQA closed", "pathvqa", "pathvqa_closed"),
)

DEMO_COLUMNS: tuple[Column, ...] = (
    Column("general", "general"),
    Column("doc", "doc"),
    Column("med", "med"),
    Column("mean", "overall"),  # the mean of the source scores
)

LAYOUTS = {"paper": PAPER_COLUMNS, "demo": DEMO_COLUMNS}


def cell_values(metrics: Mapping[str, float], columns: Sequence[Column]) -> dict[str, float | None]:
    """``{header: scaled value or None}`` of one run; a total is ``None`` unless every part is present."""
    values: dict[str, float | None] = {}
    for column in columns:
        if column.sum_of:
            parts = [values.get(header) for header in column.sum_of]
            values[column.header] = None if any(p is None for p in parts) else sum(parts)
            continue
        raw = metrics.get(column.key())
        values[column.header] = None if raw is None else float(raw) * column.scale
    return values


def comparison_table(runs: Mapping[str, Mapping[str, float]], columns: Sequence[Column], digits: int = 1) -> str:
    """A Markdown table: a ``method`` column, then one column per :class:`Column`, one row per run."""
    header = ["method", *(column.header for column in columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, metrics in runs.items():
        values = cell_values(metrics, columns)
        cells = ["-" if values[c.header] is None else f"{values[c.header]:.{digits}f}" for c in columns]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    return "\n".join(lines)


def read_metrics(path: str | Path) -> dict[str, float]:
    """A run's ``metrics.json`` (a folder: its ``metrics.json``; a ``predictions.jsonl``: scored now).

    Raises:
        ValueError: the file is missing or is not a JSON object of numbers.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.json"
    if not path.is_file():
        raise ValueError(f"no metrics file at {path}")
    if path.suffix == ".jsonl":
        return score_jsonl(str(path))
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not JSON: {error.msg} at line {error.lineno}") from None
    if not isinstance(metrics, dict) or not all(isinstance(v, (int, float)) for v in metrics.values()):
        raise ValueError(f"{path} is not a metrics.json (a JSON object of numbers)")
    return metrics


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mole-compare",
        description="Method x benchmark table (the LLaVA-MoLE paper's layout) from the runs' metrics.json files.",
    )
    parser.add_argument(
        "runs",
        nargs="+",
        metavar="NAME=PATH",
        help="a row: its name and the run's metrics.json, predictions folder or predictions.jsonl",
    )
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="paper", help="columns (default: paper)")
    parser.add_argument("--digits", type=int, default=1, help="decimals (default: 1)")
    parser.add_argument("--out", help="also write the table to this Markdown file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    runs: dict[str, dict[str, float]] = {}
    try:
        for item in args.runs:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"a run is NAME=PATH, got {item!r}")
            runs[name] = read_metrics(path)
    except ValueError as error:
        print(f"mole-compare: {error}", file=sys.stderr)
        return 2
    table = comparison_table(runs, LAYOUTS[args.layout], args.digits)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
