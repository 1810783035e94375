"""Fixtures for the model tests: tokenizers, batches and saved tiny checkpoints over :mod:`tests.tiny_models`."""

from __future__ import annotations

import pytest
import torch

from tests.tiny_models import NUM_PATCHES, clip_config_kwargs, llama_config_kwargs, tiny_batch, word_tokenizer


@pytest.fixture
def tokenizer_with_image():
    return word_tokenizer(with_image=True)


@pytest.fixture
def tokenizer_without_image():
    return word_tokenizer(with_image=False)


def _old_llava_hf_key(key: str) -> str:
    """Key layout of the llava-hf checkpoints on the hub (transformers v4 era)."""
    for new, old in (
        ("model.language_model.", "language_model.model."),
        ("model.vision_tower.", "vision_tower."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("lm_head.", "language_model.lm_head."),
    ):
        if key.startswith(new):
            return old + key[len(new) :]
    return key


@pytest.fixture(scope="module")
def llava_hf_checkpoint(tmp_path_factory):
    """A tiny ``LlavaForConditionalGeneration`` saved in the hub's (old) key layout with its tokenizer.

    Returns ``(directory, hf_model)``; the model is in eval mode.
    """
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tok = word_tokenizer(with_image=True)
    image_id = tok.convert_tokens_to_ids("<image>")
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**clip_config_kwargs()),
        text_config=LlamaConfig(**llama_config_kwargs(len(tok))),
        image_token_index=image_id,
        image_seq_length=NUM_PATCHES,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    hf = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # non-trivial norms and biases
        for name, p in hf.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    directory = tmp_path_factory.mktemp("llava_hf")
    hf.save_pretrained(directory)
    for f in directory.glob("*.safetensors"):
        f.unlink()
    state = {_old_llava_hf_key(k): v.contiguous() for k, v in hf.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    tok.save_pretrained(directory)
    return directory, hf


@pytest.fixture
def make_batch():
    """Factory of small mixed batches (see :func:`tests.tiny_models.tiny_batch`)."""
    return tiny_batch
