"""The tiny :class:`MoLELightningModule` and a DataModule over demo shards whose image geometry follows the module
(as ``mole-train`` links them), for the tests that train, predict or chat with it."""

from __future__ import annotations

from typing import Any

from mole_lightning.data import DemoData, MixedInstructionDataModule
from mole_lightning.peft import MoLEConfig
from mole_lightning.training import ModelSpec, MoLELightningModule

TINY_MOLE = dict(num_experts=3, rank=4, alpha=8.0, dropout=0.0, balance_coef=0.01, z_loss_coef=0.001)


def make_module(demo_data: DemoData, **kwargs: Any) -> MoLELightningModule:
    """The tiny preset with the demo tokenizer and a small MoLE config."""
    kwargs.setdefault("architecture", ModelSpec(preset="tiny"))
    kwargs.setdefault("mole", MoLEConfig(**TINY_MOLE))
    return MoLELightningModule(tokenizer=demo_data.tokenizer, **kwargs)


def make_datamodule(demo_data: DemoData, module: MoLELightningModule, **kwargs: Any) -> MixedInstructionDataModule:
    """A DataModule over the demo shards, geometry taken from ``module`` (as the CLI links it); ``kwargs`` override
    the small defaults (batch 4, validation batch 8, no workers, 160 tokens, 64 samples per epoch)."""
    geometry = module.vision_geometry
    defaults = dict(
        sources={name: {"urls": spec, "weight": 1.0} for name, spec in demo_data.train.items()},
        val_sources={name: {"urls": spec} for name, spec in demo_data.val.items()},
        tokenizer=demo_data.tokenizer,
        num_image_tokens=geometry.num_image_tokens,
        image_size=geometry.image_size,
        image_mean=geometry.image_mean,
        image_std=geometry.image_std,
        batch_size=4,
        val_batch_size=8,
        num_workers=0,
        max_length=160,
        shuffle_buffer=50,
        samples_per_epoch=64,
        seed=0,
    )
    defaults.update(kwargs)
    return MixedInstructionDataModule(**defaults)
