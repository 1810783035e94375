"""GPU check (``pytest -m gpu tests/training/test_gpu_fsdp.py`` on a CUDA machine, never by CI): a few FSDP2 bf16
training steps through Lightning. Also a script, for the numbers in docs/benchmarks.md::

    PYTHONPATH=src python tests/workers/gpu_fsdp.py --out results.json

Model: Llama d=512, 8 layers + tiny CLIP + mlp2x_gelu, MoLE K=3 r=8 on every MLP, LoRA on attention. Runs the same
fixed batches with (a) ``MoLEModelParallelStrategy`` (FSDP2 ``fully_shard`` per router/layer/tower, bf16-true weights,
fp32 reduce) on one GPU, (b) ``MoLEFSDPStrategy`` (FSDP1 by class names, activation checkpointing of decoder
layers, bf16-mixed) and (c) a plain single-device bf16-mixed run, and reports per-step losses, median step time
and peak memory of each, plus the checkpoint's keys (trainable tensors only).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src"))

from mole_lightning.models import trainable_names  # noqa: E402
from mole_lightning.peft import MoLEConfig  # noqa: E402
from mole_lightning.training import AtomicCheckpointIO, ModelSpec, MoLELightningModule  # noqa: E402
from mole_lightning.training.strategies import MoLEFSDPStrategy, MoLEModelParallelStrategy  # noqa: E402

LLM = dict(
    vocab_size=8000,
    hidden_size=512,
    intermediate_size=1408,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=8,
    max_position_embeddings=1024,
    tie_word_embeddings=False,
)


def batches(count: int, size: int, seq: int) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        text = torch.randint(10, 250, (size, seq - 17), generator=generator)
        ids = torch.cat([torch.ones(size, 1, dtype=torch.long), torch.full((size, 16), 260), text], dim=1)
        labels = ids.clone()
        labels[:, :17] = -100
        out.append(
            {
                "input_ids": ids,
                "labels": labels,
                "attention_mask": torch.ones_like(ids),
                "pixel_values": torch.randn(size, 3, 32, 32, generator=generator),
                "has_image": torch.ones(size, dtype=torch.bool),
                "source": ["synthetic"] * size,
            }
        )
    return out


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Timer(pl.Callback):
    def __init__(self) -> None:
        self.times, self.losses, self._start = [], [], 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        synchronize()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        synchronize()
        self.times.append(time.perf_counter() - self._start)
        self.losses.append(float(outputs["loss"]))


def run(strategy_name: str, data: list[dict], workdir: str, accelerator: str) -> dict:
    module = MoLELightningModule(
        architecture=ModelSpec(preset="tiny", llm_config=dict(LLM)),
        mole=MoLEConfig(num_experts=3, rank=8, alpha=16.0, balance_coef=0.01),
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3),
    )
    if strategy_name == "fsdp2":
        backend = "gloo" if accelerator == "cpu" else None
        strategy = MoLEModelParallelStrategy(reduce_dtype="float32", process_group_backend=backend)
        precision = "bf16-true"
    elif strategy_name == "fsdp1":  # needs an accelerator: FSDP1 refuses CPU
        strategy = MoLEFSDPStrategy(checkpoint_class_names=["LlamaDecoderLayer"])
        precision = "bf16-mixed"
    else:
        strategy, precision = "auto", "bf16-mixed"
    timer = Timer()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=1,
        strategy=strategy,
        precision=precision,
        max_steps=len(data),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        plugins=[AtomicCheckpointIO()],
        callbacks=[timer, ModelCheckpoint(dirpath=os.path.join(workdir, strategy_name), save_last=True)],
    )
    trainer.fit(module, train_dataloaders=DataLoader(data, batch_size=None))
    checkpoint = torch.load(os.path.join(workdir, strategy_name, "last.ckpt"), map_location="cpu", weights_only=True)
    trainable = set(trainable_names(module))
    return {
        "strategy": strategy_name,
        "precision": precision,
        "losses": timer.losses,
        "median_step_s": statistics.median(timer.times[2:] or timer.times),
        "peak_memory_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        "checkpoint_tensors": len(checkpoint["state_dict"]),
        "checkpoint_only_trainable": set(checkpoint["state_dict"]) == trainable,
        "checkpoint_mib": sum(t.numel() * t.element_size() for t in checkpoint["state_dict"].values()) / 2**20,
        "sharded_parameters": sum(1 for _, p in module.named_parameters() if hasattr(p, "device_mesh")),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--out", default=None)
    parser.add_argument("--accelerator", default="gpu", help="cpu: dry run of the script")
    parser.add_argument("--runs", default="fsdp2,fsdp1,single", help="fsdp2, fsdp1 (GPU only), single")
    args = parser.parse_args()
    data = batches(args.steps, args.batch, args.seq)
    with tempfile.TemporaryDirectory() as workdir:
        results = {
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__,
            "runs": [run(name, data, workdir, args.accelerator) for name in args.runs.split(",")],
        }
    print(json.dumps(results, indent=1))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
