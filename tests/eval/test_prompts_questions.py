"""LLaVA-1.5 eval prompts by task and the question-file converter."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from mole_lightning.data import MixedInstructionDataModule
from mole_lightning.eval.prompts import MULTIPLE_CHOICE_PROMPT, SHORT_ANSWER_PROMPT
from mole_lightning.eval.questions import convert_question_file, question_records
from mole_lightning.eval.tasks import apply_eval_prompt


def test_prompt_suffixes():
    assert apply_eval_prompt("What color is it?", "vqa") == (
        "What color is it?\nAnswer the question using a single word or phrase."
    )
    assert apply_eval_prompt("Is there a dog?", "yesno").endswith("\n" + SHORT_ANSWER_PROMPT)
    assert apply_eval_prompt("Describe the slide.", "open") == "Describe the slide."
    assert apply_eval_prompt("Which shape?", "mc", ["circle", "square"]) == (
        "Which shape?\nA. circle\nB. square\nAnswer with the option's letter from the given choices directly."
    )
    assert apply_eval_prompt("Q?", None) == "Q?"
    with pytest.raises(ValueError):
        apply_eval_prompt("Q?", "essay")


def test_prompt_not_added_twice():
    once = apply_eval_prompt("Which shape?", "mc", ["circle", "square"])
    assert apply_eval_prompt(once, "mc", ["circle", "square"]) == once
    short = f"What is it?\n{SHORT_ANSWER_PROMPT}"
    assert apply_eval_prompt(short, "vqa") == short
    vizwiz = apply_eval_prompt("What is it?", "vqa", unanswerable=True)
    assert apply_eval_prompt(vizwiz, "vqa", unanswerable=True) == vizwiz


# LLaVA-1.5's VizWiz question suffix (scripts/v1_5/eval/vizwiz.sh questions, read by model_vqa_loader.py), verbatim
LLAVA_VIZWIZ_SUFFIX = (
    "\nWhen the provided information is insufficient, respond with 'Unanswerable'."
    "\nAnswer the question using a single word or phrase."
)


def test_vizwiz_prompt_is_llava_official():
    assert apply_eval_prompt("What is it?", "vqa", unanswerable=True) == "What is it?" + LLAVA_VIZWIZ_SUFFIX
    assert apply_eval_prompt("Is it on? ", "yesno", unanswerable=True) == "Is it on?" + LLAVA_VIZWIZ_SUFFIX


def test_question_records_tasks_and_fields():
    questions = [
        {"question_id": 7, "image": "a.png", "text": "<image>\nIs there a cat?", "label": "no", "category": "random"},
        {"question_id": "q2", "text": "Which one?", "options": {"A": "red", "B": "blue"}, "answer": "B"},
        {"question_id": 3, "text": f"What is written?\n{SHORT_ANSWER_PROMPT}", "answers": ["cat", "cats"]},
        {"question_id": 4, "text": "Describe it.", "task": "open"},
    ]
    records = list(question_records(questions, source="bench"))
    assert [r["task"] for r in records] == ["yesno", "mc", "vqa", "open"]
    assert records[0]["conversations"][0]["value"] == f"<image>\nIs there a cat?\n{SHORT_ANSWER_PROMPT}"
    assert records[0]["conversations"][1] == {"from": "gpt", "value": "no"}
    assert records[0]["answers"] == ["no"] and records[0]["category"] == "random" and records[0]["id"] == "7"
    assert records[1]["options"] == ["red", "blue"]
    assert records[1]["conversations"][0]["value"] == f"Which one?\nA. red\nB. blue\n{MULTIPLE_CHOICE_PROMPT}"
    assert records[2]["conversations"][0]["value"].count(SHORT_ANSWER_PROMPT) == 1
    assert records[3]["answers"] == [] and len(records[3]["conversations"]) == 1
    assert "image" not in records[1]


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 20, 20)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_convert_question_file_to_evaluable_shards(tmp_path, demo):
    images = tmp_path / "images"
    images.mkdir()
    (images / "one.png").write_bytes(_png())
    (images / "two.png").write_bytes(_png())
    lines = [
        {"question_id": 1, "image": "one.png", "text": "Is there a red square?"},
        {"question_id": 2, "image": "two.png", "text": "Which color?", "options": ["red", "green"]},
        {"question_id": 3, "image": "missing.png", "text": "Is it blue?"},
    ]
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps(x) + "\n" for x in lines))
    answers = tmp_path / "answers.jsonl"
    answers.write_text(
        json.dumps({"question_id": 1, "label": "yes"}) + "\n" + json.dumps({"question_id": 2, "answer": "A"})
    )
    report = convert_question_file(
        str(questions), str(images), str(tmp_path / "out"), "bench", answers_path=str(answers)
    )
    assert report.written == 2
    assert report.skipped_by_reason() == {"missing_image": 1}

    dm = MixedInstructionDataModule(
        sources={"bench": {"urls": report.brace_spec}},
        val_sources={"bench": {"urls": report.brace_spec}},
        tokenizer=demo.tokenizer,
        num_image_tokens=4,
        image_size=32,
        num_workers=0,
        batch_size=4,
    )
    dm.setup("validate")
    batches = list(dm.generation_dataloaders()["bench"])
    assert len(batches) == 1
    batch = batches[0]
    assert batch["id"] == ["1", "2"]
    assert batch["task"] == ["yesno", "mc"]
    assert batch["answers"] == [["yes"], ["A"]]
    assert batch["question"][0] == f"Is there a red square?\n{SHORT_ANSWER_PROMPT}"
    assert batch["question"][1] == f"Which color?\nA. red\nB. green\n{MULTIPLE_CHOICE_PROMPT}"
    assert batch["has_image"].tolist() == [True, True]


def test_read_records_official_vqav2_files(tmp_path):
    from mole_lightning.eval.questions import read_records, references_of

    annotations = {
        "info": {},
        "annotations": [
            {
                "question_id": 7,
                "answers": [{"answer": "cat", "answer_id": i + 1} for i in range(3)]
                + [{"answer": "dog", "answer_id": i + 4} for i in range(7)],
            },
        ],
    }
    questions = {"info": {}, "questions": [{"question_id": 7, "image_id": 1, "question": "What animal?"}]}
    (tmp_path / "ann.json").write_text(json.dumps(annotations))
    (tmp_path / "q.json").write_text(json.dumps(questions, indent=1))  # pretty-printed over several lines
    records = read_records(str(tmp_path / "ann.json"))
    assert [r["question_id"] for r in records] == [7]
    assert references_of(records[0]) == ["cat"] * 3 + ["dog"] * 7  # all 10 annotator answers, in order
    assert read_records(str(tmp_path / "q.json"))[0]["question"] == "What animal?"
    # JSONL and a single plain object still read as before
    (tmp_path / "rows.jsonl").write_text('{"question_id": 1}\n{"question_id": 2}\n')
    assert [r["question_id"] for r in read_records(str(tmp_path / "rows.jsonl"))] == [1, 2]
    (tmp_path / "one.json").write_text('{"question_id": 3, "answer": "yes"}')
    assert read_records(str(tmp_path / "one.json")) == [{"question_id": 3, "answer": "yes"}]
