"""Trained tensors keep full precision at the recipes' precisions: routers compute and stay fp32 under
``bf16-mixed`` and ``bf16-true``; adapters, routers and projector are fp32 master weights under ``bf16-true``, so
the projector moves at LLaVA's lr 2e-5 as it does in a 32-true run."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from mole_lightning.peft import MoLERouter, iter_routers
from tests.conftest import make_module


def fit(module, batches, tmp_path, precision: str, steps: int = 3) -> None:
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        precision=precision,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))


def adamw(lr: float):
    return lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def test_router_logits_are_fp32_under_bf16_autocast(demo, train_batches):
    module = make_module(demo)
    module.configure_model()
    model = module.model.eval()
    router = next(r for _, r in iter_routers(model.language_model))
    inputs = []
    handle = router.register_forward_pre_hook(lambda _, args: inputs.append(args[0].detach()))
    batch = train_batches[0]
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        model(batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"), has_image=batch["has_image"])
    handle.remove()
    logits = router.record.logits
    assert logits.dtype == torch.float32
    x = inputs[0].reshape(-1, router.in_features).float()
    expected = F.linear(x, router.weight, router.bias)  # fp32 reference, autocast off
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what autocast would have made of the same linear
        assert F.linear(x, router.weight, router.bias).dtype == torch.bfloat16


def test_bf16_true_keeps_trained_tensors_fp32_and_small_updates(demo, train_batches, tmp_path):
    module = make_module(demo, optimizer=adamw(2e-5))
    fit(module, train_batches, tmp_path, "bf16-true")
    model = module.model
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16}  # the plugin converted the base
    assert {p.dtype for p in trained.values()} == {torch.float32}
    assert all(r.weight.dtype == torch.float32 for r in model.modules() if isinstance(r, MoLERouter))
    # an update far below bf16 resolution at 1.0 (2**-8) is kept by the fp32 router weight
    router = next(r for r in model.modules() if isinstance(r, MoLERouter))
    with torch.no_grad():
        router.weight.fill_(1.0)
        router.weight.add_(1e-5)
    assert torch.all(router.weight != 1.0)


def test_projector_moves_at_llava_lr_under_bf16_true_as_in_32_true(demo, train_batches, tmp_path):
    moved = {}
    for precision in ("32-true", "bf16-true"):
        module = make_module(demo, optimizer=adamw(2e-5))
        module.configure_model()
        before = {n: p.detach().clone().float() for n, p in module.model.projector.named_parameters()}
        fit(module, train_batches, tmp_path / precision, precision)
        moved[precision] = torch.cat(
            [(p.detach().float() - before[n]).flatten() for n, p in module.model.projector.named_parameters()]
        )
    full, half = moved["32-true"], moved["bf16-true"]
    assert full.abs().max() > 1e-5  # AdamW moves every weight by about lr per step
    # the bf16-true run moves the projector like the fp32 run (bf16 weights would not move at all at this lr)
    assert half.norm() == pytest.approx(float(full.norm()), rel=0.1)
    assert F.cosine_similarity(half, full, dim=0) > 0.9
