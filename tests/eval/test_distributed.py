"""Metric sums synchronize over two CPU processes (gloo), including a source seen on one rank only."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mole_lightning.eval.metrics import SourceTaskMetrics


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        metrics = SourceTaskMetrics(sources=["general", "med"])
        if rank == 0:
            metrics.update(["general", "med"], ["vqa", "yesno"], ["blue", "yes"], [["blue"], ["no"]])
        else:
            metrics.update(["general"], ["vqa"], ["red"], [["blue"]])
        torch.save(metrics.compute(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_source_task_metrics_sync_across_ranks(tmp_path):
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, start_method="fork")
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert results[0] == results[1]
    out = results[0]
    # general: "blue" right on rank 0, "red" wrong on rank 1; med (rank 0 only): "yes" for a "no" question
    assert out["general/vqa/count"] == 2
    assert out["general/vqa/exact_match"] == pytest.approx(0.5)
    assert out["med/yesno/count"] == 1
    assert out["med/yesno/yes_ratio"] == 1.0 and out["med/yesno/accuracy"] == 0.0
    assert out["overall/score"] == pytest.approx((0.5 + 0.0) / 2)
    assert out["overall/count"] == 3
