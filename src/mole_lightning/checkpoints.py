"""Trained state on disk: reading a training checkpoint, the run's recorded settings, and loading a trained model.

Everything that turns a ``.ckpt`` file written by :class:`~mole_lightning.training.MoLELightningModule` (or a
``mole`` adapter export folder) back into a model goes through here: ``mole-chat`` and the lmms-eval model (via
:mod:`mole_lightning.inference`), ``mole-export`` (:func:`export_checkpoint`) and ``mole-routing-report``.

- :func:`read_checkpoint`: the file, read with ``torch.load(weights_only=True)`` unless ``trust=True`` (full
  unpickling, for files whose hyper-parameters hold Python objects); one-line :class:`CheckpointError` otherwise.
- :func:`checkpoint_data_settings` / :func:`recorded_data_settings`: the :data:`DATA_SETTINGS` the run trained
  with (a checkpoint's DataModule hyper-parameters, or an export's :data:`DATA_CONFIG_NAME`);
  :func:`read_training_config`: an export's :data:`TRAINING_CONFIG_NAME`.
- :func:`checkpoint_state` / :func:`load_checkpoint_state`: a checkpoint's trainable tensors (``model.<parameter>``
  entries, wrapper name components removed, :mod:`mole_lightning.models.trainable`) loaded into a module or model.
- :func:`module_from_checkpoint`, :func:`load_trained`: the module / model of a checkpoint or export;
  :func:`load_export`: an export onto a model, with one-line errors.
- :func:`export_checkpoint`: a checkpoint (or export) written in another format
  (:func:`~mole_lightning.models.export.export_model`)::

    from mole_lightning.checkpoints import export_checkpoint, load_trained
    model, hparams = load_trained("checkpoints/demo/last.ckpt")
    export_checkpoint("checkpoints/demo/last.ckpt", "exports/demo")
    export_checkpoint("checkpoints/lora/last.ckpt", "exports/lora-hf", to="llava-hf", merge=True)

A ``mole`` export of a checkpoint also holds ``training_config.json`` (the run's hyper-parameters) and
``data_config.json`` (its data settings), so it loads onto a base rebuilt from them (``mole-train predict
--model.adapter_path``) as well as onto its llava-hf base.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mole_lightning.models import clean_parameter_name, load_adapters, load_llava_hf, load_trained_state
from mole_lightning.models.export import check_destination, export_model
from mole_lightning.models.llava_mole import LlavaMoLE
from mole_lightning.models.loading import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, read_adapter_config
from mole_lightning.training.module import MoLELightningModule

TRAINING_CONFIG_NAME = "training_config.json"
"""The run's hyper-parameters in a ``mole`` export (the module's, as a checkpoint records them)."""
DATA_CONFIG_NAME = "data_config.json"
"""The data settings a ``mole`` export carries from its run (:data:`DATA_SETTINGS`), to rebuild inputs as trained."""
DATA_SETTINGS = ("template", "system_prompt", "max_length", "image_aspect")
"""The DataModule settings that decide how a sample becomes model inputs (beyond the tower's geometry)."""
STATE_PREFIX = "model."
"""How a checkpoint of :class:`MoLELightningModule` names the model's parameters: ``model.<parameter>``."""


class CheckpointError(ValueError):
    """A checkpoint or export that cannot be read or does not fit the model, stated in one line."""


class CheckpointMismatchError(CheckpointError):
    """The tensors of a checkpoint or export do not fit the model; :attr:`reason` says how (one line)."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source} does not match the model: {reason}")
        self.source = source
        self.reason = reason


def _one_line(text: str, limit: int = 400) -> str:
    """``text`` on one line (whitespace runs collapsed, quotes of a ``KeyError`` stripped), at most ``limit``."""
    return " ".join(str(text).strip("'\"").split())[:limit]


# --------------------------------------------------------------------------------------------------------- reading
def read_checkpoint(path: str | os.PathLike, *, trust: bool = False) -> dict[str, Any]:
    """A Lightning checkpoint file written by :class:`MoLELightningModule`.

    Args:
        trust: read with full unpickling (``weights_only=False``): only for files you trust, e.g. a checkpoint
            whose hyper-parameters hold Python objects. By default only tensors and plain values are read.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: the file cannot be read (torch's first line of the reason; without ``trust``, also what
            a file that needs unpickling says), or holds no ``state_dict``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(str(path), map_location="cpu", weights_only=not trust)
    except Exception as error:  # torch's messages run over several lines: the first names the problem
        detail = (str(error).strip().splitlines() or [""])[0]
        raise CheckpointError(f"cannot read checkpoint {path}: {type(error).__name__}: {detail}") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(f"cannot read checkpoint {path}: it holds no state_dict")
    return checkpoint


def checkpoint_hparams(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The module's hyper-parameters a checkpoint recorded (``{}`` when none)."""
    hparams = checkpoint.get("hyper_parameters")
    return dict(hparams) if isinstance(hparams, dict) else {}


def checkpoint_data_settings(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The :data:`DATA_SETTINGS` of a checkpoint already read (its DataModule's saved hyper-parameters)."""
    recorded = checkpoint.get("datamodule_hyper_parameters") or {}
    return {key: recorded[key] for key in DATA_SETTINGS if key in recorded}


def recorded_data_settings(path: str | os.PathLike, *, trust: bool = False) -> dict[str, Any]:
    """The :data:`DATA_SETTINGS` the run of a ``.ckpt`` file (its DataModule's saved hyper-parameters) or of a
    ``mole`` export folder (its ``data_config.json``) trained with; ``{}`` when none were recorded.

    Raises:
        FileNotFoundError, CheckpointError: as :func:`read_checkpoint` (``trust`` is passed on).
    """
    path = Path(path)
    if path.is_file():
        return checkpoint_data_settings(read_checkpoint(path, trust=trust))
    config_file = path / DATA_CONFIG_NAME
    recorded = json.loads(config_file.read_text()) if config_file.is_file() else {}
    return {key: recorded[key] for key in DATA_SETTINGS if key in recorded}


def read_training_config(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The training hyper-parameters saved beside an exported adapter (:data:`TRAINING_CONFIG_NAME`), ``None``
    when there are none."""
    config_file = Path(directory) / TRAINING_CONFIG_NAME
    return json.loads(config_file.read_text()) if config_file.is_file() else None


# --------------------------------------------------------------------------------------------------------- loading
def checkpoint_state(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The model's tensors in a checkpoint: its ``model.<parameter>`` entries as ``<parameter>``, with the components
    that FSDP1, activation-checkpoint wrappers and ``torch.compile`` insert removed."""
    state = {clean_parameter_name(k): v for k, v in checkpoint["state_dict"].items()}
    return {k[len(STATE_PREFIX) :]: v for k, v in state.items() if k.startswith(STATE_PREFIX)}


def load_checkpoint_state(
    target: nn.Module, checkpoint: dict[str, Any], *, strict: bool = True, source: str = "the checkpoint"
) -> list[str]:
    """Load a checkpoint's trainable tensors (:func:`checkpoint_state`) into a configured module (its ``model``) or
    into a model.

    Every parameter of the model that requires grad must be in the checkpoint, with its shape; the checkpoint may
    hold tensors trained by hand that the rebuilt model has frozen.

    Args:
        strict: refuse tensors the model lacks (e.g. another ``num_experts``); else they are skipped.
        source: how errors name the checkpoint (e.g. its path).

    Returns:
        The names of the tensors the model lacks (empty with ``strict``).

    Raises:
        CheckpointMismatchError: missing, mis-shaped or (``strict``) unexpected tensors.
    """
    model = target.model if isinstance(target, MoLELightningModule) else target
    try:
        return load_trained_state(model, checkpoint_state(checkpoint), strict=strict)
    except ValueError as error:
        raise CheckpointMismatchError(source, _one_line(error)) from None


def module_from_checkpoint(path: str | os.PathLike, *, trust: bool = False) -> MoLELightningModule:
    """Rebuild the module of a checkpoint (architecture from its hyper-parameters) and load its trainable tensors.

    Raises:
        FileNotFoundError, CheckpointError: the file cannot be read (:func:`read_checkpoint`), records no
            hyper-parameters, or its tensors do not fit the rebuilt model (:class:`CheckpointMismatchError`).
    """
    checkpoint = read_checkpoint(path, trust=trust)
    return _module_of(checkpoint, str(path))


def _module_of(checkpoint: dict[str, Any], path: str) -> MoLELightningModule:
    hparams = checkpoint_hparams(checkpoint)
    if not hparams:
        raise CheckpointError(f"checkpoint {path} records no hyper_parameters to rebuild its model from")
    module = MoLELightningModule.from_hparams(hparams)
    module.configure_model()
    load_checkpoint_state(module, checkpoint, source=f"checkpoint {path}")
    return module


def load_export(model: LlavaMoLE, directory: str | os.PathLike) -> LlavaMoLE:
    """Load a ``mole`` adapter export onto ``model`` in place (:func:`~mole_lightning.models.load_adapters`).

    Raises:
        CheckpointError: the folder lacks the export files, or the export does not fit the model.
    """
    directory = Path(directory)
    for name in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME):
        if not (directory / name).is_file():
            raise CheckpointError(f"adapter folder {directory} has no {name}")
    try:
        return load_adapters(model, directory)
    except (KeyError, RuntimeError, ValueError) as error:
        raise CheckpointError(f"adapter {directory} does not match the model: {_one_line(error)}") from None


def load_trained(path: str | os.PathLike, *, trust: bool = False) -> tuple[LlavaMoLE, dict[str, Any] | None]:
    """The trained model of a ``.ckpt`` file or of a ``mole`` adapter export folder, with the run's
    hyper-parameters when known.

    An export folder loads onto its ``base_model_name_or_path`` (``load_llava_hf(base, adapter=folder)``), else
    onto the base rebuilt from its ``training_config.json``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: an unreadable checkpoint or one that does not fit its own model (``trust`` as in
            :func:`read_checkpoint`).
        ValueError: a folder that is no ``mole`` export (a peft folder, or neither a base nor a training config).
    """
    model, hparams, _ = _trained(path, trust)
    return model, hparams


def _trained(path: str | os.PathLike, trust: bool) -> tuple[LlavaMoLE, dict[str, Any] | None, dict[str, Any]]:
    """:func:`load_trained`'s model and hyper-parameters, and the recorded data settings (one read of a file)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input {str(path)!r} does not exist")
    if path.is_file():
        checkpoint = read_checkpoint(path, trust=trust)
        model = _module_of(checkpoint, str(path)).model
        return model, checkpoint_hparams(checkpoint), checkpoint_data_settings(checkpoint)
    meta = read_adapter_config(path)
    if meta.get("peft_type") is not None:
        raise ValueError(f"{str(path)!r} is a peft adapter folder; export from the checkpoint or a mole export")
    hparams = read_training_config(path)
    recorded = recorded_data_settings(path)
    if meta.get("base_model_name_or_path"):
        return load_llava_hf(meta["base_model_name_or_path"], adapter=path), hparams, recorded
    if hparams is None:
        raise ValueError(f"{str(path)!r} names no base_model_name_or_path and holds no {TRAINING_CONFIG_NAME}")
    module = MoLELightningModule.from_hparams(hparams)
    module.configure_model()
    return load_adapters(module.model, path), hparams, recorded


# ---------------------------------------------------------------------------------------------------------- export
def export_checkpoint(
    checkpoint_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    to: str = "mole",
    trust: bool = False,
    **options: Any,
) -> Path:
    """Export a ``.ckpt`` file (or a ``mole`` export folder) to ``output_dir``, atomically.

    Args:
        checkpoint_path: A ``.ckpt`` file written during training, or a ``mole`` adapter export folder.
        output_dir: Export directory (must be empty or absent unless ``overwrite=True``).
        to: ``"mole"``, ``"peft"`` or ``"llava-hf"``.
        trust: read the checkpoint with full unpickling (:func:`read_checkpoint`).
        **options: :func:`mole_lightning.models.export.export_model` options (``merge``, ``base``,
            ``write_base``, ``overwrite``, ``template``, ``system_prompt``); ``template`` and ``system_prompt``
            default to the run's data settings recorded in the checkpoint or export (:func:`recorded_data_settings`).

    Returns:
        The export directory.
    """
    check_destination(output_dir, overwrite=options.get("overwrite", False))  # fail before loading anything
    model, hparams, recorded = _trained(checkpoint_path, trust)  # recorded: how the run rendered its conversations
    chat = {key: recorded[key] for key in ("template", "system_prompt") if key in recorded}
    options = {**chat, **{k: v for k, v in options.items() if v is not None}}
    extra = None
    if to == "mole":
        extra = {TRAINING_CONFIG_NAME: json.dumps(hparams, indent=2, default=str)} if hparams else {}
        extra = {**extra, DATA_CONFIG_NAME: json.dumps(recorded, indent=2)} if recorded else extra or None
    return export_model(model.eval(), output_dir, to=to, extra_files=extra, **options)
