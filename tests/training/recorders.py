"""Callbacks used by the end-to-end tests through ``--trainer.callbacks+=`` (loss recording, a hard kill) and the
reader of the recorded losses."""

from __future__ import annotations

import json
import os
import signal

import lightning.pytorch as pl


class RecordLosses(pl.Callback):
    """Append ``{"step", "loss"}`` (the returned training loss) of every optimizer step to a JSONL file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.is_global_zero and outputs is not None:
            with open(self.path, "a") as handle:
                handle.write(json.dumps({"step": trainer.global_step, "loss": float(outputs["loss"])}) + "\n")


def read_losses(folder: str | os.PathLike) -> dict[int, float]:
    """``{step: loss}`` from ``folder/losses.jsonl`` as written by :class:`RecordLosses` (or the FSDP2 worker)."""
    with open(os.path.join(folder, "losses.jsonl")) as handle:
        records = [json.loads(line) for line in handle.read().splitlines()]
    return {r["step"]: r["loss"] for r in records}


class KillAt(pl.Callback):
    """SIGKILL the process when the batch of optimizer step ``step + 1`` starts (step ``step`` is checkpointed)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
