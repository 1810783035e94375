"""Batch collation: padding, attention mask, images of the samples that have one.

Training batches are right-padded; generation batches (prompt only) are left-padded so that new tokens are appended
at the same position for every row. Keys:

* ``input_ids`` LongTensor (B, L), ``labels`` LongTensor (B, L) (``-100`` on padding), ``attention_mask``
  LongTensor (B, L);
* ``pixel_values`` (M, 3, H, W): the images of the M samples with ``has_image``, in batch order, or ``None`` when
  no sample has one, in the samples' dtype (uint8 pixels from the encoder; the model normalizes them, see
  :func:`mole_lightning.pixels.normalize_pixels`); ``has_image`` BoolTensor (B,);
* ``source`` list[str], ``id`` list[str];
* generation mode also ``answers`` list[list[str]], ``task`` list[str | None], ``question`` list[str],
  ``options`` list[list[str] | None].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mole_lightning.constants import IGNORE_INDEX

GENERATION_KEYS = ("answers", "task", "question")


def pad_sequences(sequences: Sequence[torch.Tensor], value: int, side: str = "right") -> torch.Tensor:
    """Stacks 1-D tensors into (B, max_len), padding with ``value`` on the ``side`` (``"right"``/``"left"``)."""
    if side not in ("right", "left"):
        raise ValueError(f"padding side must be 'right' or 'left', got {side!r}")
    longest = max((len(s) for s in sequences), default=0)
    out = torch.full((len(sequences), longest), value, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        if side == "right":
            out[row, : len(sequence)] = sequence
        else:
            out[row, longest - len(sequence) :] = sequence
    return out


def collate(samples: Sequence[dict[str, Any]], pad_token_id: int, padding_side: str = "right") -> dict[str, Any]:
    """Collates encoded samples (from :class:`~mole_lightning.data.samples.SampleEncoder`) into a batch dict.

    Args:
        samples: Dicts with ``input_ids``, ``labels`` (1-D LongTensors), ``pixel_values`` (tensor or ``None``),
            ``source``, ``id`` and, for generation, ``answers``, ``task``, ``question``.
        pad_token_id: Id used to pad ``input_ids``.
        padding_side: ``"right"`` for training, ``"left"`` for generation.

    Returns:
        The batch dict described in the module docstring (generation keys only if the samples have them).
    """
    if not samples:
        raise ValueError("cannot collate an empty batch")
    input_ids = pad_sequences([s["input_ids"] for s in samples], pad_token_id, padding_side)
    labels = pad_sequences([s["labels"] for s in samples], IGNORE_INDEX, padding_side)
    lengths = torch.tensor([len(s["input_ids"]) for s in samples])
    positions = torch.arange(input_ids.shape[1]).unsqueeze(0)
    if padding_side == "right":
        attention_mask = positions < lengths.unsqueeze(1)
    else:
        attention_mask = positions >= (input_ids.shape[1] - lengths).unsqueeze(1)
    has_image = torch.tensor([s.get("pixel_values") is not None for s in samples], dtype=torch.bool)
    images = [s["pixel_values"] for s in samples if s.get("pixel_values") is not None]
    batch: dict[str, Any] = {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask.long(),
        "pixel_values": torch.stack(images) if images else None,
        "has_image": has_image,
        "source": [str(s.get("source", "")) for s in samples],
        "id": [str(s.get("id", "")) for s in samples],
    }
    if all(key in samples[0] for key in GENERATION_KEYS):
        batch["answers"] = [list(s["answers"]) for s in samples]
        batch["task"] = [s["task"] for s in samples]
        batch["question"] = [s["question"] for s in samples]
        batch["options"] = [s.get("options") for s in samples]
    return batch


class Collator:
    """Picklable collate function bound to a pad id and padding side (for ``DataLoader(collate_fn=...)``).

    Args:
        pad_token_id: Id used to pad ``input_ids``.
        padding_side: ``"right"`` for training, ``"left"`` for generation.
    """

    def __init__(self, pad_token_id: int, padding_side: str = "right") -> None:
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return collate(samples, self.pad_token_id, self.padding_side)


def pad_token_id_of(tokenizer: Any) -> int:
    """The tokenizer's pad id, else unk (LLaVA's choice for Vicuna), else eos, else 0."""
    for name in ("pad_token_id", "unk_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0
