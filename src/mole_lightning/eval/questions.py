"""Convert LLaVA-1.5-style benchmark question files into webdataset shards that the DataModule can evaluate.

A question file is JSONL (or a JSON list) with one question per record, as LLaVA-1.5's ``model_vqa_loader.py``
reads them::

    {"question_id": 1, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a snowboard in the image?",
     "label": "yes", "category": "adversarial"}

Fields used: ``question_id`` (required), ``text`` (required; a leading ``<image>`` is removed), ``image`` (optional,
relative to the image folder), references from ``answers`` (list or string), ``answer``, ``label`` or
``gt_answer`` (optional: without them the sample can be predicted but not scored), ``options`` (list of option
texts, or a dict ``{"A": ..., "B": ...}``), ``task`` and ``category`` (kept). References may also come from a
separate file (``answers_file``: records with ``question_id`` and one of the reference fields).

Each question becomes ``{"id", "image", "source", "conversations": [human: "<image>\\n" + prompt (, gpt: first
answer)], "answers", "task", "options"?, "category"?}`` where the prompt is the question with its task's prompt
(:func:`~mole_lightning.eval.tasks.apply_eval_prompt`: LLaVA-1.5's suffix, or Tiny LVLM-eHub's prefix for
``lvlm_ehub``; text already in the question is kept once). The
task is the record's ``task``, else the ``task`` argument, else inferred: ``mc`` with options or when the text asks
for an option's letter, ``yesno`` when every reference is yes/no, ``vqa`` otherwise.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from typing import Any

from mole_lightning.constants import DEFAULT_IMAGE_TOKEN
from mole_lightning.data.llava_json import ConversionReport
from mole_lightning.data.shard_writer import ShardWriter, image_field
from mole_lightning.eval.prompts import SHORT_ANSWER_PROMPT
from mole_lightning.eval.tasks import apply_eval_prompt, infer_task, task_names

REFERENCE_FIELDS = ("answers", "answer", "label", "gt_answer")


WRAPPED_RECORD_LISTS = ("annotations", "questions")  # official VQAv2 annotation / question files


def read_records(path: str) -> list[dict[str, Any]]:
    """Records of a JSONL file (one object per line), a JSON list, or a JSON object holding them under
    ``annotations`` or ``questions`` (the official VQAv2 files, whose ``answers`` are the 10 annotator answers)."""
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    stripped = text.lstrip()
    data: Any = None
    if stripped.startswith("["):
        data = json.loads(stripped)
    elif stripped.startswith("{"):
        try:
            whole = json.loads(stripped)
        except json.JSONDecodeError:  # several objects: JSONL
            whole = None
        if isinstance(whole, dict):
            wrapped = [whole[k] for k in WRAPPED_RECORD_LISTS if isinstance(whole.get(k), list)]
            data = wrapped[0] if wrapped else [whole]
    if data is None:
        data = [json.loads(line) for line in text.splitlines() if line.strip()]
    if not all(isinstance(r, dict) for r in data):
        raise ValueError(f"{path}: every record must be a JSON object")
    return data


def references_of(record: dict[str, Any]) -> list[str]:
    """Reference answers of a record from the first present field of :data:`REFERENCE_FIELDS`."""
    for name in REFERENCE_FIELDS:
        value = record.get(name)
        if value is None or value == "" or value == []:
            continue
        if isinstance(value, (list, tuple)):
            return [str(v.get("answer", v)) if isinstance(v, dict) else str(v) for v in value]
        return [str(value)]
    return []


def options_of(record: dict[str, Any]) -> list[str] | None:
    """Option texts in letter order from ``options`` (list, or dict keyed by letters), or ``None``."""
    options = record.get("options")
    if not options:
        return None
    if isinstance(options, dict):
        return [str(options[k]) for k in sorted(options) if options[k] is not None and str(options[k]) != "nan"]
    return [str(o) for o in options]


def question_records(
    questions: Iterable[dict[str, Any]],
    source: str,
    task: str | None = None,
    apply_prompt: bool = True,
    references: dict[str, list[str]] | None = None,
) -> Iterator[dict[str, Any]]:
    """Our sample records (json part) for LLaVA-1.5 question records, in order.

    Args:
        questions: Question records.
        source: Source name written into every record.
        task: Task for records without one (``None``: guessed).
        apply_prompt: Add LLaVA-1.5's task suffix (and option lines) to the question.
        references: ``{str(question_id): answers}`` overriding the records' own references.

    Yields:
        Records with ``id``, ``source``, ``conversations``, ``answers``, ``task`` and, when present, ``image``,
        ``options``, ``category``.

    Raises:
        ValueError: A record without ``question_id`` or ``text``, or an unknown task.
    """
    if task is not None and task not in task_names():
        raise ValueError(f"task must be one of {task_names()}, got {task!r}")
    for index, question in enumerate(questions):
        if "question_id" not in question or not isinstance(question.get("text"), str):
            raise ValueError(f"question record #{index} needs 'question_id' and 'text': {question!r:.200}")
        qid = str(question["question_id"])
        text = question["text"].replace(DEFAULT_IMAGE_TOKEN, "").strip()
        refs = references.get(qid, []) if references is not None and qid in references else references_of(question)
        options = options_of(question)
        record_task = question.get("task") or task or infer_task(refs, options, text)
        if record_task not in task_names():
            raise ValueError(f"question {qid}: unknown task {record_task!r}")
        prompt = apply_eval_prompt(text, record_task, options) if apply_prompt else text
        prefix = DEFAULT_IMAGE_TOKEN + "\n" if question.get("image") else ""
        conversations = [{"from": "human", "value": prefix + prompt}]
        if refs:
            conversations.append({"from": "gpt", "value": refs[0]})
        record: dict[str, Any] = {"id": qid, "source": source, "conversations": conversations, "answers": refs}
        record["task"] = record_task
        if question.get("image"):
            record["image"] = str(question["image"])
        if options:
            record["options"] = options
        if question.get("category") is not None:
            record["category"] = question["category"]
        yield record


def convert_question_file(
    questions_path: str,
    images_dir: str,
    out_dir: str,
    source: str,
    *,
    task: str | None = None,
    apply_prompt: bool = True,
    answers_path: str | None = None,
    maxcount: int = 10000,
    limit: int | None = None,
) -> ConversionReport:
    """Writes a LLaVA-1.5 question file as ``<out_dir>/<source>-%06d.tar`` shards (plus ``sizes.json``).

    Args:
        questions_path: JSONL (or JSON list) question file.
        images_dir: Folder the ``image`` fields are relative to.
        out_dir: Output folder.
        source: Source name (shard prefix, ``source`` field).
        task: Task for records without one (``None``: guessed per record).
        apply_prompt: Add LLaVA-1.5's task suffix to the questions.
        answers_path: Optional file of ``{question_id, answer|answers|label|gt_answer}`` records.
        maxcount: Samples per shard.
        limit: Convert only the first ``limit`` questions.

    Returns:
        A report with the written count, the skipped records (``missing_image``) and the shard brace spec.
    """
    questions = read_records(questions_path)
    if limit is not None:
        questions = questions[:limit]
    references = None
    if answers_path is not None:
        references = {str(r["question_id"]): references_of(r) for r in read_records(answers_path)}
    report = ConversionReport()
    with ShardWriter(out_dir, source, maxcount) as writer:
        for index, record in enumerate(question_records(questions, source, task, apply_prompt, references)):
            sample: dict[str, Any] = {"__key__": f"{index:09d}"}
            if "image" in record:
                path = os.path.join(images_dir, record["image"])
                if not os.path.isfile(path):
                    report.skipped.append(
                        {"index": index, "id": record["id"], "reason": "missing_image", "detail": path}
                    )
                    continue
                with open(path, "rb") as handle:
                    data = handle.read()
                sample[image_field(path)] = data
            sample["json"] = record
            writer.write(sample)
            report.written += 1
    report.sizes = dict(writer.sizes)
    report.brace_spec = writer.brace_spec
    return report


__all__ = [
    "REFERENCE_FIELDS",
    "SHORT_ANSWER_PROMPT",
    "convert_question_file",
    "options_of",
    "question_records",
    "read_records",
    "references_of",
]
