"""The LLaVA JSON → shards → batches round trip, with the converter tool and its report of skipped records."""

from __future__ import annotations

import json

from PIL import Image

from mole_lightning.constants import IGNORE_INDEX
from mole_lightning.data import MixedInstructionDataModule
from tests.conftest import load_tool
from tests.data.conftest import IMAGE_SIZE, NUM_IMAGE_TOKENS


def write_llava_folder(root) -> str:
    """A LLaVA-style JSON with images of various modes, plus records that must be skipped."""
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    Image.new("RGBA", (30, 20), (0, 200, 0, 128)).save(images / "a.png")
    Image.new("L", (10, 40), 50).save(images / "sub" / "b.jpg")
    Image.new("P", (16, 16)).save(images / "c.gif")
    records = [
        {
            "id": "a",
            "image": "a.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat colour?"},
                {"from": "gpt", "value": "green"},
                {"from": "human", "value": "Sure?"},
                {"from": "gpt", "value": "yes, green"},
            ],
        },
        {
            "id": "b",
            "image": "sub/b.jpg",
            "conversations": [{"from": "human", "value": "Describe.<image>"}, {"from": "gpt", "value": "a grey bar"}],
        },
        {"id": "text", "conversations": [{"from": "human", "value": "Hello?"}, {"from": "gpt", "value": "hi there"}]},
        {
            "id": "c",
            "image": "c.gif",
            "conversations": [{"from": "human", "value": "What?"}, {"from": "gpt", "value": "dark"}],
        },
        {
            "id": "gone",
            "image": "nowhere.jpg",
            "conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}],
        },
        {"id": "noimg", "conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]},
        {"id": "roles", "conversations": [{"from": "gpt", "value": "A"}]},
        "not a record",
    ]
    path = root / "llava.json"
    path.write_text(json.dumps(records))
    return str(path)


def test_llava_json_to_shards_to_batches_round_trip(tmp_path, demo, tokenizer, capsys):
    json_path = write_llava_folder(tmp_path)
    out = tmp_path / "shards"
    tool = load_tool("llava_to_shards")
    code = tool.main(
        [
            "--json",
            json_path,
            "--images",
            str(tmp_path / "images"),
            "--source",
            "mine",
            "--out",
            str(out),
            "--maxcount",
            "2",
            "--no-progress",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "wrote 4 of 8 records to 2 shard(s)" in printed
    assert json.loads((out / "sizes.json").read_text()) == {"mine-000000.tar": 2, "mine-000001.tar": 2}
    skipped = [json.loads(line) for line in (out / "mine-skipped.jsonl").read_text().splitlines()]
    assert [(s["id"], s["reason"]) for s in skipped] == [
        ("gone", "missing_image"),
        ("noimg", "missing_image"),
        ("roles", "wrong_roles"),
        (7, "bad_record"),
    ]

    datamodule = MixedInstructionDataModule(
        {"mine": {"urls": str(out), "weight": 1.0}},
        {"mine": {"urls": str(out / "mine-{000000..000001}.tar")}},
        tokenizer=demo.tokenizer,
        num_image_tokens=NUM_IMAGE_TOKENS,
        image_size=IMAGE_SIZE,
        batch_size=4,
        num_workers=0,
    )
    datamodule.setup("fit")
    [loader] = datamodule.val_dataloader()
    [batch] = list(loader)
    assert batch["id"] == ["a", "b", "text", "c"] and batch["source"] == ["mine"] * 4
    assert batch["has_image"].tolist() == [True, True, False, True]
    assert batch["pixel_values"].shape == (3, 3, IMAGE_SIZE, IMAGE_SIZE)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert (batch["input_ids"] == image_id).sum(1).tolist() == [NUM_IMAGE_TOKENS] * 2 + [0, NUM_IMAGE_TOKENS]
    learned = [
        tokenizer.decode(ids[labels != IGNORE_INDEX]) for ids, labels in zip(batch["input_ids"], batch["labels"])
    ]
    # Whitespace-only separator tokens before a reply are not learned, so compare without spaces.
    expected = ["green</s>yes, green</s>", "a grey bar</s>", "hi there</s>", "dark</s>"]
    assert [t.replace(" ", "") for t in learned] == [t.replace(" ", "") for t in expected]
    assert datamodule.skipped_counts() == {}
    assert datamodule.epoch_samples() == 4
