"""The trained state through :mod:`mole_lightning.checkpoints`: a tensor made trainable by hand reaches the
checkpoint (a real Lightning fit) and every export format, read back by the formats' own loaders (transformers'
``LlavaForConditionalGeneration``, peft's ``PeftModel``) and by ours with equal values; a frozen adapter reaches
none; a checkpoint and its ``mole`` export load to the same model."""

from __future__ import annotations

import json

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file

from mole_lightning.checkpoints import (
    CheckpointError,
    CheckpointMismatchError,
    export_checkpoint,
    load_checkpoint_state,
    load_trained,
    read_checkpoint,
    recorded_data_settings,
)
from mole_lightning.models import load_adapters, load_llava_hf, trainable_names, trainable_state_dict
from mole_lightning.models.export import ExportError, export_model
from mole_lightning.peft import MoLEConfig
from tests.conftest import make_datamodule, make_module
from tests.models.test_export import TOL, randomize_adapters

LORA = dict(num_experts=1, rank=4, alpha=8.0)
NORM = "language_model.model.layers.0.input_layernorm.weight"
"""An LLM tensor frozen by default (our name; llava-hf's: ``model.language_model.layers.0.input_layernorm.weight``)."""


def vision_norm(model) -> str:
    """A vision-tower tensor frozen by default: the first encoder layer's ``layer_norm1.weight``."""
    return next(n for n, _ in model.named_parameters() if n.startswith("vision_tower.model.") and "layer_norm1.w" in n)


def hf_name(name: str) -> str:
    """llava-hf's name of the two hand-trained tensors (written out by hand: the exports' mapping is under test)."""
    if name.startswith("vision_tower.model."):
        return "model.vision_tower." + name[len("vision_tower.model.") :]
    return "model.language_model." + name[len("language_model.model.") :]


def train_by_hand(model, names: list[str], seed: int):
    """``names`` made trainable and moved away from their base values (as training would)."""
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in names:
            params[name].requires_grad_(True)
            params[name].add_(0.3 * torch.randn(params[name].shape, generator=g))
    return model


def llava_inputs(model, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids (1, 600) with one image's placeholders, pixel_values (1, 3, 336, 336))``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 500, (1, 600), generator=g)
    ids[0, 2 : 2 + model.num_image_tokens] = model.image_token_id
    return ids, torch.randn(1, 3, 336, 336, generator=g)


def value(model, name: str) -> torch.Tensor:
    return dict(model.named_parameters())[name].detach()


def test_a_tensor_trained_by_hand_is_in_every_export_of_a_lora_model(real_folders, tmp_path):
    from transformers import LlavaForConditionalGeneration

    from peft import PeftModel

    base = str(real_folders["llava_hf"])
    torch.manual_seed(0)
    model = randomize_adapters(load_llava_hf(base, mole=MoLEConfig(**LORA)), seed=4)
    names = [NORM, vision_norm(model)]
    train_by_hand(model, names, seed=5).eval()
    state = trainable_state_dict(model)
    assert list(state) == trainable_names(model) and set(names) <= set(state)
    ids, pixels = llava_inputs(model)
    with torch.no_grad():
        ours = model(ids, pixel_values=pixels).logits

    mole = export_model(model, tmp_path / "mole", to="mole")
    weights = load_file(str(mole / "adapter_model.safetensors"))
    assert set(weights) == set(state)
    reloaded = load_llava_hf(base, adapter=mole).eval()
    for name in names:
        assert torch.equal(weights[name], state[name]) and torch.equal(value(reloaded, name), state[name])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids, pixel_values=pixels).logits, ours, **TOL)

    peft_dir = export_model(model, tmp_path / "peft", to="peft")
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    modules = {hf_name(name).rpartition(".")[0] for name in names}
    assert set(config["modules_to_save"]) == {"multi_modal_projector", *modules}
    peft_model = PeftModel.from_pretrained(
        LlavaForConditionalGeneration.from_pretrained(base, dtype=torch.float32), peft_dir
    ).eval()
    loaded = dict(peft_model.named_parameters())
    for name in names:
        module, _, leaf = hf_name(name).rpartition(".")
        assert torch.equal(loaded[f"base_model.model.{module}.modules_to_save.default.{leaf}"], state[name])
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids, pixel_values=pixels).logits, ours, **TOL)

    merged = export_model(model, tmp_path / "hf", to="llava-hf", merge=True)
    hf = LlavaForConditionalGeneration.from_pretrained(merged, dtype=torch.float32).eval()
    ours_again = load_llava_hf(merged).eval()  # our llava-hf loader
    for name in names:
        assert torch.equal(dict(hf.named_parameters())[hf_name(name)], state[name])
        assert torch.equal(value(ours_again, name), state[name])
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids, pixel_values=pixels).logits, ours, **TOL)


def test_a_tensor_trained_by_hand_is_in_an_unmerged_llava_hf_export(real_folders, tmp_path):
    from transformers import LlavaForConditionalGeneration

    model = load_llava_hf(real_folders["llava_hf"])  # no adapters: the projector and the hand-trained tensors
    names = [NORM, vision_norm(model)]
    train_by_hand(model, names, seed=6).eval()
    assert set(names) < set(trainable_state_dict(model))
    out = export_model(model, tmp_path / "hf", to="llava-hf")
    hf = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    reloaded = load_llava_hf(out).eval()
    for name in names:
        assert torch.equal(dict(hf.named_parameters())[hf_name(name)], value(model, name))
        assert torch.equal(value(reloaded, name), value(model, name))
    ids, pixels = llava_inputs(model, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids, pixel_values=pixels).logits, model(ids, pixel_values=pixels).logits)


def test_a_frozen_adapter_is_in_no_checkpoint_or_export(demo, real_folders, tmp_path):
    module = make_module(demo)
    module.configure_model()
    model = module.model
    frozen = [n for n, _ in model.named_parameters() if n.endswith("layers.0.mlp.router.weight")]
    frozen += [n for n, _ in model.named_parameters() if ".layers.0.self_attn.q_proj.lora_" in n]
    assert len(frozen) == 3  # a router, an adapter's lora_A and lora_B
    for name in frozen:
        dict(model.named_parameters())[name].requires_grad_(False)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert set(checkpoint["state_dict"]) == {f"model.{n}" for n in trainable_names(model)}
    assert not {f"model.{n}" for n in frozen} & set(checkpoint["state_dict"])
    out = export_model(model, tmp_path / "mole", to="mole")
    assert not set(frozen) & set(load_file(str(out / "adapter_model.safetensors")))
    fresh = make_module(demo)
    fresh.configure_model()  # the adapter trainable again: its values are nowhere to load from
    with pytest.raises(ValueError, match=r"lacks 3 trainable tensor\(s\)") as error:
        load_adapters(fresh.model, out)
    assert "\n" not in str(error.value) and frozen[0] in str(error.value)

    lora = load_llava_hf(real_folders["llava_hf"], mole=MoLEConfig(**LORA))
    lora.language_model.model.layers[0].self_attn.q_proj.lora_A.requires_grad_(False)
    with pytest.raises(ExportError, match=r"layers\.0\.self_attn\.q_proj\.lora_A is frozen.*peft") as error:
        export_model(lora, tmp_path / "peft", to="peft")
    assert "\n" not in str(error.value) and not (tmp_path / "peft").exists()


def test_a_peft_export_refuses_a_trained_base_weight_of_a_lora_layer(real_folders, tmp_path):
    model = load_llava_hf(real_folders["llava_hf"], mole=MoLEConfig(**LORA))
    name = "language_model.model.layers.0.self_attn.q_proj.weight"
    train_by_hand(model, [name], seed=7)
    with pytest.raises(ExportError, match=rf"{name} is trained.*peft") as error:
        export_model(model, tmp_path / "peft", to="peft")
    assert "\n" not in str(error.value)


def test_a_fitted_checkpoint_and_its_mole_export_load_to_the_same_model(demo, tmp_path):
    import lightning.pytorch as pl

    module = make_module(demo, optimizer=lambda params: torch.optim.SGD(params, lr=0.05))
    module.configure_model()  # idempotent: the fit keeps this model
    names = [NORM, vision_norm(module.model)]
    train_by_hand(module.model, names, seed=8)
    checkpointing = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=2,
        limit_val_batches=0,
        logger=False,
        callbacks=[checkpointing],
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module, datamodule=make_datamodule(demo, module, samples_per_epoch=8, max_length=150))
    path = tmp_path / "ckpt" / "last.ckpt"
    saved = read_checkpoint(path)["state_dict"]
    assert set(saved) == {f"model.{n}" for n in trainable_names(module.model)}
    for name in names:
        assert torch.equal(saved[f"model.{name}"], value(module.model, name))

    from_checkpoint, hparams = load_trained(path)
    assert hparams["model_seed"] == module.hparams.model_seed
    export = export_checkpoint(path, tmp_path / "export")
    assert set(names) <= set(load_file(str(export / "adapter_model.safetensors")))
    from_export, _ = load_trained(export)  # rebuilt from its training_config.json, the export loaded on top
    recorded = recorded_data_settings(path)  # the fit's DataModule settings, carried by the export
    assert recorded["max_length"] == 150 and recorded_data_settings(export) == recorded
    datamodule = make_datamodule(demo, module)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    batch = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "has_image")}
    module.model.eval()
    with torch.no_grad():
        expected = module.model(**batch).logits
        for loaded in (from_checkpoint, from_export):
            for name in names:
                assert torch.equal(value(loaded, name), value(module.model, name))
            torch.testing.assert_close(loaded.eval()(**batch).logits, expected, rtol=0, atol=0)


def test_a_checkpoint_that_needs_unpickling_is_read_only_when_trusted(demo, tmp_path):
    module = make_module(demo)
    module.configure_model()
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    checkpoint["hyper_parameters"] = {**module.hparams, "root": tmp_path}  # a Path: no plain value
    path = tmp_path / "pickled.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*pickled.ckpt") as error:
        read_checkpoint(path)
    assert "\n" not in str(error.value)
    model, hparams = load_trained(path, trust=True)
    assert hparams["root"] == tmp_path
    for name, tensor in checkpoint["state_dict"].items():
        assert torch.equal(value(model, name[len("model.") :]), tensor)

    other = make_module(demo, mole=MoLEConfig(num_experts=2, rank=4, alpha=8.0))
    other.configure_model()
    with pytest.raises(CheckpointMismatchError, match="does not match the model: .*differ in shape") as error:
        load_checkpoint_state(other, read_checkpoint(path, trust=True))
    assert "\n" not in str(error.value)
