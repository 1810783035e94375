"""Fixtures for the adapter-layer tests."""

import pytest
import torch

from tests.tiny_models import TINY_MODELS


@pytest.fixture(params=sorted(TINY_MODELS))
def tiny_lm(request):
    torch.manual_seed(0)
    return TINY_MODELS[request.param]().eval()
