"""``JsonlPredictionWriter`` under ``Trainer.predict`` on two CPU processes (DDP, gloo; the ranks run
``tests/workers/writer_ranks.py``): each rank writes its own file, rank 0 merges them and scores the merged file."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_ranks
from tests.workers.writer_ranks import NUM_SAMPLES


@pytest.mark.timeout(180)
def test_two_ranks_write_own_files_and_rank0_merges(tmp_path):
    run_ranks("writer_ranks", ["--out", str(tmp_path)], tmp_path / "logs")

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
