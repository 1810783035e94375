"""``mole-train fit --ckpt_path last`` on the demo config: a run killed mid-epoch and resumed takes the same number
of steps and follows the loss curve of an uninterrupted run with the same seed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import demo_at
from tests.training.recorders import read_losses

ROOT = Path(__file__).parents[2]
MAX_STEPS = 8
KILL_AFTER = 3  # mid-epoch: 6 steps per epoch below, the run crosses into the second epoch after the resume


def run_demo(workdir: Path, *extra: str) -> subprocess.Popen:
    recorder = {"class_path": "tests.training.recorders.RecordLosses", "init_args": {"path": "losses.jsonl"}}
    command = [
        sys.executable,
        "-m",
        "mole_lightning",
        "fit",
        "--config",
        str(ROOT / "configs" / "demo.yaml"),
        f"--trainer.max_steps={MAX_STEPS}",
        "--trainer.limit_val_batches=0",
        "--trainer.enable_progress_bar=false",
        "--data.batch_size=4",
        "--data.samples_per_epoch=24",
        "--checkpoint.every_n_train_steps=1",
        f"--trainer.callbacks+={json.dumps(recorder)}",
        *extra,
    ]
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'src'}:{ROOT}", OMP_NUM_THREADS="1")
    log = open(workdir / "log.txt", "a")  # noqa: SIM115 (closed by finish())
    return subprocess.Popen(command, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)


def finish(process: subprocess.Popen, workdir: Path, expect: int = 0) -> None:
    code = process.wait(timeout=400)
    assert code == expect, (workdir / "log.txt").read_text()[-4000:]


@pytest.mark.slow
@pytest.mark.parametrize("data", [[]], ids=["consecutive"])  # grouped batches: tests/data (resume mid-epoch)
def test_killed_and_resumed_demo_run_matches_an_uninterrupted_run(demo, tmp_path, data):
    straight, killed = demo_at(demo, tmp_path / "straight"), demo_at(demo, tmp_path / "killed")

    reference = run_demo(straight, *data)
    kill = {"class_path": "tests.training.recorders.KillAt", "init_args": {"step": KILL_AFTER}}
    interrupted = run_demo(killed, *data, f"--trainer.callbacks+={json.dumps(kill)}")
    finish(interrupted, killed, expect=-signal.SIGKILL)
    assert sorted(read_losses(killed)) == list(range(1, KILL_AFTER + 1))
    assert (killed / "runs" / "demo" / "checkpoints" / "last.ckpt").exists()

    finish(run_demo(killed, *data, "--ckpt_path", "last"), killed)
    finish(reference, straight)

    expected, got = read_losses(straight), read_losses(killed)
    assert sorted(got) == sorted(expected) == list(range(1, MAX_STEPS + 1))
    for step, value in expected.items():
        assert got[step] == pytest.approx(value, rel=1e-5, abs=1e-6), (step, got, expected)
    final = torch.load(killed / "runs" / "demo" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert final["global_step"] == MAX_STEPS
