"""Shard writing, URL expansion and the LLaVA JSON → shards → batches round trip (with the converter tool)."""

from __future__ import annotations

import importlib.util
import json
import os
import tarfile

from PIL import Image

from mole_lightning.constants import IGNORE_INDEX
from mole_lightning.data import MixedInstructionDataModule
from mole_lightning.data.shards import ShardWriter, count_samples, expand_urls
from tests.data.conftest import IMAGE_SIZE, NUM_IMAGE_TOKENS

TOOLS = os.path.join(os.path.dirname(__file__), "..", "..", "tools")


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(TOOLS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shard_writer_splits_by_maxcount_and_records_sizes(tmp_path):
    with ShardWriter(str(tmp_path), "src", maxcount=2) as writer:
        for index in range(5):
            writer.write({"__key__": f"{index:03d}", "json": {"i": index}, "txt": "hello"})
    assert sorted(os.listdir(tmp_path)) == ["sizes.json", "src-000000.tar", "src-000001.tar", "src-000002.tar"]
    assert json.loads((tmp_path / "sizes.json").read_text()) == {
        "src-000000.tar": 2,
        "src-000001.tar": 2,
        "src-000002.tar": 1,
    }
    with tarfile.open(tmp_path / "src-000001.tar") as tar:
        assert tar.getnames() == ["002.json", "002.txt", "003.json", "003.txt"]
        assert json.load(tar.extractfile("003.json")) == {"i": 3}
    assert writer.brace_spec == f"{tmp_path}/src-{{000000..000002}}.tar"
    assert count_samples(expand_urls(writer.brace_spec)) == 5


def test_expand_urls_handles_braces_lists_directories_and_double_colons(tmp_path):
    for name in ("a-000000.tar", "a-000001.tar"):
        (tmp_path / name).write_bytes(b"")
    assert expand_urls("x-{000000..000002}.tar") == ["x-000000.tar", "x-000001.tar", "x-000002.tar"]
    assert expand_urls(["http://h/a.tar", "pipe:cat b.tar"]) == ["http://h/a.tar", "pipe:cat b.tar"]
    assert expand_urls("p.tar::q.tar") == ["p.tar", "q.tar"]
    assert expand_urls(str(tmp_path)) == [str(tmp_path / "a-000000.tar"), str(tmp_path / "a-000001.tar")]
    assert count_samples(["http://h/a.tar"]) is None


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
