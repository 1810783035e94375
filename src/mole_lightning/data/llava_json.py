"""LLaVA-format JSON (records with ``id``, ``image``, ``conversations``) → webdataset samples → shards of one
source, with a report of every record skipped and why.

:func:`convert_llava_records` is the one writer of conversation records; the converters of other release formats
(:mod:`mole_lightning.data.paper_datasets`) map their records to LLaVA records (``parse``) and call it."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from PIL import Image
from tqdm import tqdm

from mole_lightning.constants import DEFAULT_IMAGE_TOKEN
from mole_lightning.data.shard_writer import ShardWriter, image_field, image_field_of_bytes
from mole_lightning.data.templates import BadSampleError, normalize_conversation


@dataclass
class ConversionReport:
    """Result of :func:`convert_llava_records` (and of the benchmark question conversion).

    Attributes:
        written: Records written.
        skipped: ``[{"index": i, "id": ..., "reason": kind, "detail": ...}]`` for every record not written.
        sizes: Shard file name → samples.
        brace_spec: Brace spec of the written shards.
    """

    written: int = 0
    skipped: list[dict[str, Any]] = field(default_factory=list)
    sizes: dict[str, int] = field(default_factory=dict)
    brace_spec: str = ""

    def skipped_by_reason(self) -> dict[str, int]:
        """Skipped record counts per reason."""
        counts: dict[str, int] = {}
        for entry in self.skipped:
            counts[entry["reason"]] = counts.get(entry["reason"], 0) + 1
        return counts


def load_llava_json(path: str) -> list[Any]:
    """Reads a LLaVA JSON list (``.json``) or one record per line (``.jsonl``)."""
    with open(path, encoding="utf-8") as handle:
        if path.endswith(".jsonl"):
            return [json.loads(line) for line in handle if line.strip()]
        data = json.load(handle)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records")
    return data


def convert_llava_records(
    records: Iterable[Any],
    images_dir: str,
    out_dir: str,
    source: str,
    maxcount: int = 10000,
    verify_images: bool = False,
    progress: bool = False,
    total: int | None = None,
    parse: Callable[[Any, int], Any] | None = None,
    task: str | None = None,
) -> ConversionReport:
    """Writes LLaVA-format records (``id``, ``image``, ``conversations``) as shards of one source.

    Each record becomes ``{__key__: <9-digit index>, <ext>: image bytes (unchanged), json: record + source}``.
    Records are skipped (and reported, never silently) for: ``bad_record`` (not an object / no conversations
    list), conversation problems (``wrong_roles``, ``empty_text``, ``no_assistant_turn``,
    ``bad_image_placeholder``), ``missing_image`` (``image`` file not found, or ``<image>`` without ``image``),
    ``multiple_images`` (an ``image`` list of more than one path; a one-element list is read as its path) and, with
    ``verify_images``, ``corrupt_image``.

    ``image`` may also hold the encoded image itself (``bytes``, e.g. decoded from base64 by a converter): its
    field is found from its leading bytes (``corrupt_image`` when they are no known image format) and the json
    gets no ``image`` key.

    Args:
        records: Parsed JSON records.
        images_dir: Folder that ``image`` paths are relative to.
        out_dir: Output folder for ``<source>-%06d.tar`` and ``sizes.json``.
        source: Source name (written into every json as ``source``).
        maxcount: Samples per shard.
        verify_images: Decode every image to catch corrupt files (slower).
        progress: Show a tqdm progress bar.
        total: Number of records, for the progress bar.
        parse: ``parse(raw, index)`` maps each raw record to a LLaVA record before it is checked (a release
            format's converter); a :class:`~mole_lightning.data.templates.BadSampleError` it raises skips the
            record under its ``kind``.
        task: Evaluation task written into every json as ``task``, with ``answers`` = ``[last assistant reply]``
            where the record has no ``answers`` (an evaluation set scored by that task's metric); ``{field}`` in it
            is replaced by the record's field (``"pathvqa_{answer_type}"``: ``pathvqa_closed`` / ``pathvqa_open``).

    Returns:
        The conversion report.
    """
    report = ConversionReport()
    iterator = tqdm(records, total=total, desc=f"{source} → shards", unit="rec", disable=not progress)
    with ShardWriter(out_dir, source, maxcount) as writer:
        for index, record in enumerate(iterator):
            record_id = record.get("id", index) if isinstance(record, dict) else index
            if parse is not None:
                try:
                    record = parse(record, index)
                except BadSampleError as error:
                    report.skipped.append({"index": index, "id": record_id, "reason": error.kind, "detail": str(error)})
                    continue
                record_id = record.get("id", index) if isinstance(record, dict) else index

            def skip(reason: str, detail: str = "", _index: int = index, _id: Any = record_id) -> None:
                report.skipped.append({"index": _index, "id": _id, "reason": reason, "detail": detail})

            if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
                skip("bad_record", "not an object with a 'conversations' list")
                continue
            try:
                messages = normalize_conversation(record["conversations"])
            except BadSampleError as error:
                skip(error.kind, str(error))
                continue
            sample: dict[str, Any] = {"__key__": f"{index:09d}"}
            image = record.get("image")
            if isinstance(image, (list, tuple)):  # LLaVA-style lists: one image per sample is supported
                if len(image) > 1:
                    skip("multiple_images", f"{len(image)} images; one image per sample is supported")
                    continue
                image = image[0] if image else None
                record = {**record, "image": image}
            if isinstance(image, (bytes, bytearray)):
                kind = image_field_of_bytes(image)
                if kind is None or (verify_images and not _decodes(image)):
                    skip("corrupt_image", "image bytes of no known format" if kind is None else "does not decode")
                    continue
                sample[kind] = bytes(image)
                record = {k: v for k, v in record.items() if k != "image"}
            elif image:
                path = os.path.join(images_dir, str(image))
                if not os.path.isfile(path):
                    skip("missing_image", path)
                    continue
                with open(path, "rb") as handle:
                    data = handle.read()
                if verify_images and not _decodes(data):
                    skip("corrupt_image", path)
                    continue
                sample[image_field(path)] = data
            elif any(DEFAULT_IMAGE_TOKEN in str(t.get("value", "")) for t in record["conversations"]):
                skip("missing_image", "<image> in text but no 'image' field")
                continue
            sample["json"] = {**record, "id": str(record_id), "source": source}
            if task is not None:
                reply = [message.text for message in messages if message.role == "assistant"][-1]
                name = task.format_map(record) if "{" in task else task  # e.g. "pathvqa_{answer_type}"
                sample["json"] = {"answers": [reply], **sample["json"], "task": name}
            writer.write(sample)
            report.written += 1
    report.sizes = dict(writer.sizes)
    report.brace_spec = writer.brace_spec
    return report


def _decodes(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
        return True
    except Exception:
        return False
