"""Answers from a generation batch: the greedy decoding every user of a trained model shares.

Below training, inference and eval: :class:`~mole_lightning.training.MoLELightningModule`'s ``predict_step``,
:class:`~mole_lightning.inference.Assistant`, the generation-eval callback and the routing report all call these.
A generation batch is what the DataModule's ``generation_dataloaders()`` yields: prompt ids left-padded, with
``answers``, ``task``, ``id``, ``source`` and ``question`` lists beside the tensors.
"""

from __future__ import annotations

from typing import Any

import torch


def take_rows(batch: dict[str, Any], count: int) -> dict[str, Any]:
    """The first ``count`` samples of a collated batch (``pixel_values`` keeps the images of those samples only)."""
    size = len(batch["input_ids"])
    if count >= size:
        return batch
    out: dict[str, Any] = {}
    has_image = batch.get("has_image")
    for key, value in batch.items():
        if key == "pixel_values":
            if value is None or has_image is None:
                out[key] = value
            else:
                images = int(has_image[:count].sum())
                out[key] = value[:images] if images else None
        elif isinstance(value, (torch.Tensor, list, tuple)) and len(value) == size:
            out[key] = value[:count]
        else:
            out[key] = value
    return out


@torch.no_grad()
def generate_answers(
    model: Any, batch: dict[str, Any], tokenizer: Any, max_new_tokens: int = 32, **generation_kwargs: Any
) -> list[str]:
    """Greedy answers for a generation batch (prompt ids left-padded), decoded without special tokens and stripped.

    Args:
        model: A :class:`~mole_lightning.models.LlavaMoLE` (or anything with its ``generate`` signature).
        batch: Batch with ``input_ids``, ``attention_mask``, ``pixel_values``, ``has_image`` on the model's device.
        tokenizer: Tokenizer for decoding (its pad/eos ids are passed to ``generate``).
        max_new_tokens: Maximum generated tokens.
        **generation_kwargs: Other ``generate`` options (override the greedy defaults).

    Returns:
        One answer per sample.
    """
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": False, "num_beams": 1}
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            kwargs[name] = value
    kwargs.update(generation_kwargs)
    output = model.generate(
        batch.get("pixel_values"),
        batch["input_ids"],
        batch.get("attention_mask"),
        has_image=batch.get("has_image"),
        **kwargs,
    )
    new_tokens = output[:, batch["input_ids"].shape[1] :]
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def prediction_records(batch: dict[str, Any], predictions: list[str]) -> list[dict[str, Any]]:
    """One ``{"id", "source", "question", "answer", "answers", "prediction"}`` dict per sample of a generation
    batch (``answer``: the first reference answer, ``""`` without references)."""
    size = len(predictions)
    answers = batch.get("answers") or [[] for _ in range(size)]
    ids, sources = batch.get("id") or [str(i) for i in range(size)], batch.get("source") or [""] * size
    questions = batch.get("question") or [""] * size
    return [
        {"id": ids[i], "source": sources[i], "question": questions[i], "answer": answers[i][0] if answers[i] else "",
         "answers": list(answers[i]), "prediction": predictions[i]}
        for i in range(size)
    ]  # fmt: skip
