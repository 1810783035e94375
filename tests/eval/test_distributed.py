"""Metric sums synchronize over two CPU processes (gloo), including a source seen on one rank only."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mole_lightning.eval.tasks import SourceTaskMetrics


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


def _batch(source: str, index: int) -> dict:
    ids = torch.tensor([[1, 50, 60]])
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": None,
        "has_image": None,
        "answers": [["yes"]],
        "task": ["yesno"],
        "question": ["q"],
        "id": [f"{source}{index}"],
        "source": [source],
    }


def _lockstep_worker(rank: int, port: int, out_dir: str, tokenizer_dir: str) -> None:
    import contextlib
    from types import SimpleNamespace

    from mole_lightning.data.samples import load_tokenizer
    from mole_lightning.eval import GenerationEvalCallback
    from tests.eval.conftest import ConstantAnswerModel

    class CountingModel(ConstantAnswerModel):
        calls: list = []

        def generate(self, pixel_values, input_ids, attention_mask=None, **kwargs):
            self.calls.append(kwargs.get("synced_gpus"))
            return super().generate(pixel_values, input_ids, attention_mask, **kwargs)

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        sizes = {0: {"a": 3, "b": 0}, 1: {"a": 1, "b": 2}}[rank]  # batches of one sample per rank and source
        loaders = {name: [_batch(name, i) for i in range(n)] for name, n in sizes.items()}
        model = CountingModel(load_tokenizer(tokenizer_dir), "Yes")
        trainer = SimpleNamespace(
            world_size=2,
            datamodule=SimpleNamespace(generation_dataloaders=lambda: loaders),
            precision_plugin=SimpleNamespace(predict_step_context=contextlib.nullcontext),
        )
        module = SimpleNamespace(model=model, device=torch.device("cpu"))
        callback = GenerationEvalCallback(max_samples_per_source=8, sync_generation=True, log_routing=False)
        results = callback.evaluate(trainer, module)
        torch.save({"calls": model.calls, "results": results}, os.path.join(out_dir, f"lock{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_lockstep_generation_same_number_of_calls(tmp_path, demo):
    mp.start_processes(
        _lockstep_worker, args=(_free_port(), str(tmp_path), demo.tokenizer), nprocs=2, start_method="fork"
    )
    out = [torch.load(tmp_path / f"lock{r}.pt") for r in range(2)]
    # source a: max(3, 1) = 3 calls, source b: max(0, 2) = 2 calls, on both ranks, all with synced_gpus
    assert out[0]["calls"] == out[1]["calls"] == [True] * 5
    results = out[0]["results"]
    assert results == out[1]["results"]
    assert results["a/count"] == 4 and results["b/count"] == 2  # filler calls are not scored
    assert results["overall/yesno/accuracy"] == 1.0
