"""Tiny HF models for the tests, built from transformers configs (no hub): one Llama geometry, its CLIP tower,
a WordLevel tokenizer over ``w0..w39`` and a small mixed batch for it."""

from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

IMAGE_SIZE = 32
PATCH = 8
NUM_PATCHES = (IMAGE_SIZE // PATCH) ** 2  # 16
WORDS = [f"w{i}" for i in range(40)]
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]

# The one tiny decoder geometry: d 32, MLP 48, 2 layers, GQA 4/2 heads.
TINY_LM = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)

TINY_MODELS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**TINY_LM)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**TINY_LM, sliding_window=None)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**TINY_LM)),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**TINY_LM, head_dim=8)),
}


def llama_config_kwargs(vocab_size: int) -> dict:
    """``TINY_LM`` for :func:`word_tokenizer`'s vocabulary (ids: pad 3, bos 1, eos 2), untied, 256 positions."""
    return dict(
        TINY_LM,
        vocab_size=vocab_size,
        max_position_embeddings=256,
        pad_token_id=3,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )


def clip_config_kwargs() -> dict:
    """A CLIP tower over ``IMAGE_SIZE`` px images in ``PATCH`` px patches (``NUM_PATCHES`` tokens)."""
    return dict(
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=3,
        num_attention_heads=4,
    )


def tiny_llava() -> LlavaForConditionalGeneration:
    """A llava-hf model over ``TINY_LM`` (16 px images, ``<image>`` id 96)."""
    vision = CLIPVisionConfig(
        image_size=16, patch_size=4, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4
    )
    config = LlavaConfig(
        vision_config=vision, text_config=LlamaConfig(**TINY_LM), image_token_index=96, vision_feature_layer=-2
    )
    return LlavaForConditionalGeneration(config)


def word_tokenizer(with_image: bool):
    """WordLevel tokenizer over ``w0..w39`` (+ ``<image>`` as id 44 when asked), whitespace split."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    if with_image:
        vocab["<image>"] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    if with_image:
        tok.add_special_tokens({"extra_special_tokens": ["<image>"]})
    return tok


def tiny_batch(image_id: int, *, seed: int = 0, text_only_second: bool = True) -> dict[str, torch.Tensor]:
    """Two samples of 24 tokens: sample 0 with one image (16 placeholders), sample 1 text-only (right-padded)."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(4, 44, (2, 24), generator=g)
    input_ids = text.clone()  # (B, T)
    input_ids[0, 2 : 2 + NUM_PATCHES] = image_id
    attention_mask = torch.ones_like(input_ids)
    if text_only_second:
        input_ids[1, 20:] = 3
        attention_mask[1, 20:] = 0
    else:
        input_ids[1, 4 : 4 + NUM_PATCHES] = image_id
    labels = input_ids.masked_fill(input_ids == image_id, -100).masked_fill(attention_mask == 0, -100)
    labels[:, :2] = -100
    n_images = 1 if text_only_second else 2
    pixel_values = torch.randn(n_images, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)  # (N, 3, H, W)
    return dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, labels=labels)
