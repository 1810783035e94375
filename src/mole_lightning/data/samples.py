"""One webdataset sample (``{__key__, jpg|png, json}`` bytes) → a model-ready example, with validation.

Every way a sample can be unusable raises :class:`~mole_lightning.data.templates.BadSampleError` with a ``kind``
that the pipeline counts per source: ``bad_json``, ``wrong_roles``, ``empty_text``, ``no_assistant_turn``,
``bad_image_placeholder``, ``missing_image`` (``<image>`` without image bytes), ``corrupt_image``,
``image_tokens_truncated``, ``no_target_after_truncation`` and ``prompt_too_long``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import torch

from mole_lightning.constants import DEFAULT_IMAGE_TOKEN
from mole_lightning.data.images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageProcessor
from mole_lightning.data.templates import (
    BadSampleError,
    encode_conversation,
    encode_prompt,
    normalize_conversation,
    normalize_prompt_conversation,
)
from mole_lightning.tokenization import load_tokenizer  # noqa: F401 (the DataModule's tokenizer loader)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif", "image")
"""Sample fields holding encoded image bytes, in lookup order."""

MODES = ("train", "generate")


def parse_json_field(raw: dict[str, Any]) -> dict[str, Any]:
    """Decodes the ``json`` field of a raw sample.

    Raises:
        BadSampleError: ``bad_json`` when missing, not UTF-8 JSON, or not an object with a ``conversations`` list.
    """
    data = raw.get("json")
    if data is None:
        raise BadSampleError("bad_json", "no json field")
    try:
        record = json.loads(data) if isinstance(data, (bytes, bytearray, str)) else data
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BadSampleError("bad_json", str(error)) from None
    if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
        raise BadSampleError("bad_json", "not an object with a 'conversations' list")
    return record


def find_image_bytes(raw: dict[str, Any]) -> bytes | None:
    """Returns the first image field's bytes (see :data:`IMAGE_EXTENSIONS`), or ``None``."""
    for extension in IMAGE_EXTENSIONS:
        value = raw.get(extension)
        if value:
            return value
    return None


def with_image_placeholder(conversations: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Returns ``conversations`` with ``<image>\\n`` prepended to the first user turn if no turn has it."""
    if any(DEFAULT_IMAGE_TOKEN in str(t.get("value", t.get("content", ""))) for t in conversations):
        return conversations
    updated = [dict(t) for t in conversations]
    for turn in updated:
        key = "value" if "value" in turn else "content"
        if str(turn.get("from", turn.get("role"))).lower() in ("human", "user"):
            turn[key] = DEFAULT_IMAGE_TOKEN + "\n" + str(turn.get(key, ""))
            break
    return updated


class SampleEncoder:
    """Turns raw webdataset samples into examples for :func:`~mole_lightning.data.collate.collate`.

    Picklable (the tokenizer is loaded lazily in each worker process from ``tokenizer_path``).

    Args:
        tokenizer: Path (or hub name) of a Hugging Face tokenizer, or a tokenizer object.
        template: Conversation template name.
        num_image_tokens: Visual tokens per image.
        image_size: Tower input size.
        image_mean: Tower normalization mean.
        image_std: Tower normalization std.
        image_aspect: ``pad``, ``resize`` or ``crop``.
        image_jpeg_draft: Decode large JPEGs at reduced scale (:class:`~mole_lightning.data.images.ImageProcessor`).
        max_length: Maximum sequence length (``None``: unlimited).
        mode: ``"train"`` (full conversation with labels) or ``"generate"`` (prompt only, plus answers).
        system_prompt: Optional system prompt overriding the template default.
    """

    def __init__(
        self,
        tokenizer: str | Any,
        template: str = "vicuna_v1",
        num_image_tokens: int = 576,
        image_size: int = 336,
        image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
        image_std: Sequence[float] = OPENAI_CLIP_STD,
        image_aspect: str = "pad",
        image_jpeg_draft: bool = False,
        max_length: int | None = None,
        mode: str = "train",
        system_prompt: str | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self._tokenizer = tokenizer
        self.template = template
        self.num_image_tokens = num_image_tokens
        self.max_length = max_length
        self.mode = mode
        self.system_prompt = system_prompt
        self.image_processor = ImageProcessor(image_size, image_mean, image_std, image_aspect, image_jpeg_draft)

    @property
    def tokenizer(self) -> Any:
        """The tokenizer object (loaded on first use when given as a path)."""
        if isinstance(self._tokenizer, str):
            return load_tokenizer(self._tokenizer)
        return self._tokenizer

    def __call__(self, raw: dict[str, Any], source: str) -> dict[str, Any]:
        """Encodes one raw sample.

        Args:
            raw: Webdataset sample: ``__key__``, ``json`` bytes and optionally image bytes (``jpg``, ``png``, ...).
            source: Name of the source the sample came from (reported in the batch and in skip counts).

        Returns:
            Dict with ``input_ids``, ``labels`` (LongTensor (L,)), ``pixel_values`` (uint8 (3, S, S), not
            normalized, or ``None``), ``source``, ``id``; in generate mode also ``answers``, ``task``, ``question``.

        Raises:
            BadSampleError: With the reason as ``kind``.
        """
        record = parse_json_field(raw)
        conversations = record["conversations"]
        # Validate roles and texts before any costly work.
        if self.mode == "train":
            normalize_conversation(conversations)
        else:
            normalize_prompt_conversation(conversations)
        image_bytes = find_image_bytes(raw)
        has_placeholder = any(DEFAULT_IMAGE_TOKEN in str(t.get("value", t.get("content", ""))) for t in conversations)
        if has_placeholder and image_bytes is None:
            raise BadSampleError("missing_image", "<image> in text but no image in the sample")
        if image_bytes is not None and not has_placeholder:
            conversations = with_image_placeholder(conversations)
        options = dict(
            tokenizer=self.tokenizer,
            template=self.template,
            num_image_tokens=self.num_image_tokens,
            max_length=self.max_length,
            system_prompt=self.system_prompt,
        )
        example: dict[str, Any] = {}
        if self.mode == "train":
            example.update(encode_conversation(conversations, **options))
        else:
            prompt = encode_prompt(conversations, **options)
            example["input_ids"] = prompt["input_ids"]
            example["labels"] = torch.full_like(prompt["input_ids"], -100)
            example.update(generation_fields(record, conversations))
        pixel_values = None
        if image_bytes is not None:
            try:
                pixel_values = self.image_processor.pixels(image_bytes)
            except Exception as error:  # PIL raises many types for corrupt data
                raise BadSampleError("corrupt_image", f"{type(error).__name__}: {error}") from None
        example["pixel_values"] = pixel_values
        example["source"] = source
        example["id"] = str(record.get("id", raw.get("__key__", "")))
        return example


def generation_fields(record: dict[str, Any], conversations: list[dict[str, Any]]) -> dict[str, Any]:
    """Extracts ``answers``, ``task``, ``question`` and ``options`` for evaluation from a record.

    ``answers`` is the record's ``answers`` list, or the last assistant reply; ``question`` is the last user turn's
    text without the image placeholder; ``options`` the record's multiple-choice options (list of str) or ``None``.
    """
    messages = normalize_prompt_conversation(conversations)
    last_user = [m.text for m in messages if m.role == "user"][-1]
    answers = record.get("answers")
    if isinstance(answers, str):
        answers = [answers]
    if not answers:
        replies = [m.text for m in messages if m.role == "assistant"]
        answers = replies[-1:] if messages[-1].role == "assistant" else []
    return {
        "answers": [str(a) for a in answers],
        "task": record.get("task"),
        "question": last_user.replace(DEFAULT_IMAGE_TOKEN, "").strip(),
        "options": [str(o) for o in options] if isinstance((options := record.get("options")), list) else None,
    }
