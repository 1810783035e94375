"""Demo data: layout, record fields, conflicting instructions, tokenizer, and the command-line tool."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

from PIL import Image

from mole_lightning.data.demo import DEMO_IMAGE_SIZE
from mole_lightning.data.sources import expand_urls
from tests.conftest import DEMO_MAXCOUNT, DEMO_TRAIN, DEMO_VAL, load_tool


def read_records(spec: str) -> list[tuple[dict, bytes | None]]:
    records = []
    for path in expand_urls(spec):
        with tarfile.open(path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name in sorted(n for n in members if n.endswith(".json")):
            key = name[: -len(".json")]
            image = members.get(f"{key}.jpg", members.get(f"{key}.png"))
            records.append((json.loads(members[name]), image))
    return records


def test_layout_and_sizes(demo):
    for split, count in (("train", DEMO_TRAIN), ("val", DEMO_VAL)):
        sizes = json.loads(open(os.path.join(demo.root, split, "sizes.json")).read())
        for source in ("general", "doc", "med"):
            assert sum(v for k, v in sizes.items() if k.startswith(source + "-")) == count
    assert set(os.listdir(os.path.join(demo.root, "train"))) == {
        "sizes.json",
        *(f"{s}-{i:06d}.tar" for s in ("general", "doc", "med") for i in range(-(-DEMO_TRAIN // DEMO_MAXCOUNT))),
    }


def test_records_have_eval_fields_and_the_domains_conflict(demo):
    answers_to_same_question = {}
    for source in ("general", "doc", "med"):
        for record, image in read_records(demo.train[source]):
            assert record["source"] == source and record["task"] in {"vqa", "mc", "yesno", "open"}
            assert isinstance(record["answers"], list) and record["answers"]
            assert record["conversations"][-1]["value"] in record["answers"] or len(record["conversations"]) > 2
            if record["task"] == "mc":
                assert record["options"] and record["answers"][0] in "ABC"
            if record["task"] == "yesno":
                assert record["answers"][0] in ("yes", "no")
            if image is not None:
                assert Image.open(io.BytesIO(image)).size == (DEMO_IMAGE_SIZE, DEMO_IMAGE_SIZE)
                assert record["conversations"][0]["value"].startswith("<image>\n")
            if record["conversations"][0]["value"] == "<image>\nWhat is in the image?":
                answers_to_same_question.setdefault(source, set()).add(record["conversations"][1]["value"])
    assert {"general", "doc", "med"} <= set(answers_to_same_question)
    assert any(a.startswith(("a ", "an ")) for a in answers_to_same_question["general"])
    assert answers_to_same_question["med"] <= {"normal tissue", "abnormal tissue"}
    assert not answers_to_same_question["doc"] & answers_to_same_question["general"]


def test_tokenizer_special_tokens_and_role_markers(tokenizer):
    for token in (
        "<unk>",
        "<s>",
        "</s>",
        "<pad>",
        "<image>",
        "<|start_header_id|>",
        "<|eot_id|>",
        "<|im_start|>",
        "<|im_end|>",
    ):
        assert tokenizer.convert_tokens_to_ids(token) != tokenizer.unk_token_id or token == "<unk>"
        assert tokenizer.tokenize(token) == [token]
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "<pad>")
    assert tokenizer.tokenize("<|im_start|>assistant\n") == ["<|im_start|>", "assistant", "Ċ"]
    assert tokenizer.tokenize(" USER: hi ASSISTANT:") == ["ĠUSER", ":", "Ġhi", "ĠASSISTANT", ":"]
    assert tokenizer("hi")["input_ids"][0] == tokenizer.bos_token_id


def test_same_seed_same_bytes_and_cli(tmp_path):
    script = Path(sys.executable).with_name("mole-demo-data")  # the installed command, as users run it
    result = subprocess.run([str(script), "--out", str(tmp_path / "a"), "--train", "5", "--val", "2", "--seed", "3"],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0 and "wrote demo data to" in result.stdout, result.stderr
    load_tool("make_demo_data").main(["--out", str(tmp_path / "b"), "--train", "5", "--val", "2", "--seed", "3"])
    for split in ("train", "val"):
        for name in os.listdir(tmp_path / "a" / split):
            assert (tmp_path / "a" / split / name).read_bytes() == (tmp_path / "b" / split / name).read_bytes()
    assert os.path.exists(tmp_path / "a" / "tokenizer" / "tokenizer.json")
