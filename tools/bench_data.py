"""Benchmark the training data pipeline: samples/s per worker with tokenization and 336 px image processing.

Two data sets are generated in a temporary folder: the demo shards (64 px images) and shards of JPEG-compressed
640×480 images with LLaVA-style conversations. For each, the full training pipeline (shard reading, mixing,
shuffling, JSON parsing, vicuna_v1 templating + tokenization with 576 image tokens, decode + ``pad`` + resize to
336 px + normalization, collation) runs in the main process (= one worker), and optionally with ``--workers N``.

Usage::

    python tools/bench_data.py [--samples 1500] [--workers 2] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import tempfile
import time

import numpy as np
import torch
from PIL import Image, ImageDraw

from mole_lightning.data import MixedInstructionDataModule
from mole_lightning.data.demo import make_demo_data
from mole_lightning.data.shards import ShardWriter


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


def write_photo_shards(out_dir: str, count: int, seed: int = 0) -> str:
    """Writes ``count`` LLaVA-style samples with 640×480 JPEGs; returns the brace spec."""
    rng = random.Random(seed)
    images = [photo_like_jpeg(rng) for _ in range(min(count, 200))]  # reuse encoded images to keep set-up quick
    question = "<image>\nWhat is in the image? Describe the colours and the shapes you can see."
    answer = "There are several round shapes in different colours on a smooth colourful background."
    with ShardWriter(out_dir, "photo", maxcount=500) as writer:
        for index in range(count):
            record = {
                "id": f"photo-{index}",
                "source": "photo",
                "conversations": [
                    {"from": "human", "value": question},
                    {"from": "gpt", "value": answer},
                    {"from": "human", "value": "Is there a circle?"},
                    {"from": "gpt", "value": "yes"},
                ],
            }
            writer.write({"__key__": f"{index:09d}", "jpg": images[index % len(images)], "json": record})
    return writer.brace_spec


def measure(sources: dict, tokenizer: str, samples: int, workers: int, batch_size: int) -> dict[str, float]:
    """Runs one training epoch of ``samples`` samples; returns samples/s overall and per worker."""
    datamodule = MixedInstructionDataModule(
        sources,
        tokenizer=tokenizer,
        template="vicuna_v1",
        num_image_tokens=576,
        image_size=336,
        image_aspect="pad",
        batch_size=batch_size,
        num_workers=workers,
        max_length=2048,
        shuffle_buffer=500,
        samples_per_epoch=samples,
    )
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    start = time.perf_counter()
    seen = 0
    first_batch_at = None
    for batch in loader:
        seen += batch["input_ids"].shape[0]
        if first_batch_at is None:
            first_batch_at = time.perf_counter()
    elapsed = time.perf_counter() - start
    rate = seen / elapsed
    return {
        "workers": workers,
        "samples": seen,
        "seconds": round(elapsed, 2),
        "samples_per_s": round(rate, 1),
        "samples_per_s_per_worker": round(rate / max(1, workers), 1),
    }


def main(argv: list[str] | None = None) -> None:
    """Generates the benchmark data and prints the measurements as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1500, help="samples per measurement")
    parser.add_argument("--workers", type=int, default=2, help="also measure with this many workers (0: skip)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 = a worker's usual setting)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs", "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        demo = make_demo_data(os.path.join(tmp, "demo"), train=max(200, args.samples // 3), val=10)
        photo_spec = write_photo_shards(os.path.join(tmp, "photo"), args.samples)
        datasets = {
            "demo shards (64 px images)": demo.sources("train"),
            "JPEG 640x480": {"photo": {"urls": photo_spec, "weight": 1.0}},
        }
        for name, sources in datasets.items():
            for workers in sorted({0, args.workers}):
                result = measure(sources, demo.tokenizer, args.samples, workers, args.batch_size)
                result["data"] = name
                results["runs"].append(result)
                print(json.dumps(result), flush=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
