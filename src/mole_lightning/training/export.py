"""Export a training checkpoint (or an earlier adapter export) for inference, in the formats of
:mod:`mole_lightning.models.export`: ``mole`` (default), ``peft`` or merged ``llava-hf``.

A ``mole`` export of a checkpoint also holds ``training_config.json`` (the run's hyper-parameters), so it loads
onto a base rebuilt from them (``mole-train predict --model.adapter_path``) as well as onto its llava-hf base::

    from mole_lightning.training.export import export_checkpoint
    export_checkpoint("checkpoints/demo/last.ckpt", "exports/demo")
    export_checkpoint("checkpoints/lora/last.ckpt", "exports/lora-hf", to="llava-hf", merge=True)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from mole_lightning.models import clean_parameter_name, load_adapters, load_llava_hf
from mole_lightning.models.export import check_destination, export_model
from mole_lightning.models.llava_mole import LlavaMoLE
from mole_lightning.models.loading import read_adapter_config
from mole_lightning.training.module import MoLELightningModule

TRAINING_CONFIG_NAME = "training_config.json"
DATA_CONFIG_NAME = "data_config.json"
"""The data settings a ``mole`` export carries from its run (:data:`DATA_SETTINGS`), to rebuild inputs as trained."""
DATA_SETTINGS = ("template", "system_prompt", "max_length", "image_aspect")
"""The DataModule settings that decide how a sample becomes model inputs (beyond the tower's geometry)."""


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A Lightning checkpoint file written by :class:`MoLELightningModule` (read with ``weights_only=True``)."""
    return torch.load(str(path), map_location="cpu", weights_only=True)


def module_from_checkpoint(path: str | os.PathLike) -> MoLELightningModule:
    """Rebuild the module of a checkpoint (architecture from its hyper-parameters) and load its trainable tensors.

    Raises:
        KeyError: when the checkpoint lacks trainable tensors of the rebuilt model.
    """
    checkpoint = read_checkpoint(path)
    module = MoLELightningModule.from_hparams(checkpoint["hyper_parameters"])
    module.configure_model()
    load_checkpoint_state(module, checkpoint)
    return module


def load_checkpoint_state(module: MoLELightningModule, checkpoint: dict[str, Any]) -> Any:
    """Load a checkpoint's trainable tensors into a configured module (wrapper components removed from the names).

    Returns:
        ``load_state_dict``'s result (its ``unexpected_keys`` name tensors the model lacks).

    Raises:
        KeyError: the checkpoint lacks trainable tensors of the module (``on_load_checkpoint``'s check).
        RuntimeError: a tensor's shape differs from the module's.
    """
    state = {clean_parameter_name(k): v for k, v in checkpoint["state_dict"].items()}
    module.on_load_checkpoint({"state_dict": state})
    return module.load_state_dict(state, strict=False)


def recorded_data_settings(path: str | os.PathLike) -> dict[str, Any]:
    """The :data:`DATA_SETTINGS` the run of a ``.ckpt`` file (its DataModule's saved hyper-parameters) or of a
    ``mole`` export folder (its ``data_config.json``) trained with; ``{}`` when none were recorded."""
    path = Path(path)
    if path.is_file():
        return checkpoint_data_settings(read_checkpoint(path))
    config_file = path / DATA_CONFIG_NAME
    recorded = json.loads(config_file.read_text()) if config_file.is_file() else {}
    return {key: recorded[key] for key in DATA_SETTINGS if key in recorded}


def checkpoint_data_settings(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The :data:`DATA_SETTINGS` of a checkpoint already read (its DataModule's saved hyper-parameters)."""
    recorded = checkpoint.get("datamodule_hyper_parameters") or {}
    return {key: recorded[key] for key in DATA_SETTINGS if key in recorded}


def load_trained_model(path: str | os.PathLike) -> tuple[LlavaMoLE, dict[str, Any] | None]:
    """The trained model of a ``.ckpt`` file or of a ``mole`` adapter export folder, with the run's
    hyper-parameters when known.

    An export folder loads onto its ``base_model_name_or_path`` (``load_llava_hf(base, adapter=folder)``), else
    onto the base rebuilt from its ``training_config.json``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: a folder that is no ``mole`` export (a peft folder, or neither a base nor a training config).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input {str(path)!r} does not exist")
    if path.is_file():
        hparams = read_checkpoint(path)["hyper_parameters"]
        return module_from_checkpoint(path).model, hparams
    meta = read_adapter_config(path)
    if meta.get("peft_type") is not None:
        raise ValueError(f"{str(path)!r} is a peft adapter folder; export from the checkpoint or a mole export")
    config_file = path / TRAINING_CONFIG_NAME
    hparams = json.loads(config_file.read_text()) if config_file.is_file() else None
    if meta.get("base_model_name_or_path"):
        return load_llava_hf(meta["base_model_name_or_path"], adapter=path), hparams
    if hparams is None:
        raise ValueError(f"{str(path)!r} names no base_model_name_or_path and holds no {TRAINING_CONFIG_NAME}")
    module = MoLELightningModule.from_hparams(hparams)
    module.configure_model()
    return load_adapters(module.model, path), hparams


def export_checkpoint(
    checkpoint_path: str | os.PathLike, output_dir: str | os.PathLike, *, to: str = "mole", **options: Any
) -> Path:
    """Export a ``.ckpt`` file (or a ``mole`` export folder) to ``output_dir``, atomically.

    Args:
        checkpoint_path: A ``.ckpt`` file written during training, or a ``mole`` adapter export folder.
        output_dir: Export directory (must be empty or absent unless ``overwrite=True``).
        to: ``"mole"``, ``"peft"`` or ``"llava-hf"``.
        **options: :func:`mole_lightning.models.export.export_model` options (``merge``, ``base``,
            ``write_base``, ``overwrite``, ``template``, ``system_prompt``); ``template`` and ``system_prompt``
            default to the run's data settings recorded in the checkpoint or export (:func:`recorded_data_settings`).

    Returns:
        The export directory.
    """
    check_destination(output_dir, overwrite=options.get("overwrite", False))  # fail before loading anything
    model, hparams = load_trained_model(checkpoint_path)
    recorded = recorded_data_settings(checkpoint_path)  # how the run rendered its conversations
    chat = {key: recorded[key] for key in ("template", "system_prompt") if key in recorded}
    options = {**chat, **{k: v for k, v in options.items() if v is not None}}
    extra = None
    if to == "mole":
        extra = {TRAINING_CONFIG_NAME: json.dumps(hparams, indent=2, default=str)} if hparams else {}
        extra = {**extra, DATA_CONFIG_NAME: json.dumps(recorded, indent=2)} if recorded else extra or None
    return export_model(model.eval(), output_dir, to=to, extra_files=extra, **options)
