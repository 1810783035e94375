"""Tiny HF language models built from transformers configs (no hub)."""

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


def tiny_llava() -> LlavaForConditionalGeneration:
    vision = CLIPVisionConfig(
        image_size=16, patch_size=4, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4
    )
    config = LlavaConfig(
        vision_config=vision, text_config=LlamaConfig(**TINY_LM), image_token_index=96, vision_feature_layer=-2
    )
    return LlavaForConditionalGeneration(config)
