"""FSDP2 worker: trains the tiny model on fixed synthetic batches on 1 or N CPU ranks (gloo).

Started once per rank by ``tests.conftest.start_ranks`` (``--devices`` = the number of ranks; with one rank, no
process group)::

    start_ranks("fsdp2", ["--devices", "2", "--out", DIR, "--max-steps", "3"], logs)
    # [--ckpt-path DIR/ckpt/last.ckpt] [--source-routing-coef C]

Writes ``DIR/losses.jsonl`` (one ``{"step", "loss"}`` per optimizer step, the loss averaged over ranks) and
checkpoints under ``DIR/ckpt``. Every sample has the same length and no padding, so the mean of the per-rank mean
losses equals the loss of one process on the union of the ranks' samples. With ``--source-routing-coef`` every
sample's source (``synthetic``) is supervised toward expert 1; that term is a mean over samples too, so the same holds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, Dataset, DistributedSampler

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from mole_lightning.constants import IGNORE_INDEX  # noqa: E402
from mole_lightning.peft import MoLEConfig  # noqa: E402
from mole_lightning.training import AtomicCheckpointIO, ModelSpec, MoLELightningModule  # noqa: E402
from mole_lightning.training.strategies import MoLEModelParallelStrategy  # noqa: E402

GLOBAL_BATCH = 8
STEPS_PER_EPOCH = 3
TEXT_TOKENS = 24


class SyntheticSamples(Dataset):
    """``GLOBAL_BATCH * STEPS_PER_EPOCH`` fixed samples: BOS, 16 image placeholders, random text; one image each."""

    def __init__(self, image_token_id: int, vocab: int, num_image_tokens: int) -> None:
        generator = torch.Generator().manual_seed(0)
        count = GLOBAL_BATCH * STEPS_PER_EPOCH
        text = torch.randint(5, vocab - 1, (count, TEXT_TOKENS), generator=generator)
        image = torch.full((count, num_image_tokens), image_token_id)
        bos = torch.ones(count, 1, dtype=torch.long)
        self.input_ids = torch.cat([bos, image, text], dim=1)
        self.labels = self.input_ids.clone()
        self.labels[:, : 1 + num_image_tokens] = IGNORE_INDEX
        self.pixels = torch.randn(count, 3, 32, 32, generator=generator)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.input_ids[index], "labels": self.labels[index], "pixel_values": self.pixels[index]}


def collate(samples: list[dict]) -> dict:
    input_ids = torch.stack([s["input_ids"] for s in samples])
    return {
        "input_ids": input_ids,
        "labels": torch.stack([s["labels"] for s in samples]),
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": torch.stack([s["pixel_values"] for s in samples]),
        "has_image": torch.ones(len(samples), dtype=torch.bool),
        "source": ["synthetic"] * len(samples),
    }


class RecordLoss(pl.Callback):
    """Append the rank-averaged training loss of every step to ``losses.jsonl`` (rank 0)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"].detach().float().clone()
        if trainer.world_size > 1:
            torch.distributed.all_reduce(loss)
            loss /= trainer.world_size
        if trainer.is_global_zero:
            with open(self.path, "a") as handle:
                handle.write(json.dumps({"step": trainer.global_step, "loss": float(loss)}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-steps", type=int, required=True)
    parser.add_argument("--ckpt-path", default=None)
    parser.add_argument("--source-routing-coef", type=float, default=0.0)
    args = parser.parse_args()
    torch.set_num_threads(1)

    module = MoLELightningModule(
        architecture=ModelSpec(preset="tiny"),
        mole=MoLEConfig(  # no balance loss: a per-rank term
            num_experts=3,
            rank=4,
            alpha=8.0,
            dropout=0.0,
            balance_coef=0.0,
            source_routing_coef=args.source_routing_coef,
            source_expert_map={"synthetic": 1} if args.source_routing_coef else None,
        ),
        optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3),
    )
    if args.devices == 1 and args.ckpt_path is None:  # the trainable tensors at init, for the test's movement check
        module.configure_model()
        initial = {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}
        torch.save(initial, os.path.join(args.out, "init.pt"))
    from mole_lightning.models import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    dataset = SyntheticSamples(tokenizer.convert_tokens_to_ids("<image>"), len(tokenizer), module.num_image_tokens)
    strategy = MoLEModelParallelStrategy(process_group_backend="gloo") if args.devices > 1 else "auto"
    # rank r trains on samples r, r + N, ... of each global batch: the union is the single-process batch
    rank = int(os.environ.get("LOCAL_RANK", 0))
    sampler = DistributedSampler(dataset, num_replicas=args.devices, rank=rank, shuffle=False)
    loader = DataLoader(dataset, batch_size=GLOBAL_BATCH // args.devices, sampler=sampler, collate_fn=collate)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=strategy,
        max_steps=args.max_steps,
        use_distributed_sampler=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        plugins=[AtomicCheckpointIO()],
        callbacks=[
            RecordLoss(os.path.join(args.out, "losses.jsonl")),
            ModelCheckpoint(
                dirpath=os.path.join(args.out, "ckpt"), save_last=True, every_n_train_steps=STEPS_PER_EPOCH
            ),
        ],
    )
    trainer.fit(module, train_dataloaders=loader, ckpt_path=args.ckpt_path)
    if trainer.is_global_zero:
        sharded = [n for n, p in module.named_parameters() if hasattr(p, "device_mesh")]
        with open(os.path.join(args.out, "info.json"), "w") as handle:
            json.dump({"world_size": trainer.world_size, "sharded_parameters": len(sharded)}, handle)


if __name__ == "__main__":
    main()
