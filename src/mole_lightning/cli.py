"""``mole-train``: LightningCLI for LLaVA-MoLE instruction tuning (``fit``, ``validate``, ``test``, ``predict``).

Usage::

    mole-train fit --config configs/demo.yaml
    mole-train fit --config configs/llava_mole_7b.yaml --trainer configs/trainer/fsdp_8gpu.yaml
    mole-train fit --config configs/demo.yaml --ckpt_path last          # resume
    mole-train fit --config configs/demo.yaml --print_config            # resolved config

The model (:class:`~mole_lightning.training.MoLELightningModule`) and the data
(:class:`~mole_lightning.data.MixedInstructionDataModule`) are linked: the tokenizer is set once under
``data.tokenizer``; the number of image tokens, image size and normalisation come from the model's vision tower.
Always present callbacks, configurable under their own keys: ``checkpoint`` (``ModelCheckpoint``),
``routing_heatmap`` (routing scalars and heatmaps), ``resumable_data``, ``throughput`` (tokens/s, FLOPs/s, MFU),
``lr_monitor`` (``LearningRateMonitor``) and ``skipped_samples``; more go in ``trainer.callbacks``.
Checkpoints are written atomically. ``validate``, ``test`` and ``predict`` of a checkpoint (``--ckpt_path``) rebuild
inputs as the run did: the data settings its DataModule recorded (template, system prompt, maximum length, image
aspect) replace the recipe's, unless given on the command line (``--data.template ...``).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import torch
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import ArgsType, LightningCLI

from mole_lightning.checkpoints import DATA_SETTINGS, checkpoint_data_settings, read_checkpoint
from mole_lightning.data import MixedInstructionDataModule
from mole_lightning.training.callbacks import (
    AtomicCheckpointIO,
    LearningRateLogger,
    ResumableTrainLoader,
    RoutingHeatmapCallback,
    SkippedSamplesLogger,
)
from mole_lightning.training.module import MoLELightningModule, link_model_and_data
from mole_lightning.training.strategies import default_strategy
from mole_lightning.training.throughput import TokenThroughputMonitor

log = logging.getLogger(__name__)
EVALUATING_SUBCOMMANDS = ("validate", "test", "predict")
"""Subcommands that rebuild inputs for a trained checkpoint (``fit`` resumes with its recipe's settings)."""


def _device_count(devices: Any, accelerator: Any) -> int:
    """Best-effort number of devices of a ``trainer.devices`` value (for the default strategy choice)."""
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, int):
        return devices
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        value = int(devices)
        if value >= 0:
            return value

    if accelerator in ("cpu",) or not torch.cuda.is_available():
        return 1
    return torch.cuda.device_count()


class MoLECLI(LightningCLI):
    """LightningCLI with model↔data links, forced callbacks and FSDP2 as the multi-device default."""

    def parse_arguments(self, parser: Any, args: ArgsType) -> None:
        """Parse as LightningCLI does, remembering the command line (to tell settings given on it apart)."""
        argv = sys.argv[1:] if args is None else args
        self.command_line = [a for a in argv if isinstance(a, str)] if isinstance(argv, (list, tuple)) else []
        super().parse_arguments(parser, args)

    def given_on_command_line(self, key: str) -> bool:
        """Whether ``--<key>`` (``--data.template`` or ``--data.template=...``) was given on the command line."""
        flag = f"--{key}"
        return any(arg == flag or arg.startswith(flag + "=") for arg in getattr(self, "command_line", []))

    def add_arguments_to_parser(self, parser: Any) -> None:
        """Links and forced callbacks."""
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(RoutingHeatmapCallback, "routing_heatmap")
        parser.add_lightning_class_args(ResumableTrainLoader, "resumable_data")
        parser.add_lightning_class_args(TokenThroughputMonitor, "throughput")
        parser.add_lightning_class_args(LearningRateLogger, "lr_monitor")
        parser.add_lightning_class_args(SkippedSamplesLogger, "skipped_samples")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 0})
        link_model_and_data(parser)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The Trainer, with :class:`AtomicCheckpointIO` unless the config names a ``CheckpointIO`` plugin itself.

        Added here rather than as a ``trainer_defaults`` instance, which the config printer cannot write: a config
        printed with ``--print_config`` or saved beside a run then reads back as it is."""
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        plugins = config.get("trainer", {}).get("plugins")
        plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
            plugins.append(AtomicCheckpointIO())
        kwargs.setdefault("plugins", plugins)
        return super().instantiate_trainer(**kwargs)

    def before_instantiate_classes(self) -> None:
        """Take the data settings of the checkpoint being evaluated; use FSDP2 (:class:`MoLEModelParallelStrategy`)
        when several devices are asked for with strategy auto."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        if self.subcommand in EVALUATING_SUBCOMMANDS:
            self.apply_recorded_data_settings(config)
        trainer = config.get("trainer")
        if trainer is None or trainer.get("strategy", "auto") != "auto":
            return
        accelerator = trainer.get("accelerator", "auto")
        if _device_count(trainer.get("devices", "auto"), accelerator) * int(trainer.get("num_nodes", 1) or 1) > 1:
            trainer["strategy"] = default_strategy(2, accelerator)

    def apply_recorded_data_settings(self, config: Any) -> None:
        """Replace ``config``'s data settings by those recorded in its ``ckpt_path`` file (see the module docstring).

        A checkpoint that cannot be read here is left for the Trainer to load and report."""
        path, data = config.get("ckpt_path"), config.get("data")
        if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path) or data is None:
            return
        try:
            recorded = checkpoint_data_settings(read_checkpoint(path))
        except Exception:  # noqa: BLE001 - not readable with weights_only: the Trainer's own load reports it
            return
        for key in DATA_SETTINGS:
            if key not in recorded or self.given_on_command_line(f"data.{key}") or data.get(key) == recorded[key]:
                continue
            log.warning("data.%s: %r, as recorded by the checkpoint's run (not %r)", key, recorded[key], data.get(key))
            data[key] = recorded[key]


def cli_main(args: ArgsType = None, run: bool = True) -> MoLECLI:
    """Entry point of ``mole-train`` / ``python -m mole_lightning``.

    Args:
        args: Command-line arguments (``None``: ``sys.argv``), a list or a dict.
        run: Run the subcommand; ``False`` only parses and instantiates (tests).
    """
    return MoLECLI(
        MoLELightningModule,
        MixedInstructionDataModule,
        args=args,
        run=run,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
        parser_kwargs={"fit": {"default_env": False}},
    )


def main(args: ArgsType = None) -> int:
    """Console-script entry point: runs :func:`cli_main` and returns the process exit status (0 on success).

    Errors propagate as exceptions (non-zero status with the traceback's last line naming the problem).
    """
    cli_main(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
