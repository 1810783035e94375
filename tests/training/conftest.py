"""Fixtures for the training tests: small demo shards and batches (the tiny module and DataModule factories live in
:mod:`tests.demo_modules`)."""

from __future__ import annotations

import pytest
import torch

from mole_lightning.data import make_demo_data
from tests.demo_modules import TINY_MOLE, make_datamodule, make_module  # noqa: F401 (also imported from here)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """Demo shards (120 training / 24 validation samples per source) and tokenizer."""
    return make_demo_data(str(tmp_path_factory.mktemp("demo")), train=120, val=24, seed=0, maxcount=60)


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
