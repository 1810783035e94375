"""FSDP2 bf16 training steps through Lightning on one CUDA GPU (``tests/workers/gpu_fsdp.py``), beside FSDP1 and a
plain single-device run on the same fixed batches. Marked ``gpu``: deselected by default and skipped without CUDA
(run with ``pytest -m gpu tests/training/test_gpu_fsdp.py``)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

STEPS = 4


@pytest.mark.gpu
@pytest.mark.slow
def test_fsdp2_fsdp1_and_single_device_train_the_same_batches_on_a_gpu(tmp_path: Path):
    out = tmp_path / "results.json"
    command = [sys.executable, str(ROOT / "tests" / "workers" / "gpu_fsdp.py"), "--steps", str(STEPS)]
    command += ["--batch", "4", "--seq", "256", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    runs = {run["strategy"]: run for run in json.loads(out.read_text())["runs"]}
    assert set(runs) == {"fsdp2", "fsdp1", "single"}
    for name, run in runs.items():
        assert len(run["losses"]) == STEPS and all(math.isfinite(x) for x in run["losses"]), name
        assert run["checkpoint_only_trainable"], name  # the checkpoint holds the trainable tensors only
    assert runs["fsdp2"]["sharded_parameters"] > 0 and runs["single"]["sharded_parameters"] == 0
    # same initial weights (one seed) and the same first batch: before any step the three runs differ only by bf16
    # rounding (8 significand bits, relative error 2^-8 per operation), far below the loss's own size
    first = [run["losses"][0] for run in runs.values()]
    assert max(first) - min(first) < 2**-4 * min(first), first
