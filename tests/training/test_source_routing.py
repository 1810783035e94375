"""Source-supervised routing in the Lightning module: source ids from the batch, the logged term, the configuration
errors at fit start, and a short demo fit after which each source's own expert holds more than 1/K of its tokens."""

from __future__ import annotations

import pytest
import torch

from mole_lightning.peft import MoLEConfig, collect_aux, source_supervision
from tests.conftest import TINY_MOLE, make_datamodule, make_module
from tests.training.test_module import trainer


def test_batch_sources_become_expert_ids_and_the_step_adds_the_weighted_term(demo, train_batches, tmp_path):
    mole = MoLEConfig(**TINY_MOLE, source_routing_coef=0.5, source_expert_map={"doc": 2, "med": 2})
    module = make_module(demo, mole=mole)
    module.configure_model()
    batch = dict(train_batches[0], source=["doc", "general", "med", "elsewhere"])
    assert module.source_expert_ids(batch).tolist() == [2, -1, 2, -1]  # unmapped sources are not supervised

    model = module.model
    model.train()
    out = module.training_step(batch, 0)  # the returned loss: CE + weighted balance, z and source terms
    with source_supervision(model.language_model, torch.tensor([2, -1, 2, -1])):
        reference = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "labels")})
    aux = collect_aux(model.language_model)
    assert aux.source_routing.item() > 0
    expected = reference.loss + 0.01 * aux.balance + 0.001 * aux.z_loss + 0.5 * aux.source_routing
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=0.0)


def test_bad_source_setup_fails_at_fit_start(demo, train_batches, tmp_path):
    few = make_module(demo, mole=MoLEConfig(**{**TINY_MOLE, "num_experts": 2}, source_routing_coef=1.0))
    with pytest.raises(ValueError, match="num_experts >= 3 sources"):
        trainer(tmp_path, max_steps=1).fit(few, datamodule=make_datamodule(demo, few))
    undeclared = make_module(demo, mole=MoLEConfig(**TINY_MOLE, source_routing_coef=1.0))
    loader = torch.utils.data.DataLoader(train_batches, batch_size=None)
    with pytest.raises(ValueError, match="needs the DataModule's training sources"):
        trainer(tmp_path, max_steps=1).fit(undeclared, train_dataloaders=loader)


def own_expert_shares(demo, tmp_path, coef: float) -> tuple[dict[str, list[float]], dict[str, float]]:
    """After a 48-step demo fit: each source's validation expert shares (all routed layers, as the module logs them
    in ``val/<source>/expert<k>``) and the logged metrics."""
    mole = MoLEConfig(**TINY_MOLE, source_routing_coef=coef)
    module = make_module(demo, mole=mole, optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3), router_lr=0.05)
    datamodule = make_datamodule(demo, module, samples_per_epoch=192, val_batch_size=24)
    run = trainer(tmp_path, max_epochs=1, limit_val_batches=1, log_every_n_steps=1)
    run.fit(module, datamodule=datamodule)
    metrics = run.callback_metrics
    shares = {s: [float(metrics[f"val/{s}/expert{k}"]) for k in range(mole.num_experts)] for s in datamodule.sources}
    return shares, metrics


def test_short_demo_fit_sends_each_source_to_its_expert(demo, tmp_path):
    shares, metrics = own_expert_shares(demo, tmp_path, coef=1.0)
    control, control_metrics = own_expert_shares(demo, tmp_path, coef=0.0)
    assert torch.isfinite(metrics["train/source_routing_loss"]) and "train/source_routing_loss" not in control_metrics
    num_experts = TINY_MOLE["num_experts"]
    for expert, source in enumerate(demo.train):  # one expert per declared source, in order
        assert sum(shares[source]) == pytest.approx(1.0, abs=1e-6)
        assert shares[source][expert] > 1.0 / num_experts, (source, shares)
        assert shares[source][expert] > control[source][expert], (source, shares, control)  # the term did it


@pytest.mark.slow
def test_fsdp2_on_two_cpu_processes_gives_the_single_process_loss_with_source_routing(tmp_path):
    from tests.training.recorders import read_losses
    from tests.training.test_fsdp2 import launch

    single, sharded = tmp_path / "single", tmp_path / "fsdp2"
    extra = ("--source-routing-coef", "1.0")
    reference = launch(single, devices=1, max_steps=3, extra=extra)
    run = launch(sharded, devices=2, max_steps=3, extra=extra)
    run.wait()
    reference.wait()
    expected, got = read_losses(single), read_losses(sharded)
    assert sorted(got) == sorted(expected) == [1, 2, 3]
    for step in expected:
        # every rank holds as many samples, all supervised: the mean of the ranks' terms is the global term
        assert got[step] == pytest.approx(expected[step], rel=1e-5), step
