"""Collation: right/left padding, attention masks, images only for samples that have one."""

from __future__ import annotations

import pytest
import torch

from mole_lightning.data.collate import Collator, collate, pad_token_id_of


def sample(ids, labels, image=None, **extra):
    return {
        "input_ids": torch.tensor(ids),
        "labels": torch.tensor(labels),
        "pixel_values": image,
        "source": extra.pop("source", "s"),
        "id": extra.pop("id", "x"),
        **extra,
    }


def test_right_padding_for_training():
    image = torch.full((3, 2, 2), 200, dtype=torch.uint8)
    batch = collate(
        [sample([5, 6, 7], [-100, 6, 7], image, source="doc", id="a"), sample([8], [8], None, source="med", id="b")],
        pad_token_id=0,
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["attention_mask"].dtype == torch.long
    assert batch["has_image"].tolist() == [True, False] and batch["has_image"].dtype == torch.bool
    assert batch["pixel_values"].shape == (1, 3, 2, 2) and batch["pixel_values"].dtype == torch.uint8  # as sent
    assert batch["pixel_values"].eq(200).all()
    assert batch["source"] == ["doc", "med"] and batch["id"] == ["a", "b"]
    assert "answers" not in batch


def test_images_are_stacked_in_batch_order_and_none_without_images():
    first, second = torch.zeros(3, 2, 2), torch.ones(3, 2, 2)
    batch = collate([sample([1], [1], first), sample([1], [1]), sample([1], [1], second)], pad_token_id=0)
    assert torch.equal(batch["pixel_values"], torch.stack([first, second]))  # float pixels stay float
    assert batch["has_image"].tolist() == [True, False, True]
    assert collate([sample([1], [1])], pad_token_id=0)["pixel_values"] is None


def test_left_padding_and_generation_fields():
    fields = dict(answers=["x"], task="mc", question="q?", options=["red", "blue"])
    batch = Collator(pad_token_id=9, padding_side="left")(
        [sample([1, 2, 3], [-100] * 3, **fields), sample([4], [-100], answers=["y", "z"], task=None, question="r")]
    )
    assert batch["input_ids"].tolist() == [[1, 2, 3], [9, 9, 4]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["answers"] == [["x"], ["y", "z"]] and batch["task"] == ["mc", None]
    assert batch["question"] == ["q?", "r"]
    assert batch["options"] == [["red", "blue"], None]


def test_errors_and_pad_id_fallbacks():
    with pytest.raises(ValueError):
        collate([], pad_token_id=0)
    with pytest.raises(ValueError):
        collate([sample([1], [1])], pad_token_id=0, padding_side="middle")

    class Tok:
        pad_token_id = None
        unk_token_id = 3
        eos_token_id = 2

    assert pad_token_id_of(Tok()) == 3


def test_generation_fields_carry_multiple_choice_options():
    from mole_lightning.data.samples import generation_fields

    conversations = [
        {"from": "human", "value": "<image>\nWhich colour?\nA. red\nB. blue"},
        {"from": "gpt", "value": "B"},
    ]
    fields = generation_fields({"task": "mc", "options": ["red", "blue"]}, conversations)
    assert fields == {
        "answers": ["B"],
        "task": "mc",
        "question": "Which colour?\nA. red\nB. blue",
        "options": ["red", "blue"],
    }
    assert generation_fields({}, conversations)["options"] is None
