"""The converter command lines, run as a user runs them: ``python tools/<tool>.py ...`` in a subprocess (exit code,
printed report, files written); one case through the tool's ``main``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import mole_lightning
from tests.conftest import load_tool
from tests.data.conftest import image_bytes

ROOT = Path(__file__).parents[2]
SRC = Path(mole_lightning.__file__).parents[1]

# LLaVA-1.5's short-answer and multiple-choice suffixes (docs/Evaluation.md, model_vqa_loader.py), verbatim
SHORT = "Answer the question using a single word or phrase."
CHOICE = "Answer with the option's letter from the given choices directly."


def run_tool(name: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, str(ROOT / "tools" / f"{name}.py"), *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def turn(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def test_llava_to_shards_command_line_with_list_valued_images(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    red, blue = image_bytes((255, 0, 0)), image_bytes((0, 0, 255))
    (images / "red.png").write_bytes(red)
    (images / "blue.png").write_bytes(blue)
    records = [
        {"id": "plain", "image": "red.png", "conversations": turn("<image>\nColour?", "red")},
        {"id": "one", "image": ["blue.png"], "conversations": turn("<image>\nColour?", "blue")},
        {"id": "two", "image": ["red.png", "blue.png"], "conversations": turn("<image>\nSame?", "no")},
        {"id": "gone", "image": ["nowhere.png"], "conversations": turn("<image>\nColour?", "?")},
    ]
    (tmp_path / "llava.json").write_text(json.dumps(records))
    out = tmp_path / "shards"
    args = ["--json", str(tmp_path / "llava.json"), "--images", str(images), "--source", "mine", "--out", str(out)]
    result = run_tool("llava_to_shards", *args, "--no-progress")

    assert result.returncode == 0, result.stderr
    assert "mine: wrote 2 of 4 records to 1 shard(s)" in result.stdout
    assert '"multiple_images": 1' in result.stdout and '"missing_image": 1' in result.stdout
    skipped = [json.loads(line) for line in (out / "mine-skipped.jsonl").read_text().splitlines()]
    assert [(s["id"], s["reason"]) for s in skipped] == [("two", "multiple_images"), ("gone", "missing_image")]
    assert json.loads((out / "sizes.json").read_text()) == {"mine-000000.tar": 2}
    members = tar_members(out / "mine-000000.tar")
    assert members["000000000.png"] == red and members["000000001.png"] == blue  # image bytes unchanged
    one = json.loads(members["000000001.json"])
    assert one["id"] == "one" and one["image"] == "blue.png" and one["source"] == "mine"

    (tmp_path / "none.json").write_text(json.dumps(records[2:]))
    nothing = run_tool("llava_to_shards", "--json", str(tmp_path / "none.json"), *args[2:], "--no-progress")
    assert nothing.returncode == 1 and "mine: wrote 0 of 2 records" in nothing.stdout


def test_mole_convert_questions_command_line(tmp_path, capsys):
    """``mole-convert questions`` (the installed script) and its old spelling ``tools/convert_llava_questions.py``."""
    images = tmp_path / "val"
    images.mkdir()
    (images / "a.png").write_bytes(image_bytes((0, 200, 0)))
    (images / "b.png").write_bytes(image_bytes((200, 200, 0)))
    questions = [
        {"question_id": 11, "image": "a.png", "text": "Is there a green square?", "label": "yes"},
        {"question_id": 12, "image": "b.png", "text": "Which colour?", "options": ["green", "yellow"], "answer": "B"},
        {"question_id": 13, "image": "missing.png", "text": "Is it red?", "label": "no"},
    ]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    out = tmp_path / "bench"
    args = ["--questions", str(tmp_path / "q.jsonl"), "--images", str(images), "--source", "bench", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [str(Path(sys.executable).parent / "mole-convert"), "questions", *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("bench: wrote 2 of 3 records to 1 shard(s)\n")
    assert '"missing_image": 1' in result.stdout and "id=13" in result.stdout
    skipped = [json.loads(line) for line in (out / "bench-skipped.jsonl").read_text().splitlines()]
    assert [(entry["id"], entry["reason"]) for entry in skipped] == [("13", "missing_image")]
    members = tar_members(out / "bench-000000.tar")
    rows = [json.loads(members[name]) for name in sorted(members) if name.endswith(".json")]
    assert [row["id"] for row in rows] == ["11", "12"]
    assert rows[0]["conversations"][0]["value"] == f"<image>\nIs there a green square?\n{SHORT}"
    assert rows[1]["conversations"][0]["value"] == f"<image>\nWhich colour?\nA. green\nB. yellow\n{CHOICE}"
    assert rows[0]["answers"] == ["yes"] and rows[1]["answers"] == ["B"]

    (tmp_path / "none.jsonl").write_text(json.dumps(questions[2]) + "\n")
    tool = load_tool("convert_llava_questions")  # the old spelling, in-process
    assert tool.main(["--questions", str(tmp_path / "none.jsonl"), *args[2:]]) == 1
    assert "bench: wrote 0 of 1 records" in capsys.readouterr().out
    assert tool.main(["--questions", str(tmp_path / "absent.jsonl"), *args[2:]]) == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1 and "absent.jsonl" in error


def test_an_empty_llava_json_writes_no_shard_and_names_no_url(tmp_path, capsys):
    """Through the tool's ``main`` (the command line itself runs in the tests above)."""
    (tmp_path / "empty.json").write_text("[]")
    (tmp_path / "images").mkdir()
    args = ["--json", str(tmp_path / "empty.json"), "--images", str(tmp_path / "images"), "--source", "general"]
    code = load_tool("llava_to_shards").main([*args, "--out", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert code == 1, printed  # nothing written: not a success
    assert "wrote 0 of 0 records to 0 shard(s)" in printed and "the input holds no records" in printed
    assert "urls:" not in printed and not list((tmp_path / "out").glob("*.tar"))
