"""Fixtures for the training tests: small demo shards, the tiny model spec, batches and a DataModule factory."""

from __future__ import annotations

import pytest
import torch

from mole_lightning.data import MixedInstructionDataModule, make_demo_data
from mole_lightning.peft import MoLEConfig
from mole_lightning.training import ModelSpec, MoLELightningModule

TINY_MOLE = dict(num_experts=3, rank=4, alpha=8.0, dropout=0.0, balance_coef=0.01, z_loss_coef=0.001)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """Demo shards (120 training / 24 validation samples per source) and tokenizer."""
    return make_demo_data(str(tmp_path_factory.mktemp("demo")), train=120, val=24, seed=0, maxcount=60)


def make_module(demo_data, **kwargs) -> MoLELightningModule:
    """The tiny preset with the demo tokenizer and a small MoLE config."""
    kwargs.setdefault("architecture", ModelSpec(preset="tiny"))
    kwargs.setdefault("mole", MoLEConfig(**TINY_MOLE))
    return MoLELightningModule(tokenizer=demo_data.tokenizer, **kwargs)


def make_datamodule(demo_data, module: MoLELightningModule, **kwargs) -> MixedInstructionDataModule:
    """A DataModule over the demo shards, geometry taken from ``module`` (as the CLI links it)."""
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


@pytest.fixture(scope="session")
def train_batches(demo_data):
    """A few training batches (dicts of CPU tensors) of the demo mixture."""
    module = make_module(demo_data)
    datamodule = make_datamodule(demo_data, module)
    datamodule.setup("fit")
    iterator = iter(datamodule.train_dataloader())
    return [next(iterator) for _ in range(4)]


@pytest.fixture(autouse=True)
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
