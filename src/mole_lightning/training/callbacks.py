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

import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info

from mole_lightning.peft import expert_counts_per_sample


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that never leaves a partial file: write ``.<name>.tmp-<pid>``, fsync, rename.

    A process killed while saving leaves the previous checkpoint intact (plus, at worst, a stray temp file).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        """Save ``checkpoint`` to ``path`` atomically; remote URLs (``s3://``, ``gs://``...) go through fsspec
        (Lightning's own writer: object stores make a finished upload visible at once)."""
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
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
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def heatmap_figure(matrix: torch.Tensor, row_labels: list[str], title: str, col_prefix: str = "expert") -> Any:
    """A matplotlib figure of ``matrix`` (rows × experts) with the values written in the cells."""
    import matplotlib  # headless backend chosen at call time, before pyplot draws

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # only once a headless backend is chosen (matplotlib.use("Agg"))

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
    """MoLE routing during training, read from the routers' records of each step's forward (``mole_lightning.peft``).

    Every ``log_every_n_steps`` optimizer steps: the scalars ``routing/layer<LL>/expert<k>`` (share of each expert
    per layer) and ``routing_source/<source>/expert<k>`` (per source of the batch, over layers). Every
    ``every_n_steps`` steps on rank 0: TensorBoard heatmaps of the same (``routing/layer_expert_load``,
    ``routing/train_source_expert``). After each validation: the per-source heatmap of the logged
    ``val/<source>/expert<k>`` shares (``routing/val_source_expert``).

    Args:
        every_n_steps: Optimizer steps between training heatmaps (0 disables them).
        validation: Also draw the per-source heatmap after each validation.
        log_every_n_steps: Steps between routing scalars (``None``: the trainer's ``log_every_n_steps``; 0: never).
    """

    def __init__(self, every_n_steps: int = 100, validation: bool = True, log_every_n_steps: int | None = None) -> None:
        self.every_n_steps = every_n_steps
        self.validation = validation
        self.log_every_n_steps = log_every_n_steps

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step - 1  # the step this batch was trained in
        every = trainer.log_every_n_steps if self.log_every_n_steps is None else self.log_every_n_steps
        scalars = every > 0 and step % every == 0
        figures = self.every_n_steps > 0 and step % self.every_n_steps == 0 and trainer.is_global_zero
        counts = expert_counts_per_sample(pl_module.model.language_model) if scalars or figures else None
        if counts is None:  # (L, B, K)
            return
        layer_load = counts.sum(1)
        layer_load = (layer_load / layer_load.sum(-1, keepdim=True).clamp_min(1.0)).cpu()  # (L, K)
        sources = list(batch.get("source") or []) if isinstance(batch, dict) else []
        per_sample = counts.sum(0).cpu()  # (B, K)
        source_load = {}
        for source in sorted(set(sources)):
            total = per_sample[[i for i, s in enumerate(sources) if s == source]].sum(0)
            source_load[source] = total / total.sum().clamp_min(1.0)
        if scalars:
            metrics = {f"routing/layer{layer:02d}/expert{e}": v for layer, row in enumerate(layer_load.tolist())
                       for e, v in enumerate(row)}  # fmt: skip
            metrics |= {f"routing_source/{s}/expert{e}": v for s, row in source_load.items()
                        for e, v in enumerate(row.tolist())}  # fmt: skip
            pl_module.log_dict(metrics, on_step=True, batch_size=1)
        writer = _tensorboard(trainer) if figures else None
        if writer is not None:
            _add_figure(writer, "routing/layer_expert_load", layer_load, [f"layer {i}" for i in range(len(layer_load))],
                        f"expert load, step {step}", step)  # fmt: skip
            if source_load:
                matrix = torch.stack([source_load[s] for s in source_load])
                _add_figure(writer, "routing/train_source_expert", matrix, list(source_load),
                            f"routing per source, step {step}", step)  # fmt: skip

    def on_validation_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        if not self.validation or not trainer.is_global_zero or trainer.sanity_checking:
            return
        _, routing = logged_source_metrics(trainer.callback_metrics, "val")
        writer = _tensorboard(trainer)
        if routing and writer is not None:
            matrix = torch.stack([routing[n] for n in routing])
            _add_figure(writer, "routing/val_source_expert", matrix, list(routing), "validation routing per source",
                        trainer.global_step)  # fmt: skip


def _add_figure(writer: Any, tag: str, matrix: torch.Tensor, rows: list[str], title: str, step: int) -> None:
    import matplotlib.pyplot as plt  # only once a headless backend is chosen (matplotlib.use("Agg"))

    fig = heatmap_figure(matrix, rows, title)
    writer.add_figure(tag, fig, global_step=step)
    plt.close(fig)


def logged_source_metrics(metrics: dict[str, Any], prefix: str) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Per-source losses and expert shares among logged ``metrics`` (``<prefix>/<source>/loss``,
    ``<prefix>/<source>/expert<k>``): ``({source: loss}, {source: (K,) shares})``."""
    losses: dict[str, float] = {}
    shares: dict[str, dict[int, float]] = {}
    for key, value in metrics.items():
        parts = key.split("/")
        if len(parts) != 3 or parts[0] != prefix:
            continue
        if parts[2] == "loss":
            losses[parts[1]] = float(value)
        elif parts[2].startswith("expert") and parts[2][6:].isdigit():
            shares.setdefault(parts[1], {})[int(parts[2][6:])] = float(value)
    routing = {s: torch.tensor([v[k] for k in sorted(v)]) for s, v in sorted(shares.items())}
    return dict(sorted(losses.items())), routing


def source_table(val_losses: dict[str, float], val_routing: dict[str, torch.Tensor]) -> str:
    """Markdown table: one row per source with its validation loss, perplexity and expert shares."""
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
    """Print the last validation's per-source metrics (the logged ``val/<source>/...`` values) as a table when
    fitting ends (and after each validation).

    Args:
        every_validation: Also print after every validation, not only at the end.
        path: Optional file the final table is also written to (Markdown).
    """

    def __init__(self, every_validation: bool = False, path: str | None = None) -> None:
        self.every_validation = every_validation
        self.path = path
        self._last: str | None = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        if trainer.sanity_checking:
            return
        losses, routing = logged_source_metrics(trainer.callback_metrics, "val")
        self._last = source_table(losses, routing) if losses or routing else None
        if self.every_validation and self._last:
            rank_zero_info(f"\nvalidation at step {trainer.global_step}:\n{self._last}")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        if self._last is None or not trainer.is_global_zero:
            return
        print(f"\nper-source validation after {trainer.global_step} steps:\n{self._last}\n", flush=True)
        if self.path:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            Path(self.path).write_text(self._last + "\n")


class SkippedSamplesLogger(Callback):
    """Logs ``skipped/<kind>/<source>``: the bad samples and unreadable shards the DataModule skipped so far
    (its ``skipped_counts()``), every ``log_every_n_steps`` steps."""

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        counts = getattr(trainer.datamodule, "skipped_counts", None)
        if not callable(counts) or (trainer.global_step - 1) % max(1, trainer.log_every_n_steps) != 0:
            return
        values = {f"skipped/{kind}": float(count) for kind, count in counts().items()}
        if values:
            pl_module.log_dict(values, on_step=True, batch_size=1)


class LearningRateLogger(LearningRateMonitor):
    """Lightning's ``LearningRateMonitor`` (``lr-<Optimizer>/<group name>`` per step, groups named by role:
    ``adapters``, ``routers``, ``projector``...) that stays silent in runs without a logger instead of failing."""

    def __init__(self, logging_interval: str | None = "step", log_momentum: bool = False) -> None:
        super().__init__(logging_interval=logging_interval, log_momentum=log_momentum)

    def on_train_start(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.loggers:
            super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.loggers:
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.loggers:
            super().on_train_epoch_start(trainer, *args, **kwargs)


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
