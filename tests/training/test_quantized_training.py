"""QLoRA with Lightning: ``architecture.quantize: nf4`` trains adapters, routers and projector over a 4-bit base that
never changes (fp32 and bf16-true), and FSDP/FSDP2 sharding of a 4-bit base is refused before anything is built."""

from __future__ import annotations

import types

import lightning.pytorch as pl
import pytest
import torch

from mole_lightning.peft.quantization import is_4bit
from mole_lightning.training import ModelSpec
from mole_lightning.training.strategies import MoLEFSDPStrategy, fully_shard_llava_mole
from tests.conftest import make_module
from tests.training.test_module import loader, trainer

pytest.importorskip("bitsandbytes")

QLORA = ModelSpec(preset="tiny", quantize="nf4")


class Snapshots(pl.Callback):
    """Trainable tensors and 4-bit codes (with their block absmax) when training starts, after the model is built
    and converted by the precision plugin."""

    def on_train_start(self, trainer, module):
        params = list(module.model.named_parameters())
        self.trainable = {n: p.detach().clone() for n, p in params if p.requires_grad}
        self.codes = {n: (p.detach().clone(), p.quant_state.absmax.clone()) for n, p in params if is_4bit(p)}


@pytest.mark.parametrize("precision", ["32-true", "bf16-true"])
def test_qlora_steps_move_adapters_routers_and_projector_not_the_4bit_base(demo, train_batches, tmp_path, precision):
    module = make_module(demo, architecture=QLORA, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    snapshots = Snapshots()
    trainer(tmp_path, max_steps=3, precision=precision, callbacks=[snapshots]).fit(
        module, train_dataloaders=loader(train_batches[:3])
    )
    model = module.model
    assert len(snapshots.codes) == 2 * 7  # q/k/v/o/gate/up/down of the 2 tiny layers
    groups = {"adapters": 0, "routers": 0, "projector": 0}
    for name, param in model.named_parameters():
        if name in snapshots.codes:
            codes, absmax = snapshots.codes[name]
            assert is_4bit(param) and param.dtype == torch.uint8 and not param.requires_grad
            assert torch.equal(param.detach(), codes) and torch.equal(param.quant_state.absmax, absmax), name
        elif name in snapshots.trainable:
            assert param.dtype == torch.float32, name  # fp32 masters under bf16-true too
            assert not torch.equal(param.detach(), snapshots.trainable[name]), f"{name} did not move"
            role = "projector" if name.startswith("projector.") else "routers" if "router" in name else "adapters"
            groups[role] += 1
    assert all(groups.values()), groups
    assert module.trainer.global_step == 3


def test_fsdp_and_fsdp2_sharding_of_a_4bit_base_are_refused_before_building(demo):
    message = r"a 4-bit base \(model.architecture.quantize\) cannot be sharded with FSDP/FSDP2"
    module = make_module(demo, architecture=QLORA)
    module._device_mesh = object()  # what ModelParallelStrategy (FSDP2) sets before configure_model
    with pytest.raises(ValueError, match=message):
        module.configure_model()
    assert module.model is None

    module = make_module(demo, architecture=QLORA)
    module._trainer = types.SimpleNamespace(strategy=MoLEFSDPStrategy())  # FSDP1
    with pytest.raises(ValueError, match=message):
        module.configure_model()

    model = QLORA.build(tokenizer=demo.tokenizer)
    with pytest.raises(ValueError, match=message):
        fully_shard_llava_mole(model, mesh=None)  # refused before the mesh is looked at
