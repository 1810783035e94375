"""Fixtures for the model tests: tiny configs, a WordLevel tokenizer, and saved tiny checkpoints."""

from __future__ import annotations

import pytest
import torch

IMAGE_SIZE = 32
PATCH = 8
NUM_PATCHES = (IMAGE_SIZE // PATCH) ** 2  # 16
WORDS = [f"w{i}" for i in range(40)]
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]


def llama_config_kwargs(vocab_size: int) -> dict:
    return dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=3,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )


def clip_config_kwargs() -> dict:
    return dict(
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=3,
        num_attention_heads=4,
    )


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
    """Factory of small mixed batches (see :func:`_make_batch`)."""
    return _make_batch


def _make_batch(image_id: int, *, seed: int = 0, text_only_second: bool = True):
    """Two samples of 24 tokens: sample 0 with one image (16 placeholders), sample 1 text-only (right-padded)."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(4, 44, (2, 24), generator=g)
    input_ids = text.clone()
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
    pixel_values = torch.randn(n_images, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    return dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, labels=labels)
