"""The LLaVA-MoLE paper's data, from the public release formats to shards with ``source``: M3IT and ShareGPT4V-FT
(general), UReader (documents and charts), PathVQA upsampled as in LLaVA-Med (biomedical) and ShareGPT4V-PT (stage-1
captions).

Each ``convert_*`` function maps one release format's records to LLaVA records (``id``, ``image``,
``conversations``) and writes them through :func:`~mole_lightning.data.llava_json.convert_llava_records`, so every
format is checked, skipped and counted the same way (:class:`~mole_lightning.data.llava_json.ConversionReport`): a
record without an image (``missing_image``), with an empty question or answer (``empty_text``), with undecodable image
bytes (``corrupt_image``) or with several images (``multiple_images``) is skipped and reported, never silently.

Release formats (the field names each converter reads):

* **M3IT** (HF ``MMInstruction/M3IT``, ``data/<task>/<dataset>/*.jsonl``): one JSON object per line with
  ``instruction``, ``inputs``, ``outputs`` and ``image_base64_str`` (a list of base64-encoded images; video tasks have
  several frames and are skipped as ``multiple_images``). One record → one single-turn conversation: user
  ``"<image>\\n{instruction}\\n{inputs}"`` (empty parts left out), assistant ``outputs``; the image decoded from base64.
* **ShareGPT4V** (``Lin-Chen/ShareGPT4V``): LLaVA JSON lists (``id``, ``image`` relative to the image root,
  ``conversations`` of ``from`` human/gpt and ``value``). PT = ``share-captioner_coco_lcs_sam_1246k_1107.json``
  (caption pairs, stage 1), FT = ``sharegpt4v_mix665k_cap23k_coco-ap9k_lcs3k_sam9k_div2k.json`` (stage 2; its
  text-only records are kept).
* **UReader** (``ureader_json/*.jsonl`` of the UReader release, mPLUG-Owl's training format): one JSON object per line
  with ``image`` (a list of paths relative to the image root), ``prompt``, ``text`` and ``task_type``. Assumed layout
  (not given by the release notes we follow): ``text`` is mPLUG-Owl's transcript, an optional system preamble, then
  turns that start a line with ``Human: `` or ``AI: `` (consecutive ``Human:`` lines, such as ``Human: <image>`` and
  the question, form one user turn joined by newlines); a ``text`` without these markers is the answer to ``prompt``.
  ``task_type`` is kept in the json.
* **PathVQA**: the HF ``flaviagiammarino/path-vqa`` rows (``image`` as ``{"bytes", "path"}`` or encoded bytes, or a
  path relative to the image root; ``question``; ``answer``), read from its parquet files, or LLaVA-Med's PathVQA
  JSON (LLaVA records, with ``answer_type``). Each written json gets ``answer_type``: ``"closed"`` for yes/no answers,
  ``"open"`` otherwise (LLaVA-Med's split of the scores). LLaVA-Med's upsampling repeats the training set to a target
  size (:func:`upsample_indices`).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from mole_lightning.constants import DEFAULT_IMAGE_TOKEN
from mole_lightning.data.llava_json import ConversionReport, convert_llava_records, load_llava_json
from mole_lightning.data.templates import BadSampleError

CLOSED_ANSWERS = ("yes", "no")
"""PathVQA answers that make a question closed (LLaVA-Med scores closed and open questions separately)."""


def read_jsonl(paths: str | Sequence[str]) -> Iterator[Any]:
    """Yields the records of one or more JSON-lines files, one line at a time (M3IT's files hold base64 images: they
    are never loaded whole). A line that is no JSON is yielded as ``None`` (skipped as ``bad_record``).

    Raises:
        FileNotFoundError: A file is missing (checked for every file before the first record is read).
    """
    paths = [paths] if isinstance(paths, str) else list(paths)
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no such file: {path}")
    return _jsonl_records(paths)


def _jsonl_records(paths: Sequence[str]) -> Iterator[Any]:
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                if not line.strip():
                    continue
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    yield None


def _text(record: dict[str, Any], key: str) -> str:
    value = record.get(key)
    return value.strip() if isinstance(value, str) else ""


def _require_dict(record: Any) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise BadSampleError("bad_record", "not a JSON object")
    return record


def single_turn(question: str, answer: str, image: bool) -> list[dict[str, str]]:
    """A LLaVA ``conversations`` list of one exchange (``<image>\\n`` before the question when ``image``).

    Raises:
        BadSampleError: ``empty_text`` for an empty question or answer.
    """
    if not question or not answer:
        raise BadSampleError("empty_text", "empty question" if not question else "empty answer")
    value = f"{DEFAULT_IMAGE_TOKEN}\n{question}" if image else question
    return [{"from": "human", "value": value}, {"from": "gpt", "value": answer}]


# ------------------------------------------------------------------------------------------------------------ M3IT
def m3it_record(record: Any, index: int = 0, dataset: str = "m3it", split: str = "train") -> dict[str, Any]:
    """One M3IT record → a LLaVA record with the decoded image bytes under ``image`` (``id``
    ``<dataset>-<split>-<index>``).

    Raises:
        BadSampleError: ``bad_record``, ``missing_image`` (no image), ``multiple_images``, ``corrupt_image`` (not
            base64) or ``empty_text``.
    """
    record = _require_dict(record)
    images = record.get("image_base64_str")
    if isinstance(images, str):
        images = [images]
    if not images:
        raise BadSampleError("missing_image", "no image_base64_str")
    if len(images) > 1:
        raise BadSampleError("multiple_images", f"{len(images)} images; one image per sample is supported")
    try:
        image = base64.b64decode(images[0], validate=True)
    except (binascii.Error, ValueError, TypeError) as error:
        raise BadSampleError("corrupt_image", f"image_base64_str is not base64: {error}") from None
    question = "\n".join(part for part in (_text(record, "instruction"), _text(record, "inputs")) if part)
    conversations = single_turn(question, _text(record, "outputs"), image=True)
    return {"id": f"{dataset}-{split}-{index}", "image": image, "conversations": conversations, "dataset": dataset}


def convert_m3it(
    paths: str | Sequence[str], out_dir: str, source: str, maxcount: int = 10000, **options: Any
) -> ConversionReport:
    """M3IT JSON-lines files → shards of ``source`` (see the module docstring for the mapping).

    Args:
        paths: One or more M3IT ``.jsonl`` files; the file's parent folder names the dataset (``dataset`` in the
            json, ``id`` = ``<dataset>-<file stem>-<record number>``, e.g. ``vqa-v2-train-0``).
        out_dir: Output folder for ``<source>-%06d.tar`` and ``sizes.json``.
        source: Source name written into every json.
        maxcount: Samples per shard.
        **options: ``verify_images``, ``progress``, ``task`` of :func:`convert_llava_records`.
    """
    paths = [paths] if isinstance(paths, str) else list(paths)

    read_jsonl(paths)  # every file exists

    def lines() -> Iterator[tuple[str, str, int, Any]]:
        for path in paths:
            dataset = os.path.basename(os.path.dirname(os.path.abspath(path))) or "m3it"
            split = os.path.splitext(os.path.basename(path))[0]
            for number, record in enumerate(read_jsonl(path)):
                yield dataset, split, number, record

    def parse(item: tuple[str, str, int, Any], index: int) -> dict[str, Any]:
        dataset, split, number, record = item
        return m3it_record(record, number, dataset, split)

    return convert_llava_records(lines(), "", out_dir, source, maxcount=maxcount, parse=parse, **options)


# ------------------------------------------------------------------------------------------------------- ShareGPT4V
def convert_sharegpt4v(
    json_path: str, images_dir: str, out_dir: str, source: str, maxcount: int = 10000, **options: Any
) -> ConversionReport:
    """A ShareGPT4V JSON (PT captions or the FT mixture; LLaVA records) and its image root → shards of ``source``.

    Args:
        json_path: ``share-captioner_coco_lcs_sam_1246k_1107.json`` (PT) or
            ``sharegpt4v_mix665k_cap23k_coco-ap9k_lcs3k_sam9k_div2k.json`` (FT).
        images_dir: Folder the records' ``image`` paths are relative to (``coco/``, ``sam/``, ``llava/``, ...).
        out_dir: Output folder.
        source: Source name written into every json.
        maxcount: Samples per shard.
        **options: ``verify_images``, ``progress``, ``task`` of :func:`convert_llava_records`.
    """
    records = load_llava_json(json_path)
    return convert_llava_records(records, images_dir, out_dir, source, maxcount=maxcount, total=len(records), **options)


# --------------------------------------------------------------------------------------------------------- UReader
TRANSCRIPT_TURN = re.compile(r"(?:^|\n)(Human|AI): ?")
"""A turn marker of mPLUG-Owl's transcripts: ``Human: `` or ``AI: `` at the start of a line."""


def parse_transcript(text: str) -> list[dict[str, str]]:
    """mPLUG-Owl's ``"…\\nHuman: <image>\\nHuman: q\\nAI: a"`` → LLaVA turns (the preamble before the first marker
    dropped; consecutive turns of one speaker joined by newlines); ``[]`` when ``text`` has no marker."""
    parts = TRANSCRIPT_TURN.split(text)
    turns: list[dict[str, str]] = []
    for speaker, value in zip(parts[1::2], parts[2::2]):
        role = "human" if speaker == "Human" else "gpt"
        value = value.strip()
        if turns and turns[-1]["from"] == role:
            turns[-1]["value"] = f"{turns[-1]['value']}\n{value}".strip()
        else:
            turns.append({"from": role, "value": value})
    return turns


def ureader_record(record: Any, index: int = 0) -> dict[str, Any]:
    """One UReader record → a LLaVA record (``image`` a relative path; ``task_type`` kept).

    Raises:
        BadSampleError: ``bad_record``, ``missing_image`` (no image path), ``multiple_images`` or ``empty_text``.
    """
    record = _require_dict(record)
    images = record.get("image")
    images = [images] if isinstance(images, str) else list(images or [])
    if not images:
        raise BadSampleError("missing_image", "no image path")
    if len(images) > 1:
        raise BadSampleError("multiple_images", f"{len(images)} images; one image per sample is supported")
    text = record.get("text") if isinstance(record.get("text"), str) else ""
    conversations = parse_transcript(text)
    if not conversations:
        conversations = single_turn(_text(record, "prompt"), text.strip(), image=True)
    elif (
        not any(DEFAULT_IMAGE_TOKEN in turn["value"] for turn in conversations) and conversations[0]["from"] == "human"
    ):
        conversations[0]["value"] = f"{DEFAULT_IMAGE_TOKEN}\n{conversations[0]['value']}"
    if any(not turn["value"] or turn["value"] == DEFAULT_IMAGE_TOKEN for turn in conversations):
        raise BadSampleError("empty_text", "a turn without text")
    result = {"id": str(record.get("id", f"ureader-{index}")), "image": images[0], "conversations": conversations}
    if record.get("task_type") is not None:
        result["task_type"] = record["task_type"]
    return result


def convert_ureader(
    paths: str | Sequence[str], images_dir: str, out_dir: str, source: str, maxcount: int = 10000, **options: Any
) -> ConversionReport:
    """UReader instruction JSON-lines files and their image root → shards of ``source``.

    Args:
        paths: One or more ``ureader_json/*.jsonl`` files.
        images_dir: Folder the records' ``image`` paths are relative to.
        out_dir: Output folder.
        source: Source name written into every json.
        maxcount: Samples per shard.
        **options: ``verify_images``, ``progress``, ``task`` of :func:`convert_llava_records`.
    """
    records = read_jsonl(paths)
    return convert_llava_records(
        records, images_dir, out_dir, source, maxcount=maxcount, parse=ureader_record, **options
    )


# --------------------------------------------------------------------------------------------------------- PathVQA
def upsample_indices(size: int, target: int, seed: int = 0) -> list[int]:
    """Indices of a training set of ``size`` records repeated to ``target`` records (LLaVA-Med's upsampling).

    Every record appears ``target // size`` times, and the first ``target % size`` records of a permutation seeded
    by ``seed`` once more; the result is in record order (each record's copies together), the same for every call.

    Raises:
        ValueError: ``size`` < 1 with a positive target, or a negative target.
    """
    if target < 0:
        raise ValueError(f"the upsampling target must be >= 0, got {target}")
    if target and size < 1:
        raise ValueError("cannot upsample an empty training set")
    repeats, extra = divmod(target, size) if size else (0, 0)
    order = list(range(size))
    random.Random(seed).shuffle(order)
    once_more = set(order[:extra])
    return [i for i in range(size) for _ in range(repeats + (i in once_more))]


def answer_type(answer: str) -> str:
    """``"closed"`` for a yes/no answer, ``"open"`` otherwise (LLaVA-Med's split of PathVQA)."""
    return "closed" if answer.strip().lower() in CLOSED_ANSWERS else "open"


def pathvqa_record(record: Any, index: int = 0) -> dict[str, Any]:
    """One PathVQA record (HF row or LLaVA-Med JSON record) → a LLaVA record with ``answer_type``.

    HF rows: ``image`` is ``{"bytes": ..., "path": ...}`` (as parquet stores images), encoded bytes or a relative
    path; ``question``, ``answer``. LLaVA-Med records (with ``conversations``) keep their turns; their
    ``answer_type`` (``CLOSED``/``OPEN``) is lower-cased, or derived from the answer when absent.

    Raises:
        BadSampleError: ``bad_record``, ``missing_image`` or ``empty_text``.
    """
    record = _require_dict(record)
    image = record.get("image")
    if isinstance(image, dict):
        image = image.get("bytes") or image.get("path")
    if not image:
        raise BadSampleError("missing_image", "no image")
    if isinstance(record.get("conversations"), list):  # LLaVA-Med's JSON
        turns = record["conversations"]
        answer = str(turns[-1].get("value", "")).strip() if turns and isinstance(turns[-1], dict) else ""
        if not answer:
            raise BadSampleError("empty_text", "empty answer")
        kind = str(record.get("answer_type") or answer_type(answer)).lower()
        return {**record, "id": str(record.get("id", f"pathvqa-{index}")), "image": image, "answer_type": kind}
    answer = _text(record, "answer")
    conversations = single_turn(_text(record, "question"), answer, image=True)
    kind = answer_type(answer)
    return {"id": str(record.get("id", f"pathvqa-{index}")), "image": image, "conversations": conversations,
            "answer_type": kind}  # fmt: skip


def read_pathvqa(path: str) -> list[Any]:
    """The records of a PathVQA file: HF parquet (needs ``pyarrow``), LLaVA-Med JSON, or JSON lines of HF rows."""
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
        return pq.read_table(path).to_pylist()
    return list(read_jsonl(path)) if path.endswith(".jsonl") else load_llava_json(path)


def convert_pathvqa(
    records: Iterable[Any],
    images_dir: str,
    out_dir: str,
    source: str,
    upsample_to: int | None = None,
    seed: int = 0,
    maxcount: int = 10000,
    **options: Any,
) -> ConversionReport:
    """PathVQA records → shards of ``source``, optionally upsampled to ``upsample_to`` samples (LLaVA-Med).

    The records are mapped and checked first (bad ones skipped and counted, with their index in ``records``); the
    valid ones are then repeated by :func:`upsample_indices` (each copy a sample of its own, ``repeat`` in its json
    counting the copies of one record from 0) and written.

    Args:
        records: HF rows or LLaVA-Med records (:func:`read_pathvqa`).
        images_dir: Folder relative image paths are resolved in (unused for rows with image bytes).
        out_dir: Output folder.
        source: Source name written into every json.
        upsample_to: Samples to write (e.g. 400000); ``None`` writes each valid record once.
        seed: Seed of the choice of the records written once more when ``upsample_to`` is no multiple.
        maxcount: Samples per shard.
        **options: ``verify_images``, ``progress``, ``task`` of :func:`convert_llava_records`.
    """
    mapped: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    for index, record in enumerate(records):
        try:
            mapped.append(pathvqa_record(record, index))
        except BadSampleError as error:
            record_id = record.get("id", index) if isinstance(record, dict) else index
            skipped.append({"index": index, "id": record_id, "reason": error.kind, "detail": str(error)})
    if upsample_to is not None:
        copies: dict[int, int] = {}
        upsampled = []
        for i in upsample_indices(len(mapped), upsample_to, seed):
            upsampled.append({**mapped[i], "repeat": copies.get(i, 0)})
            copies[i] = copies.get(i, 0) + 1
        mapped = upsampled
    report = convert_llava_records(mapped, images_dir, out_dir, source, maxcount=maxcount, total=len(mapped), **options)
    report.skipped = skipped + report.skipped
    return report
