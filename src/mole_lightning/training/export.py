"""Export the trainable tensors of a training checkpoint for inference: ``adapter_model.safetensors`` + config JSON.

The output loads with :func:`mole_lightning.models.load_adapters` onto a base model built the same way::

    from mole_lightning.training.export import export_checkpoint
    export_checkpoint("checkpoints/demo/last.ckpt", "exports/demo")
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from mole_lightning.training.module import MoLELightningModule, clean_parameter_name

TRAINING_CONFIG_NAME = "training_config.json"


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
    state = {clean_parameter_name(k): v for k, v in checkpoint["state_dict"].items()}
    module.on_load_checkpoint({"state_dict": state})  # raises on missing trainable tensors
    module.load_state_dict(state, strict=False)
    return module


def export_checkpoint(checkpoint_path: str | os.PathLike, output_dir: str | os.PathLike) -> Path:
    """Write ``adapter_model.safetensors``, ``adapter_config.json`` and ``training_config.json`` to ``output_dir``.

    Args:
        checkpoint_path: A ``.ckpt`` file written during training.
        output_dir: Export directory (created).

    Returns:
        The export directory.
    """
    from mole_lightning.models import save_adapters

    module = module_from_checkpoint(checkpoint_path)
    directory = save_adapters(module.model, output_dir)
    hparams = read_checkpoint(checkpoint_path)["hyper_parameters"]
    (Path(directory) / TRAINING_CONFIG_NAME).write_text(json.dumps(hparams, indent=2, default=str))
    return Path(directory)
