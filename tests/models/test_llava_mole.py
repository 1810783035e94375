"""LlavaMoLE against transformers' LlavaForConditionalGeneration, placeholder checks, training and generation."""

from __future__ import annotations

import pytest
import torch

from mole_lightning.models import LlavaMoLE, build_llava_mole, load_llava_hf
from mole_lightning.peft import MoLEConfig
from tests.tiny_models import NUM_PATCHES, clip_config_kwargs, llama_config_kwargs

MOLE = MoLEConfig(num_experts=3, rank=4, alpha=8.0, dropout=0.0, balance_coef=0.01, z_loss_coef=0.001)


def _tiny_model(tokenizer, **kwargs) -> LlavaMoLE:
    torch.manual_seed(0)
    cfg = llama_config_kwargs(len(tokenizer))
    cfg.pop("vocab_size")
    return build_llava_mole(
        llm_config=cfg, tokenizer=tokenizer, vision="hf", vision_config=clip_config_kwargs(), **kwargs
    )


def test_logits_equal_transformers_llava_at_init(llava_hf_checkpoint, make_batch):
    directory, hf = llava_hf_checkpoint
    model = load_llava_hf(directory, mole=MOLE).eval()
    batch = make_batch(hf.config.image_token_id)
    with torch.no_grad():
        ref = hf(**batch)
        out = model(**batch)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-5)
    assert out.aux_loss.ndim == 0 and out.aux_loss > 0
    assert out.routing_stats and all(s["tokens_per_expert"].sum() == 24 + 20 for s in out.routing_stats.values())


def test_builder_model_equals_transformers_llava_with_copied_weights(tokenizer_with_image, make_batch):
    """Independent of the llava-hf loader: copy our weights into transformers' LLaVA by name."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    model = _tiny_model(tokenizer_with_image, mole=MOLE).eval()
    image_id = model.image_token_id
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**clip_config_kwargs()),
        text_config=LlamaConfig(**llama_config_kwargs(len(tokenizer_with_image))),
        image_token_index=image_id,
        vision_feature_layer=-2,
    )
    hf = LlavaForConditionalGeneration(config).eval()
    lm = model.language_model
    base = {k.replace(".base_layer", "").replace(".base", ""): v for k, v in lm.state_dict().items()}
    state = {}
    for key, value in base.items():
        if key.startswith("model."):
            state["model.language_model." + key[len("model.") :]] = value
        elif key.startswith("lm_head."):
            state[key] = value
    for key, value in model.vision_tower.model.state_dict().items():
        state["model.vision_tower." + key] = value
    for ours, theirs in (("0", "linear_1"), ("2", "linear_2")):
        for p in ("weight", "bias"):
            state[f"model.multi_modal_projector.{theirs}.{p}"] = model.projector.state_dict()[f"{ours}.{p}"]
    missing, _ = hf.load_state_dict(state, strict=False)
    # only the pruned last vision layer (unused at layer -2) and the unused post-layernorm are not copied
    assert all("encoder.layers.2." in k or "post_layernorm" in k for k in missing), missing
    batch = make_batch(image_id, text_only_second=False)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, hf(**batch).logits, rtol=1e-5, atol=1e-5)


def test_mixed_batch_equals_samples_alone(tokenizer_with_image, make_batch):
    model = _tiny_model(tokenizer_with_image, mole=MOLE).eval()
    batch = make_batch(model.image_token_id)
    with torch.no_grad():
        both = model(**batch, has_image=torch.tensor([True, False])).logits
        first = model(
            batch["input_ids"][:1], batch["attention_mask"][:1], batch["pixel_values"], batch["labels"][:1]
        ).logits
        second = model(batch["input_ids"][1:, :20], batch["attention_mask"][1:, :20]).logits
    torch.testing.assert_close(both[:1], first, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(both[1:, :20], second, rtol=1e-5, atol=1e-5)


def test_images_go_to_their_own_samples(tokenizer_with_image, make_batch):
    model = _tiny_model(tokenizer_with_image).eval()
    batch = make_batch(model.image_token_id, text_only_second=False)
    ids, pv = batch["input_ids"], batch["pixel_values"]
    with torch.no_grad():
        out = model(ids, pixel_values=pv).logits
        swapped = model(ids.flip(0), pixel_values=pv.flip(0)).logits
    torch.testing.assert_close(out, swapped.flip(0), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out[0], out[1])


def test_placeholder_errors(tokenizer_with_image, make_batch):
    model = _tiny_model(tokenizer_with_image)
    batch = make_batch(model.image_token_id)
    ids, pv = batch["input_ids"], batch["pixel_values"]
    with pytest.raises(ValueError, match=r"16 image placeholder tokens .* but no pixel_values"):
        model(ids)
    with pytest.raises(ValueError, match=r"pixel_values hold 1 images but input_ids contain no image placeholder"):
        model(torch.full_like(ids, 5), pixel_values=pv)
    with pytest.raises(ValueError, match=r"input_ids hold 16 placeholder tokens, .*2 images x 16 features = 32"):
        model(ids, pixel_values=torch.cat([pv, pv]))
    cut = ids.clone()
    cut[0, 2] = 5
    with pytest.raises(ValueError, match=r"sample\(s\) \[0\] hold \[15\] image placeholder tokens"):
        model(cut, pixel_values=pv)
    with pytest.raises(ValueError, match=r"has_image disagrees .* sample\(s\) \[1\]"):
        model(ids, pixel_values=pv, has_image=torch.tensor([True, True]))


def test_training_step_grads_only_on_adapters_routers_projector(tokenizer_with_image, make_batch):
    model = _tiny_model(tokenizer_with_image, mole=MOLE).train()
    batch = make_batch(model.image_token_id)
    out = model(**batch)
    out.total_loss.backward()
    allowed = ("lora_A", "lora_B", "router.", "projector.")
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad, "no gradients at all"
    assert all(any(a in n for a in allowed) for n in with_grad), sorted(with_grad)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == with_grad
    assert any(n.startswith("projector.") for n in with_grad)
    assert any("router." in n for n in with_grad)
    assert any(".mlp." in n and "lora_B" in n for n in with_grad)  # experts
    assert not any(p.requires_grad for p in model.vision_tower.parameters())
    assert not model.vision_tower.training
    groups = model.parameter_roles()
    assert set(groups) == {"adapters", "routers", "projector"}
    assert sum(len(v) for v in groups.values()) == len(trainable)


def test_text_only_batch_keeps_projector_in_graph(tokenizer_with_image, make_batch):
    model = _tiny_model(tokenizer_with_image, mole=MOLE).train()
    batch = make_batch(model.image_token_id)
    out = model(batch["input_ids"][1:], batch["attention_mask"][1:], labels=batch["labels"][1:])
    out.total_loss.backward()
    grads = [p.grad for p in model.projector.parameters()]
    assert all(g is not None and not g.any() for g in grads)


def test_gradient_checkpointing_gives_same_loss_and_grads(tokenizer_with_image, make_batch):
    model = _tiny_model(tokenizer_with_image, mole=MOLE).train()
    batch = make_batch(model.image_token_id)
    model(**batch).total_loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.gradient_checkpointing_enable()
    model(**batch).total_loss.backward()
    for n, p in model.named_parameters():
        if n in ref:
            torch.testing.assert_close(p.grad, ref[n], rtol=1e-4, atol=1e-6)
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    assert model.decoder_layer_classes() == {LlamaDecoderLayer}


def _greedy_without_cache(model: LlavaMoLE, pixel_values, input_ids, attention_mask, steps: int) -> torch.Tensor:
    """Reference decoding: full forward over the whole sequence at every step, argmax of the last logits."""
    ids, mask = input_ids, attention_mask
    for _ in range(steps):
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(ids, mask, pixel_values, position_ids=position_ids, return_routing_stats=False).logits
        nxt = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        ids = torch.cat([ids, nxt], dim=1)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
    return ids


def test_greedy_generation_with_cache_equals_without_cache(tokenizer_with_image):
    model = _tiny_model(tokenizer_with_image, mole=MOLE).eval()
    with torch.no_grad():  # non-zero adapters so that routing matters
        for n, p in model.language_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    image_id = model.image_token_id
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 44, (2, 22), generator=g)
    ids[0, 1 : 1 + NUM_PATCHES] = image_id
    mask = torch.ones_like(ids)
    ids[1, :4], mask[1, :4] = 3, 0  # left padding on the text-only prompt
    pv = torch.randn(1, 3, 32, 32, generator=g)
    steps = 6
    with torch.no_grad():
        ref = _greedy_without_cache(model, pv, ids, mask, steps)
    out = model.generate(pv, ids, mask, max_new_tokens=steps, do_sample=False, eos_token_id=None, pad_token_id=3)
    assert out.shape == ref.shape
    assert torch.equal(out, ref)


def test_uint8_pixels_are_normalised_in_the_model_like_float_images(tokenizer_with_image, make_batch):
    """The DataModule sends uint8 pixels; the model normalises them with the tower's mean and std. Reference: the
    same PIL images through torchvision's ``to_tensor`` + ``normalize`` (the float images users passed before)."""
    import numpy as np
    from PIL import Image
    from torchvision.transforms.functional import normalize, to_tensor

    model = _tiny_model(tokenizer_with_image, mole=MOLE).eval()
    tower = model.vision_tower
    gen = np.random.default_rng(0)
    images = [Image.fromarray((gen.random((32, 32, 3)) * 255).astype(np.uint8)) for _ in range(2)]
    pixels = torch.stack([torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1) for image in images])
    floats = torch.stack([normalize(to_tensor(image), tower.image_mean, tower.image_std) for image in images])
    assert pixels.dtype == torch.uint8
    torch.testing.assert_close(model.vision_input(pixels), floats, rtol=1e-6, atol=1e-6)
    assert model.vision_input(floats) is floats  # float images are used as given

    batch = make_batch(model.image_token_id, text_only_second=False)
    with torch.no_grad():
        from_uint8 = model(batch["input_ids"], batch["attention_mask"], pixels, batch["labels"])
        from_float = model(batch["input_ids"], batch["attention_mask"], floats, batch["labels"])
    torch.testing.assert_close(from_uint8.logits, from_float.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(from_uint8.loss, from_float.loss, rtol=1e-5, atol=1e-5)
    prompt = batch["input_ids"][:, :20], batch["attention_mask"][:, :20]
    options = dict(max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=3)
    assert torch.equal(model.generate(pixels, *prompt, **options), model.generate(floats, *prompt, **options))
