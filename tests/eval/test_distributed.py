"""Metric sums synchronize over two CPU processes (gloo), including a source seen on one rank only, and lockstep
generation makes as many ``generate`` calls on every rank (``tests/workers/distributed_metrics.py``, run once for both
checks)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import run_ranks


@pytest.fixture(scope="module")
def ranks_out(tmp_path_factory, demo):
    """The folder where both ranks of the worker wrote their results."""
    out = tmp_path_factory.mktemp("distributed")
    run_ranks("distributed_metrics", ["--out", str(out), "--tokenizer", demo.tokenizer], out)
    return out


@pytest.mark.timeout(180)
def test_source_task_metrics_sync_across_ranks(ranks_out):
    results = [torch.load(ranks_out / f"rank{r}.pt") for r in range(2)]
    assert results[0] == results[1]
    out = results[0]
    # general: "blue" right on rank 0, "red" wrong on rank 1; med (rank 0 only): "yes" for a "no" question
    assert out["general/vqa/count"] == 2
    assert out["general/vqa/exact_match"] == pytest.approx(0.5)
    assert out["med/yesno/count"] == 1
    assert out["med/yesno/yes_ratio"] == 1.0 and out["med/yesno/accuracy"] == 0.0
    assert out["overall/score"] == pytest.approx((0.5 + 0.0) / 2)
    assert out["overall/count"] == 3


@pytest.mark.timeout(180)
def test_lockstep_generation_same_number_of_calls(ranks_out):
    out = [torch.load(ranks_out / f"lock{r}.pt") for r in range(2)]
    # source a: max(3, 1) = 3 calls, source b: max(0, 2) = 2 calls, on both ranks, all with synced_gpus
    assert out[0]["calls"] == out[1]["calls"] == [True] * 5
    results = out[0]["results"]
    assert results == out[1]["results"]
    assert results["a/count"] == 4 and results["b/count"] == 2  # filler calls are not scored
    assert results["overall/yesno/accuracy"] == 1.0
