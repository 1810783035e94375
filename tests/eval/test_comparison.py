"""Method x benchmark tables (`mole-compare`): runs' predictions scored by the writer's own scorer, cells checked
against values counted by hand, the installed script run as users run it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mole_lightning.eval.comparison import (
    DEMO_COLUMNS,
    PAPER_COLUMNS,
    Column,
    comparison_table,
    main,
    read_metrics,
)
from mole_lightning.eval.writer import write_metrics

MOLE_COMPARE = Path(sys.executable).with_name("mole-compare")


def write_run(folder: Path, correct: dict[str, int], total: int = 4) -> Path:
    """A predictions folder as ``mole-train predict`` leaves it: ``predictions.jsonl`` of short answers (task
    ``vqa``, one reference each) with ``correct[source]`` of ``total`` right per source, and its ``metrics.json``."""
    folder.mkdir(parents=True)
    lines = []
    for source, right in correct.items():
        for i in range(total):
            prediction = "red" if i < right else "blue"
            lines.append({"id": f"{source}-{i}", "source": source, "task": "vqa", "prediction": prediction,
                          "answers": ["red"]})  # fmt: skip
    (folder / "predictions.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    write_metrics(str(folder / "predictions.jsonl"), str(folder / "metrics.json"))
    return folder


def test_demo_layout_shows_each_domain_score_and_their_mean_per_run(tmp_path):
    lora = read_metrics(write_run(tmp_path / "lora", {"general": 4, "doc": 1, "med": 2}))
    mole = read_metrics(write_run(tmp_path / "mole", {"general": 3, "doc": 3, "med": 4}))
    table = comparison_table({"LoRA r8": lora, "MoLE": mole}, DEMO_COLUMNS).splitlines()
    assert table[0] == "| method | general | doc | med | mean |"
    # by hand: 4/4, 1/4, 2/4 -> 100, 25, 50, mean 58.3; 3/4, 3/4, 4/4 -> 75, 75, 100, mean 83.3
    assert table[2] == "| LoRA r8 | 100.0 | 25.0 | 50.0 | 58.3 |"
    assert table[3] == "| MoLE | 75.0 | 75.0 | 100.0 | 83.3 |"


def test_missing_values_and_totals(tmp_path):
    columns = (
        Column("a", "general", "vqa", "exact_match"),
        Column("b", "doc", "vqa"),
        Column("a+b", sum_of=("a", "b")),
    )
    both = read_metrics(write_run(tmp_path / "both", {"general": 1, "doc": 2}))
    one = read_metrics(write_run(tmp_path / "one", {"general": 3}))
    rows = comparison_table({"both": both, "one": one}, columns, digits=0).splitlines()
    assert rows[2] == "| both | 25 | 50 | 75 |" and rows[3] == "| one | 75 | - | - |"  # no total from a missing part


def test_mole_compare_script_prints_and_writes_the_table(tmp_path):
    first = write_run(tmp_path / "first", {"general": 2, "doc": 2, "med": 2})
    second = write_run(tmp_path / "second", {"general": 4, "doc": 0, "med": 4})
    out = tmp_path / "table.md"
    args = [f"LoRA={first}", f"MoLE={second / 'predictions.jsonl'}", "--layout", "demo", "--out", str(out)]
    result = subprocess.run([str(MOLE_COMPARE), *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[2:] == [
        "| LoRA | 50.0 | 50.0 | 50.0 | 50.0 |",
        "| MoLE | 100.0 | 0.0 | 100.0 | 66.7 |",
    ]
    assert out.read_text() == result.stdout


def test_mole_compare_bad_runs_are_one_line_errors_with_exit_2(capsys):
    """The installed script once (exit code and stderr as users see them), the other case through its ``main``."""
    result = subprocess.run([str(MOLE_COMPARE), "nameless"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip() == "mole-compare: a run is NAME=PATH, got 'nameless'"
    assert main(["x=/no/such/run"]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == "mole-compare: no metrics file at /no/such/run" and captured.out == ""


def test_a_file_that_is_not_metrics_is_refused(tmp_path):
    (tmp_path / "metrics.json").write_text('["not", "metrics"]')
    with pytest.raises(ValueError, match="is not a metrics.json"):
        read_metrics(tmp_path)


def test_paper_layout_reads_each_benchmark_with_its_own_metric(tmp_path):
    """Predictions of every paper benchmark, scored by the registered tasks; each cell counted by hand with the
    benchmark's rule: Tiny LVLM-eHub word match, ChartQA 5 % relaxed accuracy, DocVQA ANLS, PathVQA open recall
    and closed yes/no accuracy."""
    rows = []
    for source in ("lvlm_vp", "lvlm_vka", "lvlm_vr", "lvlm_vc", "lvlm_oh"):
        rows += [  # one of two right in each category: 50 each, 250 in all
            {"source": source, "task": "lvlm_ehub", "prediction": "It is a red car.", "answers": ["red"]},
            {"source": source, "task": "lvlm_ehub", "prediction": "blue", "answers": ["red"]},
        ]
    rows += [  # 104 is within 5 % of 100, 106 is not: 50
        {"source": "chartqa", "task": "relaxed", "prediction": "104", "answers": ["100"]},
        {"source": "chartqa", "task": "relaxed", "prediction": "106", "answers": ["100"]},
    ]
    # ANLS: "invoice" vs "invoices" is 1 - 1/8 = 0.875; "total" vs "date" is above the 0.5 threshold: 0 -> 43.75
    rows += [
        {"source": "docvqa", "task": "anls", "prediction": "invoice", "answers": ["invoices"]},
        {"source": "docvqa", "task": "anls", "prediction": "total", "answers": ["date"]},
    ]
    rows += [  # open: recall of the answer's words, 2 of 2 and 1 of 2 -> 75; closed: 1 of 2 -> 50
        {"source": "pathvqa", "task": "pathvqa_open", "prediction": "smooth muscle", "answers": ["smooth muscle"]},
        {"source": "pathvqa", "task": "pathvqa_open", "prediction": "muscle cells", "answers": ["skeletal muscle"]},
        {"source": "pathvqa", "task": "pathvqa_closed", "prediction": "yes", "answers": ["yes"]},
        {"source": "pathvqa", "task": "pathvqa_closed", "prediction": "no", "answers": ["yes"]},
    ]
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "predictions.jsonl").write_text("".join(json.dumps({"id": i, **r}) + "\n" for i, r in enumerate(rows)))
    table = comparison_table({"MoLE": read_metrics(folder / "predictions.jsonl")}, PAPER_COLUMNS).splitlines()
    assert table[0] == (
        "| method | VP | VKA | VR | VC | OH | LVLM-eHub | ChartQA | DocVQA | PathVQA open | PathVQA closed |"
    )
    assert table[2] == "| MoLE | 50.0 | 50.0 | 50.0 | 50.0 | 50.0 | 250.0 | 50.0 | 43.8 | 75.0 | 50.0 |"
