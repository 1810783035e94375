"""The paper's datasets in their release formats (M3IT jsonl with base64 images, ShareGPT4V JSON + image root,
UReader jsonl, PathVQA HF rows and LLaVA-Med JSON), written small inside each test, converted by the ``mole-convert``
command (exit code, printed report, skipped list) and by the library, then read back through the project's own shard
reader and DataModule: conversations, sources and image bytes round-trip; LLaVA-Med's upsampling counts.

The installed script runs in a subprocess for M3IT and PathVQA (each start imports torch and Lightning: seconds); the
other command lines run in process through the script's ``main``."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

import mole_lightning
from mole_lightning import convert
from mole_lightning.constants import IGNORE_INDEX
from mole_lightning.data import MixedInstructionDataModule
from mole_lightning.data.paper_datasets import (
    convert_m3it,
    convert_pathvqa,
    convert_sharegpt4v,
    convert_ureader,
    parse_transcript,
    upsample_indices,
)
from mole_lightning.data.pipeline import SkipCounter, read_shard
from mole_lightning.data.sources import expand_urls
from tests.data.conftest import IMAGE_SIZE, NUM_IMAGE_TOKENS, image_bytes

SRC = Path(mole_lightning.__file__).parents[1]
MOLE_CONVERT = Path(sys.executable).parent / "mole-convert"


def mole_convert(*args: str) -> subprocess.CompletedProcess:
    """``mole-convert ARGS`` as a user runs it (the installed script; ``python -m mole_lightning.convert`` where the
    environment was installed before the script was declared)."""
    command = [str(MOLE_CONVERT)] if MOLE_CONVERT.exists() else [sys.executable, "-m", "mole_lightning.convert"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([*command, *args], env=env, capture_output=True, text=True, timeout=120)


def convert_in_process(capsys, *args: str) -> subprocess.CompletedProcess:
    """``mole-convert ARGS`` through the script's entry point in this process (same outputs as the subprocess)."""
    capsys.readouterr()
    code = convert.main(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["mole-convert", *args], code, out, err)


def written(out: Path, source: str) -> list[dict]:
    """Every sample of ``source``'s shards in ``out``, read by the pipeline's shard reader, json decoded."""
    counter = SkipCounter()
    samples = [s for url in expand_urls(str(out)) for s in read_shard(url, source, counter)]
    assert not counter.pop_delta()
    for sample in samples:
        sample["json"] = json.loads(sample["json"])
    return samples


def image_of(sample: dict) -> bytes | None:
    return next((sample[k] for k in ("jpg", "png", "webp", "gif", "bmp") if k in sample), None)


def skipped(out: Path, source: str) -> list[tuple[str, str]]:
    lines = (out / f"{source}-skipped.jsonl").read_text().splitlines()
    return [(str(entry["id"]), entry["reason"]) for entry in map(json.loads, lines)]


def turns(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# ------------------------------------------------------------------------------------------------------------ M3IT
def test_m3it_jsonl_with_base64_images_to_shards(tmp_path):
    red, blue = image_bytes((255, 0, 0)), image_bytes((0, 0, 255), fmt="JPEG")
    folder = tmp_path / "M3IT" / "data" / "vqa" / "vqa-v2"
    folder.mkdir(parents=True)
    lines = [
        {"instruction": "Answer it.", "inputs": "What colour?", "outputs": "red", "image_base64_str": [b64(red)]},
        {"instruction": "Describe it.", "inputs": "", "outputs": "A blue square.", "image_base64_str": [b64(blue)]},
        {"instruction": "Compare.", "inputs": "", "outputs": "same", "image_base64_str": [b64(red), b64(blue)]},
        {"instruction": "Q", "inputs": "x", "outputs": "  ", "image_base64_str": [b64(red)]},
        {"instruction": "Q", "inputs": "x", "outputs": "y", "image_base64_str": ["not base64 !"]},
        {"instruction": "Q", "inputs": "x", "outputs": "y", "image_base64_str": []},
        {"instruction": "Q", "inputs": "x", "outputs": "y", "image_base64_str": [b64(b"plain text, no image")]},
    ]  # fmt: skip
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines) + "{broken json\n")
    out = tmp_path / "shards"

    result = mole_convert("m3it", "--jsonl", str(path), "--source", "general", "--out", str(out), "--no-progress")

    assert result.returncode == 0, result.stderr
    assert "general: wrote 2 of 8 records to 1 shard(s)" in result.stdout
    expected_skips = {"multiple_images": 1, "empty_text": 1, "corrupt_image": 2, "missing_image": 1, "bad_record": 1}
    assert f"skipped 6 record(s): {json.dumps(expected_skips)}" in result.stdout
    reasons = ["multiple_images", "empty_text", "corrupt_image", "missing_image", "corrupt_image", "bad_record"]
    assert [reason for _, reason in skipped(out, "general")] == reasons
    samples = written(out, "general")
    assert [image_of(s) for s in samples] == [red, blue]  # the decoded base64 bytes, unchanged
    assert "png" in samples[0] and "jpg" in samples[1]
    first, second = (s["json"] for s in samples)
    assert first["conversations"] == turns("<image>\nAnswer it.\nWhat colour?", "red")
    assert second["conversations"] == turns("<image>\nDescribe it.", "A blue square.")
    assert first["source"] == "general" and first["dataset"] == "vqa-v2" and first["id"] == "vqa-v2-train-0"
    assert "image" not in first and "image_base64_str" not in first


# ------------------------------------------------------------------------------------------------------ ShareGPT4V
def sharegpt4v_root(root: Path) -> dict[str, bytes]:
    """ShareGPT4V's image root layout (``coco/train2017``, ``sam/images``); returns path → bytes."""
    images = {
        "coco/train2017/000000000009.jpg": image_bytes((10, 200, 10), fmt="JPEG"),
        "sam/images/sa_1.png": image_bytes((200, 10, 200)),
    }
    for name, data in images.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return images


def test_sharegpt4v_ft_json_to_shards_and_pt_captions_by_the_library(tmp_path, capsys):
    images = sharegpt4v_root(tmp_path / "data")
    ft = [
        {"id": "000000000009", "image": "coco/train2017/000000000009.jpg",
         "conversations": [*turns("<image>\nWhat is shown?", "A green square."), *turns("Sure?", "Yes.")]},
        {"id": "text-1", "conversations": turns("Write a haiku.", "Green squares at dawn")},
        {"id": "gone", "image": "sam/images/sa_404.png", "conversations": turns("<image>\nQ", "A")},
        {"id": "empty", "image": "sam/images/sa_1.png", "conversations": turns("<image>\nQ", "")},
    ]  # fmt: skip
    ft_path = tmp_path / "sharegpt4v_mix665k_cap23k_coco-ap9k_lcs3k_sam9k_div2k.json"
    ft_path.write_text(json.dumps(ft))
    out = tmp_path / "ft"
    args = ["--json", str(ft_path), "--images", str(tmp_path / "data"), "--source", "general", "--out", str(out)]

    result = convert_in_process(capsys, "sharegpt4v", *args, "--no-progress")

    assert result.returncode == 0, result.stderr
    assert "general: wrote 2 of 4 records" in result.stdout
    assert skipped(out, "general") == [("gone", "missing_image"), ("empty", "empty_text")]
    samples = written(out, "general")
    assert image_of(samples[0]) == images["coco/train2017/000000000009.jpg"] and image_of(samples[1]) is None
    assert [s["json"]["conversations"] for s in samples] == [ft[0]["conversations"], ft[1]["conversations"]]
    assert {s["json"]["source"] for s in samples} == {"general"}

    pt = [
        {"id": "sa_1", "image": "sam/images/sa_1.png", "conversations": turns("<image>\nDescribe.", "A purple tile.")}
    ]
    pt_path = tmp_path / "share-captioner_coco_lcs_sam_1246k_1107.json"
    pt_path.write_text(json.dumps(pt))
    report = convert_sharegpt4v(str(pt_path), str(tmp_path / "data"), str(tmp_path / "pt"), "pretrain")
    assert report.written == 1 and not report.skipped
    (sample,) = written(tmp_path / "pt", "pretrain")
    assert (
        image_of(sample) == images["sam/images/sa_1.png"] and sample["json"]["conversations"] == pt[0]["conversations"]
    )


# --------------------------------------------------------------------------------------------------------- UReader
PREAMBLE = (
    "The following is a conversation between a curious human and AI assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions."
)


def test_ureader_transcripts_to_shards(tmp_path, capsys):
    chart = image_bytes((250, 250, 250))
    (tmp_path / "images" / "ChartQA").mkdir(parents=True)
    (tmp_path / "images" / "ChartQA" / "c1.png").write_bytes(chart)
    records = [
        {"image": ["ChartQA/c1.png"], "prompt": "", "task_type": "qa_sft",
         "text": f"{PREAMBLE}\nHuman: <image>\nHuman: What is the peak value?\nAI: 42"},
        {"image": ["ChartQA/c1.png"], "prompt": "", "task_type": "qa_sft",
         "text": "Human: <image>\nHuman: First bar?\nAI: 3\nHuman: Last bar?\nAI: 7"},
        {"image": ["ChartQA/c1.png"], "prompt": "Read the title.", "text": "Sales 2020", "task_type": "parse_sft"},
        {"image": ["ChartQA/c1.png", "ChartQA/c1.png"], "prompt": "", "text": "Human: <image>\nAI: x"},
        {"image": [], "prompt": "", "text": "Human: What?\nAI: x"},
        {"image": ["ChartQA/c1.png"], "prompt": "", "text": "Human: <image>\nHuman: Value?\nAI: "},
        {"image": ["ChartQA/missing.png"], "prompt": "", "text": "Human: <image>\nHuman: Value?\nAI: 1"},
    ]  # fmt: skip
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "doc"
    args = ["--jsonl", str(path), "--images", str(tmp_path / "images"), "--source", "doc", "--out", str(out)]

    result = convert_in_process(capsys, "ureader", *args, "--no-progress")

    assert result.returncode == 0, result.stderr
    assert "doc: wrote 3 of 7 records" in result.stdout
    reasons = [reason for _, reason in skipped(out, "doc")]
    assert reasons == ["multiple_images", "missing_image", "empty_text", "missing_image"]
    samples = written(out, "doc")
    assert all(image_of(s) == chart for s in samples)
    assert [s["json"]["conversations"] for s in samples] == [
        turns("<image>\nWhat is the peak value?", "42"),
        [*turns("<image>\nFirst bar?", "3"), *turns("Last bar?", "7")],
        turns("<image>\nRead the title.", "Sales 2020"),
    ]
    assert [s["json"]["task_type"] for s in samples] == ["qa_sft", "qa_sft", "parse_sft"]
    assert parse_transcript("no markers") == []

    again = convert_ureader(str(path), str(tmp_path / "images"), str(tmp_path / "doc2"), "doc")  # the library
    assert again.written == 3 and again.skipped_by_reason() == {
        "multiple_images": 1,
        "missing_image": 2,
        "empty_text": 1,
    }


# --------------------------------------------------------------------------------------------------------- PathVQA
def test_upsample_indices_repeat_the_training_set_to_the_target():
    indices = upsample_indices(3, 8, seed=0)
    counts = Counter(indices)
    assert len(indices) == 8 and sorted(counts) == [0, 1, 2]
    assert sorted(counts.values()) == [2, 3, 3]  # 8 = 2 full passes + 2 records once more
    assert indices == sorted(indices) and indices == upsample_indices(3, 8, seed=0)
    assert upsample_indices(4, 8) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert len(set(upsample_indices(10, 4, seed=1))) == 4  # below the set's size: a subset, each once
    with pytest.raises(ValueError, match="empty training set"):
        upsample_indices(0, 5)


def test_pathvqa_llava_med_json_upsampled_by_the_command_and_as_an_evaluation_set(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    pictures = {name: image_bytes((i * 60, 100, 100), fmt="JPEG") for i, name in enumerate(["a", "b", "c"])}
    for name, data in pictures.items():
        (tmp_path / "images" / f"{name}.jpg").write_bytes(data)
    records = [
        {"id": "a", "image": "a.jpg", "conversations": turns("<image>\nNecrosis?", "yes"), "answer_type": "CLOSED"},
        {"id": "b", "image": "b.jpg", "conversations": turns("<image>\nWhat stain is used?", "hematoxylin")},
        {"id": "c", "image": "c.jpg", "conversations": turns("<image>\nIs this benign?", "No")},
        {"id": "noimage", "conversations": turns("<image>\nWhat?", "x")},
        {"id": "noanswer", "image": "a.jpg", "conversations": turns("<image>\nWhat?", "")},
    ]  # fmt: skip
    path = tmp_path / "pvqa_train.json"
    path.write_text(json.dumps(records))
    out = tmp_path / "med"
    args = ["--input", str(path), "--images", str(tmp_path / "images"), "--source", "med", "--out", str(out)]

    result = mole_convert("pathvqa", *args, "--upsample-to", "7", "--maxcount", "4", "--no-progress")

    assert result.returncode == 0, result.stderr
    assert "med: wrote 7 of 5 records to 2 shard(s)" in result.stdout
    assert skipped(out, "med") == [("noimage", "missing_image"), ("noanswer", "empty_text")]
    assert json.loads((out / "sizes.json").read_text()) == {"med-000000.tar": 4, "med-000001.tar": 3}
    samples = written(out, "med")
    counts = Counter(s["json"]["id"] for s in samples)
    assert sorted(counts.values()) == [2, 2, 3]  # 7 = 2 passes over 3 records + 1 once more
    for sample in samples:
        assert image_of(sample) == pictures[sample["json"]["id"]]
    assert {s["json"]["id"]: s["json"]["answer_type"] for s in samples} == {"a": "closed", "b": "open", "c": "closed"}
    assert sorted(Counter((s["json"]["id"], s["json"]["repeat"]) for s in samples).values()) == [1] * 7
    assert not any("task" in s["json"] or "answers" in s["json"] for s in samples)  # training data

    args = ["--input", str(path), "--images", str(tmp_path / "images"), "--out", str(tmp_path / "test")]
    test = convert_in_process(capsys, "pathvqa", *args, "--source", "pathvqa", "--task", "pathvqa_{answer_type}")
    assert test.returncode == 0, test.stderr
    rows = [s["json"] for s in written(tmp_path / "test", "pathvqa")]  # an evaluation set: each record once
    tasks = [(r["id"], r["task"], r["answers"]) for r in rows]
    assert tasks == [
        ("a", "pathvqa_closed", ["yes"]),
        ("b", "pathvqa_open", ["hematoxylin"]),
        ("c", "pathvqa_closed", ["No"]),
    ]


def test_pathvqa_hf_rows_with_image_bytes_by_the_library(tmp_path):
    jpeg, png = image_bytes((90, 20, 20), fmt="JPEG"), image_bytes((20, 90, 20))
    rows = [
        {"image": {"bytes": jpeg, "path": None}, "question": "where are liver stem cells?", "answer": "in the canals"},
        {"image": {"bytes": png, "path": "x.png"}, "question": "is this a lymph node?", "answer": "yes"},
        {"image": None, "question": "what is shown?", "answer": "cells"},
        {"image": {"bytes": jpeg, "path": None}, "question": "what is shown?", "answer": ""},
    ]
    report = convert_pathvqa(rows, "", str(tmp_path / "med"), "med", upsample_to=4)
    assert report.written == 4 and report.skipped_by_reason() == {"missing_image": 1, "empty_text": 1}
    samples = written(tmp_path / "med", "med")
    assert [image_of(s) for s in samples] == [jpeg, jpeg, png, png]
    assert samples[0]["json"]["conversations"] == turns("<image>\nwhere are liver stem cells?", "in the canals")
    assert [s["json"]["answer_type"] for s in samples] == ["open", "open", "closed", "closed"]


# ---------------------------------------------------------------------------------------------------- bad input
def test_bad_input_exits_2_with_a_one_line_error(tmp_path, capsys):
    missing = convert_in_process(
        capsys, "m3it", "--jsonl", str(tmp_path / "none.jsonl"), "--source", "g", "--out", str(tmp_path)
    )
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1, missing.stderr
    assert missing.stderr.startswith("mole-convert m3it: error: no such file: ") and "none.jsonl" in missing.stderr
    (tmp_path / "bad.json").write_text("{not json")
    args = ["--json", str(tmp_path / "bad.json"), "--images", ".", "--source", "g", "--out", str(tmp_path / "o")]
    bad = convert_in_process(capsys, "sharegpt4v", *args)
    assert (
        bad.returncode == 2
        and bad.stderr.startswith("mole-convert sharegpt4v: error: ")
        and bad.stderr.count("\n") == 1
    )
    with pytest.raises(SystemExit) as exit_info:  # argparse: exit 2 with its usage line
        convert.main(["coco", "--source", "g", "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and "invalid choice: 'coco'" in capsys.readouterr().err
    negative = convert_in_process(capsys, "pathvqa", "--input", str(tmp_path / "bad.json"), "--upsample-to", "-1",
                                  "--source", "g", "--out", str(tmp_path / "o"))  # fmt: skip
    assert negative.returncode == 2 and "error:" in negative.stderr


# ------------------------------------------------------------------------------------------------ into batches
def test_converted_shards_feed_the_datamodule_with_their_sources(tmp_path, demo):
    """Shards of two formats, read by the DataModule as validation sources: every sample becomes an example with
    its source, its image and learned answer tokens."""
    red = image_bytes((255, 0, 0))
    folder = tmp_path / "m3it" / "coco"
    folder.mkdir(parents=True)
    line = {"instruction": "Name the colour.", "inputs": "", "outputs": "red", "image_base64_str": [b64(red)]}
    (folder / "train.jsonl").write_text(json.dumps(line) + "\n")
    assert convert_m3it(str(folder / "train.jsonl"), str(tmp_path / "general"), "general").written == 1
    rows = [{"image": {"bytes": red, "path": None}, "question": "is it red?", "answer": "yes"}]
    convert_pathvqa(rows, "", str(tmp_path / "med"), "med", upsample_to=2)

    sources = {name: {"urls": str(tmp_path / name)} for name in ("general", "med")}
    dm = MixedInstructionDataModule(
        sources=sources, val_sources=sources, tokenizer=demo.tokenizer, num_image_tokens=NUM_IMAGE_TOKENS,
        image_size=IMAGE_SIZE, batch_size=4, num_workers=0, max_length=256,
    )  # fmt: skip
    dm.setup("validate")
    seen = Counter()
    for name, loader in zip(dm.val_source_names, dm.val_dataloader()):
        for batch in loader:
            seen.update(batch["source"])
            assert all(source == name for source in batch["source"])
            assert batch["pixel_values"].shape[0] == len(batch["source"])  # one image per sample
            assert ((batch["labels"] != IGNORE_INDEX).sum(dim=1) > 0).all()
    assert seen == {"general": 1, "med": 2} and not dm.skipped_counts()
