"""MoLELightningModule: building, optimizer groups, loss composition under accumulation, NaN skipping, logging,
per-source validation, prediction, checkpoints and export, checked against hand-computed references."""

from __future__ import annotations

import copy
import math
import os

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from mole_lightning.checkpoints import export_checkpoint, module_from_checkpoint
from mole_lightning.constants import IGNORE_INDEX
from mole_lightning.models import load_adapters
from mole_lightning.training import (
    AtomicCheckpointIO,
    LearningRateLogger,
    RoutingHeatmapCallback,
    SkippedSamplesLogger,
    TokenThroughputMonitor,
    WarmupCosineLR,
)
from mole_lightning.training.throughput import parameter_counts, training_flops
from tests.conftest import DEMO_VAL, make_datamodule, make_module


def sgd(lr: float = 1.0):
    return lambda params: torch.optim.SGD(params, lr=lr)


def trainer(tmp_path, **kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(tmp_path),
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def loader(batches):
    return DataLoader(batches, batch_size=None)


def model_inputs(batch):
    return {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "labels", "has_image")}


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_configure_model_is_idempotent_and_seeded_independently_of_global_rng(demo):
    first = make_module(demo)
    first.configure_model()
    built = first.model
    first.configure_model()
    assert first.model is built

    torch.manual_seed(1234)  # the global RNG must not matter
    second = make_module(demo)
    second.configure_model()
    for (name, a), (_, b) in zip(first.model.state_dict().items(), second.model.state_dict().items()):
        assert torch.equal(a, b), name

    other = make_module(demo, model_seed=1)
    other.configure_model()
    lora_a = [n for n in trainable(first.model) if "lora_A" in n][0]
    assert not torch.equal(dict(first.model.named_parameters())[lora_a], dict(other.model.named_parameters())[lora_a])


def test_vision_geometry_of_the_tiny_tower_is_linked_correctly(demo):
    module = make_module(demo)
    module.configure_model()
    assert module.num_image_tokens == module.model.num_image_tokens == (32 // 8) ** 2
    assert module.image_size == module.model.vision_tower.image_size == 32
    assert tuple(module.image_mean) == tuple(module.model.vision_tower.image_mean)


def test_optimizer_groups_hold_only_trainable_parameters_with_roles_lrs_and_no_decay(demo):
    module = make_module(
        demo,
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1),
        projector_lr=5e-5,
        router_lr=2e-3,
    )
    module.configure_model()
    optimizer = module.configure_optimizers()
    names = {id(p): n for n, p in module.model.named_parameters()}
    seen = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    expected = [n for n, p in module.model.named_parameters() if p.requires_grad]
    assert sorted(seen) == sorted(expected) and len(seen) == len(set(seen))
    for group in optimizer.param_groups:
        for param in group["params"]:
            name = names[id(param)]
            one_dim_or_bias = param.ndim < 2 or name.endswith(".bias")
            assert group["weight_decay"] == (0.0 if one_dim_or_bias else 0.1), name
            if name.startswith("projector."):
                assert group["lr"] == 5e-5
            elif ".router." in name:
                assert group["lr"] == 2e-3
            else:
                assert group["lr"] == 1e-3
    group_names = {g["name"] for g in optimizer.param_groups}
    assert {"adapters", "routers", "routers_no_decay", "projector", "projector_no_decay"} <= group_names


def test_step_is_lm_plus_aux_loss_scaled_like_the_lm_loss_under_accumulation(demo, train_batches, tmp_path):
    module = make_module(demo, optimizer=sgd(1.0))
    module.configure_model()
    reference = copy.deepcopy(module.model)
    before = trainable(reference)

    # hand-computed: one SGD step (lr 1) on the mean over the two micro-batches of (CE + weighted aux)
    reference.train()
    for batch in train_batches[:2]:
        out = reference(**model_inputs(batch))
        assert out.aux_loss.item() > 0  # balance and z terms are on
        ((out.loss + out.aux_loss) / 2).backward()
    grads = {n: p.grad.clone() for n, p in reference.named_parameters() if p.requires_grad}

    trainer(tmp_path, max_steps=1, accumulate_grad_batches=2).fit(module, train_dataloaders=loader(train_batches[:2]))
    after = trainable(module.model)
    for name, value in before.items():
        torch.testing.assert_close(after[name], value - grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_nonfinite_loss_skips_the_step_counts_it_and_stops_after_too_many(demo, train_batches, tmp_path):
    def poisoned_module(bad_calls: set[int], **kwargs):
        module = make_module(demo, optimizer=sgd(0.1), **kwargs)
        module.configure_model()
        forward, calls = module.model.forward, {"n": 0}

        def maybe_nan(*args, **kw):
            out = forward(*args, **kw)
            calls["n"] += 1
            if calls["n"] in bad_calls:
                out.loss = out.loss * float("nan")
            return out

        module.model.forward = maybe_nan
        return module

    snapshots = []

    class Snapshot(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            snapshots.append(trainable(pl_module.model))

    module = poisoned_module({2})
    run = trainer(tmp_path, max_epochs=1, callbacks=[Snapshot()])
    run.fit(module, train_dataloaders=loader(train_batches))
    assert module.nonfinite.total == 1 and module.nonfinite.in_a_row == 0
    assert all(torch.equal(snapshots[0][n], snapshots[1][n]) for n in snapshots[0])  # batch 2 changed nothing
    assert any(not torch.equal(snapshots[1][n], snapshots[2][n]) for n in snapshots[0])  # training went on
    assert run.global_step == 4  # the skipped batch still counts as a (no-op) optimizer step
    assert run.callback_metrics["train/nonfinite_steps"] == 1

    module = poisoned_module({2, 3, 4}, max_nonfinite_in_a_row=3)
    with pytest.raises(RuntimeError, match="NaN/inf for 3 steps in a row"):
        trainer(tmp_path, max_epochs=1).fit(module, train_dataloaders=loader(train_batches))


def test_logs_losses_throughput_lr_and_routing_per_layer_and_source(demo, train_batches, tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    module = make_module(demo, optimizer=sgd(0.01))
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    callbacks = [RoutingHeatmapCallback(2, log_every_n_steps=1), TokenThroughputMonitor(window_size=2)]
    callbacks += [LearningRateLogger(), SkippedSamplesLogger()]
    run = trainer(tmp_path, max_steps=4, logger=logger, log_every_n_steps=1, callbacks=callbacks)
    run.fit(module, train_dataloaders=loader(train_batches))
    metrics = run.logged_metrics
    for key in ("train/loss", "train/aux_loss", "train/balance_loss", "train/z_loss", "train/device/items_per_sec"):
        assert key in metrics and math.isfinite(float(metrics[key])), key
    # tokens/s counts the non-padding tokens: over a window of 2 batches, the last batch's tokens per sample
    last = train_batches[3]
    ratio = float(metrics["train/device/items_per_sec"]) / float(metrics["train/device/samples_per_sec"])
    assert ratio == pytest.approx(int(last["attention_mask"].sum()) / last["input_ids"].shape[0], rel=1e-3)
    assert float(metrics["train/device/flops_per_sec"]) > 0
    assert float(run.callback_metrics["lr-SGD/adapters"]) == pytest.approx(0.01)
    layers = module.model.decoder_layers()
    for layer in range(len(layers)):
        shares = [float(metrics[f"routing/layer{layer:02d}/expert{k}"]) for k in range(3)]
        assert sum(shares) == pytest.approx(1.0, abs=1e-5)
    last_sources = set(train_batches[-1]["source"])
    for source in last_sources:
        shares = [float(metrics[f"routing_source/{source}/expert{k}"]) for k in range(3)]
        assert sum(shares) == pytest.approx(1.0, abs=1e-5)
    # hand check of the last step's layer-0 load against the router's own decision
    router = next(m for m in module.model.modules() if type(m).__name__ == "MoLERouter")
    record = router.record
    counts = torch.bincount(record.expert[record.valid], minlength=3).float()
    logged = torch.tensor([float(metrics[f"routing/layer00/expert{k}"]) for k in range(3)])
    torch.testing.assert_close(logged, counts / counts.sum())

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert "routing/layer_expert_load" in events.Tags()["images"]


def test_parameter_counts_of_the_flops_formula_by_hand(demo):
    module = make_module(demo)  # tiny preset: hidden 64, MLP 128, 2 layers, 4 heads (kv 2); MoLE K=3, r=4
    module.configure_model()
    counts = parameter_counts(module.model)
    d, ff, kv, r, layers, vocab = 64, 128, 32, 4, 2, len(module.tokenizer)
    attention = r * (d + d) + r * (d + kv) * 2 + r * (d + d)  # q, k, v, o LoRA: A (d_in, r) + B (r, d_out)
    experts = r * (d + ff) * 2 + r * (ff + d)  # one expert of gate, up, down
    router = 3 * d + 3
    assert counts.adapter == layers * (attention + experts + router)
    frozen = layers * (4 * d * d // 2 + 2 * d * kv + 3 * d * ff + 2 * d) + d + vocab * d  # + final norm + head
    assert counts.llm == frozen + layers * 0
    assert training_flops(counts, tokens=10, images=0, image_tokens=16) == (4 * frozen + 6 * counts.adapter) * 10


def test_validation_loss_per_source_is_token_weighted_over_the_whole_source(demo, tmp_path):
    module = make_module(demo)
    datamodule = make_datamodule(demo, module)
    results = trainer(tmp_path).validate(module, datamodule=datamodule, verbose=False)
    logged = {k: v for result in results for k, v in result.items()}

    module.model.eval()
    datamodule.setup("validate")
    total_sum, total_tokens = 0.0, 0
    for name in datamodule.val_source_names:
        loss_sum, tokens = 0.0, 0
        with torch.no_grad():
            for batch in datamodule.source_loader(name):
                shifted = batch["labels"][:, 1:]
                logits = module.model(**model_inputs(batch)).logits[:, :-1].float()
                mask = shifted != IGNORE_INDEX
                loss_sum += torch.nn.functional.cross_entropy(logits[mask], shifted[mask], reduction="sum").item()
                tokens += int(mask.sum())
        assert logged[f"val/{name}/loss"] == pytest.approx(loss_sum / tokens, rel=1e-4)
        shares = [logged[f"val/{name}/expert{k}"] for k in range(3)]
        assert sum(shares) == pytest.approx(1.0, abs=1e-4)
        total_sum, total_tokens = total_sum + loss_sum, total_tokens + tokens
    assert logged["val/loss"] == pytest.approx(total_sum / total_tokens, rel=1e-4)


def test_predict_step_returns_one_record_per_prompt(demo, tmp_path):
    module = make_module(demo, max_new_tokens=4)
    datamodule = make_datamodule(demo, module, val_batch_size=8)  # a full batch and a partial one per source
    outputs = trainer(tmp_path).predict(module, datamodule=datamodule)
    assert len(outputs) == len(datamodule.val_source_names)
    for name, per_loader in zip(datamodule.val_source_names, outputs):
        records = [r for batch in per_loader for r in batch]
        assert len(records) == DEMO_VAL and len({r["id"] for r in records}) == DEMO_VAL
        for record in records:
            assert set(record) >= {"id", "source", "question", "answer", "prediction"}
            assert record["source"] == name and isinstance(record["prediction"], str)
            assert record["answer"] == record["answers"][0]


def test_predict_step_decodes_a_task_with_its_own_protocol(demo, monkeypatch):
    """Tiny LVLM-eHub's wrapper decodes greedily with repetition_penalty 10 and up to 256 new tokens
    (Multi-Modality-Arena's LLaVA-MoLE tester); a task without a protocol keeps the module's max_new_tokens."""
    module = make_module(demo, max_new_tokens=4)
    datamodule = make_datamodule(demo, module, val_batch_size=3)
    module.configure_model()
    batch = next(iter(datamodule.predict_dataloader()[0]))
    calls = []

    def generate(pixel_values, input_ids, attention_mask=None, **kwargs):
        calls.append(kwargs)
        return torch.cat([input_ids, torch.full_like(input_ids[:, :1], 40)], dim=1)

    monkeypatch.setattr(module.model, "generate", generate)
    module.predict_step({**batch, "task": ["lvlm_ehub"] * len(batch["input_ids"])}, 0)
    module.predict_step({**batch, "task": ["vqa"] * len(batch["input_ids"])}, 0)
    assert calls[0]["repetition_penalty"] == 10 and calls[0]["max_new_tokens"] == 256 and not calls[0]["do_sample"]
    assert "repetition_penalty" not in calls[1] and calls[1]["max_new_tokens"] == 4


def test_bf16_mixed_training_runs_and_gradient_checkpointing_changes_nothing(demo, train_batches, tmp_path):
    module = make_module(demo, optimizer=sgd(0.01))
    run = trainer(tmp_path, max_steps=2, precision="bf16-mixed")
    run.fit(module, train_dataloaders=loader(train_batches))
    assert math.isfinite(float(run.callback_metrics["train/loss"]))

    plain = make_module(demo)
    checkpointed = make_module(demo, gradient_checkpointing=True)
    grads = []
    for module in (plain, checkpointed):
        module.configure_model()
        module.model.train()
        out = module.model(**model_inputs(train_batches[0]))
        (out.loss + out.aux_loss).backward()
        grads.append({n: p.grad for n, p in module.model.named_parameters() if p.requires_grad})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_checkpoint_holds_only_trainable_tensors_written_atomically_and_exports(demo, train_batches, tmp_path):
    module = make_module(demo, optimizer=sgd(0.05))
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True, every_n_train_steps=2)
    run = trainer(
        tmp_path, max_steps=2, enable_checkpointing=True, callbacks=[checkpoint], plugins=[AtomicCheckpointIO()]
    )
    run.fit(module, train_dataloaders=loader(train_batches))
    files = sorted(os.listdir(tmp_path / "ckpt"))
    assert "last.ckpt" in files and not [f for f in files if ".tmp-" in f]

    state = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    expected = {f"model.{n}" for n, p in module.model.named_parameters() if p.requires_grad}
    assert set(state["state_dict"]) == expected
    assert state["optimizer_states"] and state["loops"]
    full_bytes = sum(t.numel() * t.element_size() for t in module.model.state_dict().values())
    saved_bytes = sum(t.numel() * t.element_size() for t in state["state_dict"].values())
    assert saved_bytes < 0.5 * full_bytes

    restored = module_from_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    for name, value in trainable(module.model).items():
        assert torch.equal(dict(restored.model.named_parameters())[name], value), name

    export = export_checkpoint(tmp_path / "ckpt" / "last.ckpt", tmp_path / "export")
    fresh = make_module(demo)
    fresh.configure_model()  # the same frozen base (same model_seed); trainable tensors wiped, then loaded
    load_adapters_into = fresh.model
    for param in load_adapters_into.parameters():
        if param.requires_grad:
            torch.nn.init.zeros_(param.data)
    load_adapters(load_adapters_into, export)
    module.model.eval()
    load_adapters_into.eval()
    with torch.no_grad():
        ref = module.model(**model_inputs(train_batches[0])).logits
        got = load_adapters_into(**model_inputs(train_batches[0])).logits
    torch.testing.assert_close(got, ref)

    from_export = make_module(demo, adapter_path=str(export))  # e.g. mole-train predict --model.adapter_path
    from_export.configure_model()
    from_export.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(from_export.model(**model_inputs(train_batches[0])).logits, ref)

    broken = dict(state)
    broken["state_dict"] = {k: v for k, v in state["state_dict"].items() if "router" not in k}
    fresh2 = make_module(demo)
    fresh2.configure_model()
    with pytest.raises(KeyError, match="lacks"):
        fresh2.on_load_checkpoint(broken)


def test_warmup_cosine_schedule_matches_hand_computed_values():
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.SGD([{"params": [params[0]], "lr": 1.0}, {"params": [params[1]], "lr": 0.1}], lr=1.0)
    schedule = WarmupCosineLR(optimizer, warmup_steps=2, min_lr_ratio=0.1)
    schedule.set_total_steps(10)
    seen = []
    for _ in range(11):
        seen.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        schedule.step()
    expected = [1 / 3, 2 / 3, 1.0] + [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 2) / 8)) for s in range(3, 11)]
    for step, factor in enumerate(expected):
        assert seen[step][0] == pytest.approx(factor), step
        assert seen[step][1] == pytest.approx(0.1 * factor), step
    assert seen[6][0] == pytest.approx(0.55)


def test_test_loop_reports_the_same_per_source_losses_as_validation(demo, tmp_path):
    module = make_module(demo)
    datamodule = make_datamodule(demo, module)
    run = trainer(tmp_path)
    validated = {k: v for r in run.validate(module, datamodule=datamodule, verbose=False) for k, v in r.items()}
    loaders = [datamodule.source_loader(name) for name in datamodule.val_source_names]
    tested = {k: v for r in run.test(module, dataloaders=loaders, verbose=False) for k, v in r.items()}
    for name in datamodule.val_source_names:
        assert tested[f"test/{name}/loss"] == pytest.approx(validated[f"val/{name}/loss"], rel=1e-6)
    assert {k for k in tested if k.endswith("/loss")} == {
        k.replace("val/", "test/") for k in validated if k.endswith("/loss")
    }


def test_load_from_checkpoint_rebuilds_the_module_with_its_trained_tensors(demo, train_batches, tmp_path):
    from mole_lightning.training import MoLELightningModule

    module = make_module(demo, optimizer=sgd(0.05))
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    trainer(tmp_path, max_steps=2, enable_checkpointing=True, callbacks=[checkpoint]).fit(
        module, train_dataloaders=loader(train_batches)
    )
    restored = MoLELightningModule.load_from_checkpoint(str(tmp_path / "ckpt" / "last.ckpt"), weights_only=True)
    assert restored.model is not None and restored.resolved_mole_config() == module.resolved_mole_config()
    for name, value in trainable(module.model).items():
        assert torch.equal(dict(restored.model.named_parameters())[name], value), name
