"""Training callbacks and checkpoint I/O: routing heatmaps, per-source summary table, resumable training data,
atomic checkpoint files.

- :class:`RoutingHeatmapCallback`: TensorBoard images of the per-layer × per-expert load (training, every N steps)
  and of the per-source × per-expert routing (validation).
- :class:`SourceMetricsTable`: prints a per-source table (validation loss, perplexity, expert shares) at fit end.
- :class:`ResumableTrainLoader`: makes the training stream resumable mid-epoch (same epoch seed, already
  trained batches skipped), so a resumed run sees the batches an uninterrupted run would have seen.
- :class:`AtomicCheckpointIO`: writes each checkpoint to a temporary file and renames it into place.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that never leaves a partial file: write ``.<name>.tmp-<pid>``, fsync, rename.

    A process killed while saving leaves the previous checkpoint intact (plus, at worst, a stray temp file).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        """Save ``checkpoint`` to ``path`` atomically (local file systems)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            super().save_checkpoint(checkpoint, tmp, storage_options)
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()


def _tensorboard(trainer: pl.Trainer) -> Any:
    """The TensorBoard ``SummaryWriter`` of the trainer's loggers, or ``None``."""
    from lightning.pytorch.loggers import TensorBoardLogger

    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def heatmap_figure(matrix: torch.Tensor, row_labels: list[str], title: str, col_prefix: str = "expert") -> Any:
    """A matplotlib figure of ``matrix`` (rows × experts) with the values written in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = matrix.float().numpy()
    rows, cols = data.shape
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * cols, 0.8 + 0.32 * rows))
    image = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(1e-6, float(data.max())))
    ax.set_xticks(range(cols), [f"{col_prefix} {c}" for c in range(cols)])
    ax.set_yticks(range(rows), row_labels)
    if rows * cols <= 400:
        for r in range(rows):
            for c in range(cols):
                ax.text(c, r, f"{data[r, c]:.2f}", ha="center", va="center", color="w", fontsize=7)
    ax.set_title(title)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return fig


class RoutingHeatmapCallback(Callback):
    """TensorBoard heatmaps of MoLE routing.

    Training: the share of each expert per layer (rows: layers, columns: experts) every ``every_n_steps`` optimizer
    steps, and the per-source × per-expert shares of the same batch. Validation: per-source × per-expert shares over
    the whole validation set.

    Args:
        every_n_steps: Optimizer steps between training heatmaps (0 disables them).
        validation: Also log the per-source heatmap after each validation.
    """

    def __init__(self, every_n_steps: int = 100, validation: bool = True) -> None:
        self.every_n_steps = every_n_steps
        self.validation = validation
        self._rendered_step: int | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.every_n_steps > 0 and trainer.global_step % self.every_n_steps == 0:
            pl_module.routing_snapshot_requested = True

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = getattr(pl_module, "last_routing_step", None)
        if not trainer.is_global_zero or step is None or step == self._rendered_step:
            return
        if self.every_n_steps <= 0 or step % self.every_n_steps != 0:
            return
        writer = _tensorboard(trainer)
        load = pl_module.last_expert_load
        if writer is None or load is None:
            return
        import matplotlib.pyplot as plt

        self._rendered_step = step
        fig = heatmap_figure(load, [f"layer {i}" for i in range(load.shape[0])], f"expert load, step {step}")
        writer.add_figure("routing/layer_expert_load", fig, global_step=step)
        plt.close(fig)
        sources = pl_module.last_source_routing
        if sources:
            matrix = torch.stack([sources[s] for s in sorted(sources)])
            fig = heatmap_figure(matrix, sorted(sources), f"routing per source, step {step}")
            writer.add_figure("routing/train_source_expert", fig, global_step=step)
            plt.close(fig)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        routing = getattr(pl_module, "val_routing", None)
        if not self.validation or not routing or not trainer.is_global_zero or trainer.sanity_checking:
            return
        writer = _tensorboard(trainer)
        if writer is None:
            return
        import matplotlib.pyplot as plt

        names = list(routing)
        fig = heatmap_figure(torch.stack([routing[n] for n in names]), names, "validation routing per source")
        writer.add_figure("routing/val_source_expert", fig, global_step=trainer.global_step)
        plt.close(fig)


def source_table(val_losses: dict[str, float], val_routing: dict[str, torch.Tensor]) -> str:
    """Markdown table: one row per source with its validation loss, perplexity and expert shares."""
    import math

    sources = sorted(set(val_losses) | set(val_routing))
    num_experts = max((len(v) for v in val_routing.values()), default=0)
    header = ["source", "val loss", "val ppl"] + [f"expert {k}" for k in range(num_experts)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for source in sources:
        loss = val_losses.get(source)
        cells = [source, f"{loss:.3f}" if loss is not None else "-"]
        cells.append(f"{math.exp(min(loss, 50.0)):.2f}" if loss is not None else "-")
        shares = val_routing.get(source)
        cells += [f"{float(v):.2f}" for v in shares] if shares is not None else ["-"] * num_experts
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


class SourceMetricsTable(Callback):
    """Print the last validation's per-source metrics as a table when fitting ends (and after each validation).

    Args:
        every_validation: Also print after every validation, not only at the end.
        path: Optional file the final table is also written to (Markdown).
    """

    def __init__(self, every_validation: bool = False, path: str | None = None) -> None:
        self.every_validation = every_validation
        self.path = path

    def _table(self, pl_module: Any) -> str | None:
        losses = getattr(pl_module, "val_losses", {}) or {}
        routing = getattr(pl_module, "val_routing", {}) or {}
        return source_table(losses, routing) if losses or routing else None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        if self.every_validation and not trainer.sanity_checking:
            table = self._table(pl_module)
            if table:
                rank_zero_info(f"\nvalidation at step {trainer.global_step}:\n{table}")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        table = self._table(pl_module)
        if table is None or not trainer.is_global_zero:
            return
        print(f"\nper-source validation after {trainer.global_step} steps:\n{table}\n", flush=True)
        if self.path:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            Path(self.path).write_text(table + "\n")


class _ResumableLoader:
    """Iterable around a training loader with ``state_dict``/``load_state_dict`` (Lightning's ``_Stateful``)."""

    def __init__(self, loader: Any, trainer: pl.Trainer) -> None:
        self.loader = loader
        self.trainer = trainer
        self._restore: dict[str, int] | None = None
        self._epoch_value: int | None = None

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["loader"], name)

    def __iter__(self) -> Iterator[Any]:
        dataset = getattr(self.loader, "dataset", None)
        skip = 0
        restore, self._restore = self._restore, None
        if restore is not None:
            epoch_value = int(restore.get("dataset_epoch", 0))
            skip = int(restore.get("batches", 0))
            if skip >= len(self.loader):  # saved at the end of an epoch: continue with the next one
                skip = 0
            else:
                epoch_value -= 1  # the loader bumps the epoch before iterating
            if dataset is not None and hasattr(dataset, "epoch"):
                dataset.epoch = epoch_value
        for index, batch in enumerate(self.loader):
            if index == 0 and dataset is not None:
                self._epoch_value = getattr(dataset, "epoch", None)
            if index < skip:
                continue
            yield batch

    def state_dict(self) -> dict[str, int]:
        progress = self.trainer.fit_loop.epoch_loop.batch_progress.current
        dataset = getattr(self.loader, "dataset", None)
        epoch_value = self._epoch_value if self._epoch_value is not None else getattr(dataset, "epoch", 0)
        return {"dataset_epoch": int(epoch_value or 0), "batches": int(progress.processed)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._restore = dict(state)


class ResumableTrainLoader(Callback):
    """Make the DataModule's training loader resumable: ``fit --ckpt_path`` continues the same data stream.

    The training streams are seeded by their epoch counter, which a fresh process would restart at the first epoch.
    This callback wraps ``datamodule.train_dataloader()`` in a loader whose state (the dataset's epoch counter and
    the batches already trained in this epoch) is saved in every checkpoint; on resume the epoch counter is restored
    and the trained batches are read again and skipped (data loading only, no model compute). Dropout masks are
    not restored, so runs with dropout match in distribution, not bit for bit.

    Args:
        enabled: Switch the wrapping off (resumed runs then restart the epoch's stream).
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled

    def setup(self, trainer: pl.Trainer, pl_module: Any, stage: str) -> None:
        datamodule = trainer.datamodule
        if not self.enabled or stage != "fit" or datamodule is None or getattr(datamodule, "_resumable", False):
            return
        make_loader = datamodule.train_dataloader

        def resumable_train_dataloader() -> _ResumableLoader:
            return _ResumableLoader(make_loader(), trainer)

        datamodule.train_dataloader = resumable_train_dataloader
        datamodule._resumable = True
