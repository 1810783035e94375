"""Benchmark the training batches: padding fraction, samples/s and bytes per sample sent by the workers.

One run measures three settings side by side on the same synthetic shards, same seed and same worker count:

* ``before``: consecutive batches, workers send float32 pixels normalised in the worker (the pipeline before uint8
  pixels; reproduced by normalising inside the worker's collation);
* ``uint8``: consecutive batches, workers send uint8 pixels (the model normalises them on its device);
* ``grouped``: ``group_by_modality_length=True`` with uint8 pixels.

The data imitates the length and modality mix of LLaVA-1.5's ``llava_v1_5_mix665k`` (assumed, not measured from
the file): a share ``--text-share`` of text-only samples (default 0.06: 40.7K ShareGPT conversations of 665K) and
image samples otherwise. Text lengths in tokens are drawn from long-tailed log-normal distributions:

* image samples: 576 image tokens + text of median 120 tokens (log-normal, σ = 0.8, clipped to 16..1400), split
  into 1-4 question/answer turns (VQA-style multi-turn conversations and LLaVA-158K dialogues);
* text-only samples: median 500 tokens (log-normal, σ = 0.9, clipped to 32..2000), ShareGPT-like and longer;

plus the ``vicuna_v1`` system prompt and role markers, truncated at ``max_length`` 2048. Images are photo-like
640×480 JPEGs (quality 90), processed with ``pad`` to 336 px. Shards are written with
:class:`~mole_lightning.data.shard_writer.ShardWriter`, the tokenizer is the demo tokenizer
(:func:`~mole_lightning.data.make_demo_data`); words are drawn from a list the tokenizer knows, their count set
from its measured tokens per word. The printed mean lengths are the ones that reached the batches.

Padding fraction = pad tokens / all tokens of the batches (``1 − Σ attention_mask / (B · L)`` summed over batches).
Bytes per sample = bytes of all tensors of a batch as a worker sends it, over its samples (pixels: per image).

Usage::

    python tools/bench_data.py [--samples 8000] [--workers 2] [--batch-size 16] [--group-batches 32] [--text-share 0.06]
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import random
import tempfile
import time
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from mole_lightning.data import MixedInstructionDataModule
from mole_lightning.data.demo import make_demo_data
from mole_lightning.data.pipeline import CountingLoader
from mole_lightning.data.samples import load_tokenizer
from mole_lightning.data.shard_writer import ShardWriter
from mole_lightning.pixels import normalize_pixels

IMAGE_TOKENS = 576
IMAGE_SIZE = 336
MAX_LENGTH = 2048
IMAGE_TEXT = {"median": 120, "sigma": 0.8, "low": 16, "high": 1400}
TEXT_ONLY = {"median": 500, "sigma": 0.9, "low": 32, "high": 2000}
WORDS = (
    "the a an is in on of and with there what which where colour shape image picture red blue green yellow circle "
    "square triangle small large left right top bottom text number answer question describe detail"
).split()


def photo_like_jpeg(rng: random.Random, width: int = 640, height: int = 480) -> bytes:
    """A 640×480 JPEG (quality 90) with gradients, shapes and noise, so it compresses like a photo."""
    np_rng = np.random.default_rng(rng.getrandbits(32))
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack(
        [rng.uniform(60, 200) + 40 * np.sin(xs / rng.uniform(20, 80) + c) + 30 * np.cos(ys / 50) for c in range(3)],
        axis=-1,
    )
    pixels = np.clip(base + np_rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x, y = rng.randint(0, width - 100), rng.randint(0, height - 100)
        colour = tuple(rng.choices(range(256), k=3))
        draw.ellipse((x, y, x + rng.randint(20, 100), y + rng.randint(20, 100)), fill=colour)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def tokens_per_word(tokenizer: Any, rng: random.Random) -> float:
    """Mean tokens per word of :data:`WORDS` text under ``tokenizer``."""
    text = " ".join(rng.choices(WORDS, k=1000))
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) / 1000


def text_tokens(rng: random.Random, shape: dict[str, float]) -> int:
    """A text length in tokens from a clipped log-normal distribution."""
    value = rng.lognormvariate(math.log(shape["median"]), shape["sigma"])
    return int(min(max(value, shape["low"]), shape["high"]))


def conversation(rng: random.Random, words: int, image: bool) -> list[dict[str, str]]:
    """1-4 human/gpt turns with ``words`` words in all (a fifth in the questions), ``<image>`` first if ``image``."""
    turns = min(4, 1 + words // 60)
    per_turn = max(2, words // turns)
    messages = []
    for turn in range(turns):
        question = " ".join(rng.choices(WORDS, k=max(1, per_turn // 5))) + "?"
        answer = " ".join(rng.choices(WORDS, k=max(1, per_turn - per_turn // 5))) + "."
        if turn == 0 and image:
            question = "<image>\n" + question
        messages += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return messages


def write_mix(out_dir: str, count: int, text_share: float, tokenizer: Any, seed: int = 0) -> dict[str, dict]:
    """Writes the LLaVA-665K-like mix as one source; returns the DataModule ``sources``."""
    rng = random.Random(seed)
    per_word = tokens_per_word(tokenizer, rng)
    images = [photo_like_jpeg(rng) for _ in range(100)]  # reused encoded images keep the set-up quick
    with ShardWriter(out_dir, "mix", maxcount=1000) as writer:
        for index in range(count):
            image = rng.random() >= text_share
            tokens = text_tokens(rng, IMAGE_TEXT if image else TEXT_ONLY)
            record = {"id": f"mix-{index}", "conversations": conversation(rng, round(tokens / per_word), image)}
            sample = {"__key__": f"{index:09d}", "json": record}
            if image:
                sample["jpg"] = images[index % len(images)]
            writer.write(sample)
    return {"mix": {"urls": writer.brace_spec, "weight": 1.0}}


class FloatPixelsCollator:
    """Collation that normalises the pixels to float32 in the worker: what the workers sent before uint8 pixels."""

    def __init__(self, collate_fn: Any, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.collate_fn = collate_fn
        self.mean = mean
        self.std = std

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collate_fn(samples)
        if batch["pixel_values"] is not None:
            batch["pixel_values"] = normalize_pixels(batch["pixel_values"], self.mean, self.std)
        return batch


def tensor_bytes(batch: dict[str, Any]) -> tuple[int, int]:
    """``(all tensor bytes, pixel bytes)`` of a batch as a worker sends it."""
    tensors = [value for value in batch.values() if isinstance(value, torch.Tensor)]
    pixels = batch["pixel_values"]
    return sum(t.nbytes for t in tensors), 0 if pixels is None else pixels.nbytes


def measure(setting: str, sources: dict, tokenizer: str, args: argparse.Namespace) -> dict[str, Any]:
    """One training epoch of ``args.samples`` samples in ``setting``; returns the measurements."""
    datamodule = MixedInstructionDataModule(
        sources,
        tokenizer=tokenizer,
        template="vicuna_v1",
        num_image_tokens=IMAGE_TOKENS,
        image_size=IMAGE_SIZE,
        image_aspect="pad",
        batch_size=args.batch_size,
        num_workers=args.workers,
        max_length=MAX_LENGTH,
        shuffle_buffer=500,
        samples_per_epoch=args.samples,
        group_by_modality_length=setting == "grouped",
        group_batches=args.group_batches,
    )
    datamodule.setup("fit")
    stream = datamodule.train_dataset()
    if setting == "before":
        stream.collate_fn = FloatPixelsCollator(stream.collate_fn, datamodule.image_mean, datamodule.image_std)
    loader = CountingLoader(stream, datamodule.tally, num_workers=args.workers)
    samples = images = sent = pixel_bytes = 0
    lengths: dict[bool, list[int]] = {True: [], False: []}
    tokens = {kind: [0, 0] for kind in ("all", "image batches", "text batches")}  # [real, padded total]
    start = time.perf_counter()
    for batch in loader:
        mask = batch["attention_mask"]
        samples += mask.shape[0]
        images += int(batch["has_image"].sum())
        kinds = ["all"]
        if batch["has_image"].all() or not batch["has_image"].any():
            kinds.append("image batches" if batch["has_image"].all() else "text batches")
        for kind in kinds:
            tokens[kind][0] += int(mask.sum())
            tokens[kind][1] += mask.numel()
        batch_bytes, batch_pixel_bytes = tensor_bytes(batch)
        sent += batch_bytes
        pixel_bytes += batch_pixel_bytes
        for row_length, image in zip(mask.sum(dim=1).tolist(), batch["has_image"].tolist()):
            lengths[image].append(row_length)
    elapsed = time.perf_counter() - start
    return {
        "setting": setting,
        "workers": args.workers,
        "samples": samples,
        "text_only_share": round(1 - images / samples, 3),
        "mean_tokens_image_samples": round(float(np.mean(lengths[True])), 1) if lengths[True] else None,
        "mean_tokens_text_samples": round(float(np.mean(lengths[False])), 1) if lengths[False] else None,
        "padding_fraction": round(1 - tokens["all"][0] / tokens["all"][1], 4),
        "padding_single_modality_batches": {
            kind: round(1 - real / total, 4) for kind, (real, total) in tokens.items() if kind != "all" and total
        },
        "seconds": round(elapsed, 2),
        "samples_per_s": round(samples / elapsed, 1),
        "bytes_per_sample": round(sent / samples),
        "pixel_bytes_per_image": round(pixel_bytes / images) if images else 0,
        "skipped": datamodule.skipped_counts(),
    }


def build_parser() -> argparse.ArgumentParser:
    """The command line of this tool (also parsed by the documented-commands test)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=8000, help="training samples per setting (one epoch)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (0: the main process)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--group-batches", type=int, default=32, help="batches per grouping buffer (DataModule default)"
    )
    parser.add_argument("--text-share", type=float, default=0.06, help="share of text-only samples in the mix")
    parser.add_argument("--shard-samples", type=int, default=4000, help="distinct samples written to the shards")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 = a worker's usual setting)")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Generates the benchmark data and prints one JSON line per setting, then a summary table."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0 <= args.text_share <= 1:
        parser.error(f"--text-share must be in [0, 1], got {args.text_share}")
    torch.set_num_threads(args.threads)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    print(json.dumps({"machine": machine, "args": vars(args)}), flush=True)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        demo = make_demo_data(os.path.join(tmp, "demo"), train=50, val=5)
        sources = write_mix(
            os.path.join(tmp, "mix"), args.shard_samples, args.text_share, load_tokenizer(demo.tokenizer)
        )
        for setting in ("before", "uint8", "grouped"):
            result = measure(setting, sources, demo.tokenizer, args)
            runs.append(result)
            print(json.dumps(result), flush=True)
    columns = ("setting", "padding_fraction", "samples_per_s", "bytes_per_sample", "pixel_bytes_per_image")
    print("\n| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for result in runs:
        print("| " + " | ".join(str(result[c]) for c in columns) + " |")


if __name__ == "__main__":
    main()
