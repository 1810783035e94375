"""``JsonlPredictionWriter`` under ``Trainer.predict`` on two CPU processes (DDP, gloo): each rank writes its own
file, rank 0 merges them and scores the merged file."""

from __future__ import annotations

import json
import os
import socket

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader

from mole_lightning.eval import JsonlPredictionWriter

# sample i: a yes/no question with reference "yes"; the model answers "yes" for even i, "no" for odd i
NUM_SAMPLES = 6


class AnswerModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def predict_step(self, batch: torch.Tensor, batch_idx: int, dataloader_idx: int = 0) -> list[dict]:
        return [
            {
                "id": f"s{i}",
                "source": "med",
                "question": f"Is sample {i} abnormal?",
                "answer": "yes",
                "prediction": "yes" if i % 2 == 0 else "no",
                "task": "yesno",
                "rank": self.global_rank,
            }
            for i in batch.tolist()
        ]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank)
    )
    os.environ.update(NODE_RANK="0", OMP_NUM_THREADS="1")
    try:
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=2,
            strategy="ddp",
            callbacks=[JsonlPredictionWriter(out_dir)],
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        loader = DataLoader(torch.arange(NUM_SAMPLES), batch_size=2, shuffle=False)
        trainer.predict(AnswerModule(), dataloaders=loader, return_predictions=False)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.timeout(180)
def test_two_ranks_write_own_files_and_rank0_merges(tmp_path):
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, start_method="fork")

    per_rank = [
        [json.loads(x) for x in (tmp_path / f"predictions.rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)
    ]
    # DistributedSampler without shuffling: rank 0 gets samples 0, 2, 4 and rank 1 samples 1, 3, 5
    assert [row["id"] for row in per_rank[0]] == ["s0", "s2", "s4"]
    assert [row["id"] for row in per_rank[1]] == ["s1", "s3", "s5"]
    assert {row["rank"] for row in per_rank[0]} == {0} and {row["rank"] for row in per_rank[1]} == {1}

    merged = [json.loads(x) for x in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert merged == per_rank[0] + per_rank[1]  # rank 0's lines, then rank 1's
    assert [row["score"] for row in merged] == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]

    metrics = json.loads((tmp_path / "metrics.json").read_text())  # of all 6 samples, not of rank 0's 3
    assert metrics["overall/count"] == NUM_SAMPLES
    assert metrics["med/yesno/accuracy"] == pytest.approx(3 / 6)
    assert metrics["med/yesno/yes_ratio"] == pytest.approx(3 / 6)
