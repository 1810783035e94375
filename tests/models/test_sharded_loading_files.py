"""Row reads of safetensors folders (``SafetensorsFolder``) and the meta build of ``build_llava_mole``."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from mole_lightning.models.sharded_loading import SafetensorsFolder, parameters_on_meta


def test_rows_are_read_at_their_offsets_and_cast(tmp_path):
    weight = torch.randn(7, 5)
    save_file({"a.weight": weight.to(torch.bfloat16), "b": torch.arange(4)}, str(tmp_path / "model.safetensors"))
    folder = SafetensorsFolder(tmp_path)
    out = torch.empty(3, 5, dtype=torch.bfloat16)
    folder.read_rows("a.weight", 4, out)  # the last, short shard of 7 rows over 2 ranks is rows 4-6
    assert torch.equal(out, weight.to(torch.bfloat16)[4:])
    cast = torch.empty(7, 5)
    folder.read_rows("a.weight", 0, cast)  # bf16 file into a float32 tensor: the cast of the stored values
    assert torch.equal(cast, weight.to(torch.bfloat16).float())
    with pytest.raises(ValueError, match="cannot fill"):
        folder.read_rows("a.weight", 5, torch.empty(3, 5, dtype=torch.bfloat16))
    with pytest.raises(KeyError, match="missing"):
        folder.read_rows("missing", 0, out)


def test_parameters_on_meta_keeps_buffers_and_the_random_state():
    state = torch.random.get_rng_state()
    with parameters_on_meta():
        module = torch.nn.Linear(4, 3)
        module.register_buffer("table", torch.arange(3.0))
        module.extra = torch.nn.Parameter(torch.randn(2))  # drawn before it is registered
    assert module.weight.is_meta and module.extra.is_meta
    assert torch.equal(module.table, torch.arange(3.0))
    assert torch.equal(torch.random.get_rng_state(), state)
