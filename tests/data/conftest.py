"""Fixtures for the data tests: the demo tokenizer and helpers to write crafted shards (the demo data set, the
DataModule factory and ``load_tool`` come from ``tests/conftest.py``)."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from PIL import Image

from mole_lightning.data.demo import DemoData
from mole_lightning.data.samples import load_tokenizer
from mole_lightning.data.shard_writer import ShardWriter

NUM_IMAGE_TOKENS = 4
IMAGE_SIZE = 32


@pytest.fixture(scope="session")
def tokenizer(demo: DemoData) -> Any:
    """The demo tokenizer."""
    return load_tokenizer(demo.tokenizer)


def image_bytes(
    colour: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (20, 12), fmt: str = "PNG"
) -> bytes:
    """Encoded bytes of a solid-colour image."""
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format=fmt)
    return buffer.getvalue()


def record(index: int, question: str, answer: str, image: bool = True, **extra: Any) -> dict[str, Any]:
    """A raw webdataset sample with one human/gpt exchange (``<image>`` first when ``image``)."""
    value = ("<image>\n" if image else "") + question
    data = {"id": f"r{index}", "conversations": [{"from": "human", "value": value}, {"from": "gpt", "value": answer}]}
    data.update(extra)
    sample: dict[str, Any] = {"__key__": f"{index:09d}", "json": json.dumps(data).encode()}
    if image:
        sample["png"] = image_bytes()
    return sample


def write_source(directory: str, source: str, samples: list[dict[str, Any]], maxcount: int = 1000) -> str:
    """Writes samples as shards of ``source``; returns their brace spec."""
    with ShardWriter(directory, source, maxcount) as writer:
        for sample in samples:
            writer.write(sample)
    return writer.brace_spec
