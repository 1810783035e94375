"""FSDP2 (ModelParallelStrategy + fully_shard) on 2 CPU processes with gloo: train, save, resume, and compare
the loss curve with a single-process run on the same global batches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import Ranks, start_ranks
from tests.training.recorders import read_losses


def launch(
    out: Path, devices: int, max_steps: int, ckpt_path: Path | None = None, extra: tuple[str, ...] = ()
) -> Ranks:
    """``tests/workers/fsdp2.py`` on ``devices`` ranks, writing to ``out`` (logs in ``out/log-<max_steps>/``)."""
    out.mkdir(parents=True, exist_ok=True)
    args = ["--devices", str(devices), "--out", str(out), "--max-steps", str(max_steps), *extra]
    if ckpt_path is not None:
        args += ["--ckpt-path", str(ckpt_path)]
    return start_ranks("fsdp2", args, out / f"log-{max_steps}", world_size=devices)


@pytest.mark.slow
def test_fsdp2_on_two_cpu_processes_matches_single_process_across_save_and_resume(tmp_path):
    single, sharded = tmp_path / "single", tmp_path / "fsdp2"
    reference = launch(single, devices=1, max_steps=6)
    launch(sharded, devices=2, max_steps=3).wait()
    assert read_losses(sharded).keys() == {1, 2, 3}
    launch(sharded, devices=2, max_steps=6, ckpt_path=sharded / "ckpt" / "last.ckpt").wait()
    reference.wait()

    info = json.loads((sharded / "info.json").read_text())
    assert info["world_size"] == 2 and info["sharded_parameters"] > 0

    expected, got = read_losses(single), read_losses(sharded)
    assert sorted(got) == sorted(expected) == [1, 2, 3, 4, 5, 6]  # same step count after the resume
    for step in expected:
        # no balance loss (it is computed per rank): the same mean loss, up to float summation order
        assert got[step] == pytest.approx(expected[step], rel=1e-5), step
    assert expected[6] != expected[1]  # the model did train

    # the FSDP2 checkpoint holds the same full (gathered) trainable tensors as the single-process one, after 6 Adam
    # steps of lr 3e-3 that moved every tensor (a tensor left at its init would differ by about 6 x lr = 0.018)
    a = torch.load(sharded / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    b = torch.load(single / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    init = torch.load(single / "init.pt", map_location="cpu", weights_only=True)
    assert a.keys() == b.keys() == {f"model.{k}" for k in init}
    for key in b:
        assert a[key].shape == b[key].shape, key
        moved = (b[key].float() - init[key.removeprefix("model.")].float()).abs().max()
        assert moved > 1e-3, key
        torch.testing.assert_close(a[key].float(), b[key].float(), rtol=1e-4, atol=1e-5, msg=key)
