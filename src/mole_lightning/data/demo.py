"""Synthetic demo data: three small image domains with conflicting instructions, and a tokenizer trained on them.

* ``general`` -- coloured shapes (JPEG): "What is in the image?" → "a red circle"; colour questions, multiple
  choice over shapes, two-turn dialogues and a few text-only samples.
* ``doc`` -- rendered words and numbers (PNG): the same "What is in the image?" → the text itself.
* ``med`` -- textures with or without a dark lesion (JPEG): yes/no abnormality questions, and "What is in the
  image?" → "normal tissue" / "abnormal tissue".

Every record has LLaVA fields (``id``, ``image``, ``conversations``) plus ``source``, ``answers``, ``task`` (``vqa``,
``mc``, ``yesno``, ``open``) and, for multiple choice, ``options``. :func:`make_demo_data` writes
``train/<source>-%06d.tar`` and ``val/<source>-%06d.tar`` with ``sizes.json`` beside them, and ``tokenizer/`` (a
byte-level BPE ``PreTrainedTokenizerFast`` with ``<unk> <s> </s> <pad> <image>`` and the Llama-3/ChatML role
markers as special tokens, and a Vicuna-v1 ``chat_template``).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from mole_lightning.constants import DEFAULT_IMAGE_TOKEN
from mole_lightning.data.shard_writer import ShardWriter
from mole_lightning.data.templates import CHATML_SYSTEM, LLAMA3_SYSTEM, VICUNA_V1_SYSTEM

DEMO_SOURCES = ("general", "doc", "med")
DEMO_IMAGE_SIZE = 64
"""Side of the generated images (the tiny vision tower resizes them to its own ``image_size``, e.g. 32)."""
SPECIAL_TOKENS = (
    "<unk>",
    "<s>",
    "</s>",
    "<pad>",
    DEFAULT_IMAGE_TOKEN,
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|im_start|>",
    "<|im_end|>",
)
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
SHORT_INSTRUCTION = "Answer the question using a single word or phrase."

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 70, 220),
    "yellow": (235, 205, 20),
    "purple": (140, 50, 170),
    "orange": (245, 140, 20),
}
SHAPES = ("circle", "square", "triangle")
WORDS = ("cat", "dog", "sun", "map", "box", "tree", "fish", "bird", "lamp", "door", "milk", "road")
COLOUR_MIXES = {
    ("red", "blue"): "purple",
    ("red", "yellow"): "orange",
    ("blue", "yellow"): "green",
}

VICUNA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}"
    "{% set loop_messages = messages[1:] %}{% else %}{{ '" + VICUNA_V1_SYSTEM.replace("'", "\\'") + "' }}"
    "{% set loop_messages = messages %}{% endif %}{{ ' ' }}"
    "{% for message in loop_messages %}{% if message['role'] == 'user' %}{{ 'USER: ' + message['content'] + ' ' }}"
    "{% else %}{{ 'ASSISTANT: ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


@dataclass
class DemoData:
    """Paths written by :func:`make_demo_data`.

    Attributes:
        root: Output directory.
        tokenizer: Directory of the saved tokenizer.
        train: ``{source: brace spec of its training shards}``.
        val: ``{source: brace spec of its validation shards}``.
    """

    root: str
    tokenizer: str
    train: dict[str, str]
    val: dict[str, str]

    def sources(self, split: str = "train", weights: dict[str, float] | None = None) -> dict[str, dict[str, Any]]:
        """``{name: {"urls": spec, "weight": w}}`` for :class:`~mole_lightning.data.MixedInstructionDataModule`."""
        specs = self.train if split == "train" else self.val
        return {name: {"urls": spec, "weight": (weights or {}).get(name, 1.0)} for name, spec in specs.items()}


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    if fmt == "jpg":
        image.save(buffer, format="JPEG", quality=90)
    else:
        image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _turns(*pairs: tuple[str, str], image: bool = True) -> list[dict[str, str]]:
    conversations = []
    for index, (question, answer) in enumerate(pairs):
        prefix = DEFAULT_IMAGE_TOKEN + "\n" if image and index == 0 else ""
        conversations.append({"from": "human", "value": prefix + question})
        conversations.append({"from": "gpt", "value": answer})
    return conversations


def draw_shape(rng: random.Random, colour: str, shape: str, size: int = DEMO_IMAGE_SIZE) -> Image.Image:
    """A ``shape`` in ``colour`` on a light background, with a random position and scale."""
    background = tuple(rng.randint(225, 255) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    radius = rng.randint(size // 5, size // 3)
    cx, cy = rng.randint(radius, size - radius), rng.randint(radius, size - radius)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
    elif shape == "square":
        draw.rectangle((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
    else:
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=fill)
    return image


_FONT_CACHE: dict[int, Any] = {}


def _font(size: int) -> Any:
    if size not in _FONT_CACHE:
        try:
            _FONT_CACHE[size] = ImageFont.load_default(size=size)
        except TypeError:  # Pillow without FreeType scaling
            _FONT_CACHE[size] = ImageFont.load_default()
    return _FONT_CACHE[size]


def draw_text(rng: random.Random, text: str, size: int = DEMO_IMAGE_SIZE) -> Image.Image:
    """``text`` in dark ink on a paper-like background."""
    image = Image.new("RGB", (size, size), tuple(rng.randint(235, 255) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    font = _font(max(10, size // (2 + len(text) // 3)))
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x = rng.randint(0, max(0, size - (right - left))) - left
    y = rng.randint(0, max(0, size - (bottom - top))) - top
    draw.text((x, y), text, fill=tuple(rng.randint(0, 60) for _ in range(3)), font=font)
    return image


def draw_tissue(rng: random.Random, abnormal: bool, size: int = DEMO_IMAGE_SIZE) -> Image.Image:
    """A pink, noisy, striped texture; ``abnormal`` adds a dark irregular blob."""
    np_rng = np.random.default_rng(rng.getrandbits(32))
    ys, xs = np.mgrid[0:size, 0:size]
    phase = rng.uniform(0, 6.3)
    stripes = np.sin((xs * rng.uniform(0.2, 0.6) + ys * rng.uniform(0.1, 0.4)) + phase)
    base = np.array([225, 150, 180], dtype=np.float32)
    pixels = base + stripes[..., None] * 18 + np_rng.normal(0, 10, (size, size, 3))
    if abnormal:
        cy, cx = rng.randint(size // 4, 3 * size // 4), rng.randint(size // 4, 3 * size // 4)
        radius = rng.uniform(size / 10, size / 5)
        blob = ((ys - cy) ** 2 + (xs - cx) ** 2) < radius**2 * (1 + 0.3 * np.sin(xs / 2.0))
        pixels[blob] = pixels[blob] * 0.35 + np.array([60, 20, 60])
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def general_record(rng: random.Random, index: int) -> tuple[dict[str, Any], bytes | None]:
    """One ``general`` record (shapes and colours) and its JPEG bytes (``None`` for text-only samples)."""
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    kind = rng.random()
    if kind < 0.05:
        (first, second), mixed = rng.choice(list(COLOUR_MIXES.items()))
        question = f"What color do you get by mixing {first} and {second}?"
        return {"conversations": _turns((question, mixed), image=False), "answers": [mixed], "task": "open"}, None
    image = _encode(draw_shape(rng, colour, shape), "jpg")
    description = _with_article(f"{colour} {shape}")
    if kind < 0.45:
        record = {"conversations": _turns(("What is in the image?", description)), "task": "open"}
        record["answers"] = [description]
    elif kind < 0.65:
        question = f"What color is the shape?\n{SHORT_INSTRUCTION}"
        record = {"conversations": _turns((question, colour)), "answers": [colour], "task": "vqa"}
    elif kind < 0.85:
        options = list(SHAPES)
        rng.shuffle(options)
        letters = "ABC"
        lines = "\n".join(f"{letter}. {option}" for letter, option in zip(letters, options))
        answer = letters[options.index(shape)]
        question = f"Which shape is shown?\n{lines}\n{MC_INSTRUCTION}"
        record = {"conversations": _turns((question, answer)), "answers": [answer], "task": "mc", "options": options}
    else:
        conversations = _turns(("What is in the image?", description), ("What color is it?", colour))
        record = {"conversations": conversations, "answers": [colour], "task": "open"}
    return record, image


def doc_record(rng: random.Random, index: int) -> tuple[dict[str, Any], bytes | None]:
    """One ``doc`` record (a rendered word or number) and its PNG bytes."""
    text = str(rng.randint(0, 999)) if rng.random() < 0.5 else rng.choice(WORDS)
    image = _encode(draw_text(rng, text), "png")
    question = rng.choice(["What is in the image?", "What is written in the image?"])
    if rng.random() < 0.3:
        question = f"{question}\n{SHORT_INSTRUCTION}"
    return {"conversations": _turns((question, text)), "answers": [text], "task": "vqa"}, image


def med_record(rng: random.Random, index: int) -> tuple[dict[str, Any], bytes | None]:
    """One ``med`` record (tissue texture, maybe abnormal) and its JPEG bytes."""
    abnormal = rng.random() < 0.5
    image = _encode(draw_tissue(rng, abnormal), "jpg")
    kind = rng.random()
    if kind < 0.4:
        answer = "yes" if abnormal else "no"
        record = {"conversations": _turns(("Is there an abnormality in the image?", answer)), "task": "yesno"}
    elif kind < 0.7:
        answer = "no" if abnormal else "yes"
        record = {"conversations": _turns(("Is this tissue normal?", answer)), "task": "yesno"}
    else:
        answer = "abnormal tissue" if abnormal else "normal tissue"
        record = {"conversations": _turns(("What is in the image?", answer)), "task": "open"}
    record["answers"] = [answer]
    return record, image


RECORD_MAKERS: dict[str, Callable[[random.Random, int], tuple[dict[str, Any], bytes | None]]] = {
    "general": general_record,
    "doc": doc_record,
    "med": med_record,
}


def demo_records(source: str, count: int, seed: int, split: str) -> Iterator[dict[str, Any]]:
    """Yields webdataset samples (``__key__``, ``json``, optional ``jpg``/``png``) of one demo source."""
    rng = random.Random(f"{seed}-{source}-{split}")
    for index in range(count):
        record, image = RECORD_MAKERS[source](rng, index)
        key = f"{index:09d}"
        extension = "png" if source == "doc" else "jpg"
        record = {"id": f"{source}-{split}-{index}", **record, "source": source}
        sample: dict[str, Any] = {"__key__": key}
        if image is not None:
            record["image"] = f"{key}.{extension}"
            sample[extension] = image
        sample["json"] = json.dumps(record).encode("utf-8")
        yield sample


def tokenizer_corpus(texts: list[str]) -> Iterator[str]:
    """Training text for the demo tokenizer: conversation texts plus every template's fixed strings."""
    yield from texts
    fixed = [VICUNA_V1_SYSTEM, LLAMA3_SYSTEM, CHATML_SYSTEM, "USER: ASSISTANT:", "system", "user", "assistant"]
    fixed.append(f"{VICUNA_V1_SYSTEM} USER: hi ASSISTANT: hello USER: ok ASSISTANT: bye")
    for _ in range(20):
        yield from fixed
        yield MC_INSTRUCTION
        yield SHORT_INSTRUCTION


def train_demo_tokenizer(texts: list[str], out_dir: str, vocab_size: int = 1024) -> str:
    """Trains a byte-level BPE tokenizer on ``texts`` and saves it in Hugging Face format to ``out_dir``.

    The tokenizer adds ``<s>`` in front when called with ``add_special_tokens=True`` (like Llama), pads with
    ``<pad>`` and has every entry of :data:`SPECIAL_TOKENS` as a single special token.

    Returns:
        ``out_dir``.
    """
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(tokenizer_corpus(texts), trainer)
    bos_id = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=list(SPECIAL_TOKENS[4:]),
        model_max_length=4096,
    )
    tokenizer.chat_template = VICUNA_CHAT_TEMPLATE
    tokenizer.save_pretrained(out_dir)
    return out_dir


def make_demo_data(
    out: str, train: int = 2000, val: int = 100, seed: int = 0, maxcount: int = 1000, vocab_size: int = 1024
) -> DemoData:
    """Writes the demo shards and tokenizer.

    Args:
        out: Output directory; gets ``train/``, ``val/`` (shards + ``sizes.json``) and ``tokenizer/``.
        train: Training samples per source.
        val: Validation samples per source.
        seed: Random seed (same seed, same bytes).
        maxcount: Samples per shard.
        vocab_size: Tokenizer vocabulary size.

    Returns:
        The written paths, with ready-made DataModule source dicts (:meth:`DemoData.sources`).
    """
    specs: dict[str, dict[str, str]] = {"train": {}, "val": {}}
    texts: list[str] = []
    for split, count in (("train", train), ("val", val)):
        split_dir = os.path.join(out, split)
        os.makedirs(split_dir, exist_ok=True)
        sizes_path = os.path.join(split_dir, "sizes.json")
        if os.path.exists(sizes_path):
            os.remove(sizes_path)
        for source in DEMO_SOURCES:
            with ShardWriter(split_dir, source, maxcount) as writer:
                for sample in demo_records(source, count, seed, split):
                    writer.write(sample)
                    if split == "train":
                        record = json.loads(sample["json"])
                        texts.extend(turn["value"] for turn in record["conversations"])
            specs[split][source] = writer.brace_spec
    tokenizer_dir = train_demo_tokenizer(texts, os.path.join(out, "tokenizer"), vocab_size)
    return DemoData(root=out, tokenizer=tokenizer_dir, train=specs["train"], val=specs["val"])


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``mole-demo-data`` (also parsed by the documented-commands test)."""
    parser = argparse.ArgumentParser(
        prog="mole-demo-data",
        description="Write the synthetic demo data set: general/doc/med shards (train and val) and a demo tokenizer.",
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--train", type=int, default=2000, help="training samples per source")
    parser.add_argument("--val", type=int, default=100, help="validation samples per source")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--maxcount", type=int, default=1000, help="samples per shard")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``mole-demo-data``: writes ``OUT/train/<source>-%06d.tar``, ``OUT/val/<source>-%06d.tar`` (each with
    ``sizes.json``) and ``OUT/tokenizer/``, then prints what it wrote."""
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    demo = make_demo_data(args.out, train=args.train, val=args.val, seed=args.seed, maxcount=args.maxcount)
    print(json.dumps({"tokenizer": demo.tokenizer, "train": demo.train, "val": demo.val}, indent=1))
    print(f"wrote demo data to {args.out} in {time.perf_counter() - start:.1f} s")
    return 0
