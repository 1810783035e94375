"""Fixtures for the training tests: a few batches of the demo mixture, one torch thread per test."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import make_datamodule, make_module


@pytest.fixture(scope="session")
def train_batches(demo):
    """A few training batches (dicts of CPU tensors) of the demo mixture."""
    module = make_module(demo)
    datamodule = make_datamodule(demo, module)
    datamodule.setup("fit")
    iterator = iter(datamodule.train_dataloader())
    return [next(iterator) for _ in range(4)]


@pytest.fixture(autouse=True)
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
