"""One rank of the metric-synchronization checks (two ranks started by ``tests/eval/test_distributed.py``, gloo).

``--out DIR``: writes ``DIR/rank<r>.pt`` (``SourceTaskMetrics.compute()`` after uneven per-rank updates, a source
seen on rank 0 only) and ``DIR/lock<r>.pt`` (the ``synced_gpus`` flags of every ``generate`` call and the results of
``GenerationEvalCallback.evaluate`` with lockstep generation, ranks holding different numbers of batches).
``--tokenizer``: the demo tokenizer folder.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mole_lightning.data.samples import load_tokenizer  # noqa: E402
from mole_lightning.eval import GenerationEvalCallback  # noqa: E402
from mole_lightning.eval.tasks import SourceTaskMetrics  # noqa: E402
from tests.eval.conftest import ConstantAnswerModel  # noqa: E402
from tests.workers import end_process_group  # noqa: E402


def metrics_sync(rank: int, out_dir: str) -> None:
    metrics = SourceTaskMetrics(sources=["general", "med"])
    if rank == 0:
        metrics.update(["general", "med"], ["vqa", "yesno"], ["blue", "yes"], [["blue"], ["no"]])
    else:
        metrics.update(["general"], ["vqa"], ["red"], [["blue"]])
    torch.save(metrics.compute(), os.path.join(out_dir, f"rank{rank}.pt"))


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


class CountingModel(ConstantAnswerModel):
    """Records the ``synced_gpus`` flag of every ``generate`` call."""

    def __init__(self, tokenizer, answer: str) -> None:
        super().__init__(tokenizer, answer)
        self.calls: list = []

    def generate(self, pixel_values, input_ids, attention_mask=None, **kwargs):
        self.calls.append(kwargs.get("synced_gpus"))
        return super().generate(pixel_values, input_ids, attention_mask, **kwargs)


def lockstep(rank: int, out_dir: str, tokenizer_dir: str) -> None:
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokenizer", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    metrics_sync(rank, args.out)
    lockstep(rank, args.out, args.tokenizer)
    end_process_group()


if __name__ == "__main__":
    main()
