"""Stand-ins for the folders users bring from the hub, written offline in the hub's own formats at tiny widths.

- :func:`vicuna_tokenizer`: lmsys/vicuna-7b-v1.5's tokenizer files: a SentencePiece BPE ``tokenizer.model`` (byte
  fallback, dummy prefix, identity normalisation, split digits, unk/bos/eos = 0/1/2) + ``tokenizer_config.json``
  (``LlamaTokenizer``, ``legacy`` false or true) + ``special_tokens_map.json``; no ``tokenizer.json``, no ``<image>``.
- :func:`llama_folder`: a Llama checkpoint (``config.json`` + sharded safetensors) with that vocabulary.
- :func:`clip_336_folder`: openai/clip-vit-large-patch14-336's layout (full ``CLIPModel``, 336 px, patch 14, 576
  tokens) at width 32, with its ``preprocessor_config.json``.
- :func:`mm_projector_bin`: LLaVA stage-1 ``mm_projector.bin`` (``model.mm_projector.0/2.*``, bf16).
- :func:`llava_hf_folder`: llava-hf/llava-1.5-7b-hf's layout (``LlavaForConditionalGeneration`` + processor files
  with the chat template, ``<image>`` and ``<pad>`` appended to the vocabulary).
- :func:`qwen2_folder` / :func:`siglip_folder`: a Qwen2-style byte-level BPE ``tokenizer.json`` with a Jinja
  ``chat_template`` (no ``<image>``) + tiny Qwen2 checkpoint, and a SigLIP vision tower folder.
- :func:`smollm2_folder`: SmolLM2-Instruct's layout: the same ChatML tokenizer + a Llama with tied embeddings.

Everything is built with the formats' own libraries (``sentencepiece``, ``tokenizers``, transformers'
``save_pretrained``) so the project's loading code reads them exactly as it reads the real ones.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, "
    "and polite answers to the user's questions.",
    "USER: What is in the picture? ASSISTANT: A red square on a white background.",
    "USER: What color is the circle? ASSISTANT: It is blue. USER: How many shapes are there? ASSISTANT: 3 shapes.",
    "Is there a tumor in this scan? Answer the question using a single word or phrase. yes no",
    "Describe the document. The chart shows the sales of 2024 by month; the title reads Annual Report.",
    "Answer with the option's letter from the given choices directly. A B C D",
    "What is written on the sign? stop. Where is the cat? on the mat, next to the dog.",
    "Summarize the figure in one sentence. The line goes up from 10 to 42 percent.",
]
"""Training text of the stand-in tokenizers: the LLaVA-1.5 prompts and short answers of the three domains."""

VICUNA_CHAT_ROLES = ("USER", "ASSISTANT")

LLAVA_HF_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
"""The chat template of llava-hf/llava-1.5-7b-hf's ``chat_template.json`` (transformers' conversion script)."""

QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""Qwen2-Instruct's ChatML chat template (default system prompt when none is given)."""

TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)


def vicuna_tokenizer(out: Path, legacy: bool = False, vocab_size: int = 512) -> Path:
    """vicuna-style tokenizer folder (``tokenizer.model`` + config, no ``tokenizer.json``, no ``<image>``)."""
    import sentencepiece as spm

    out.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
    )
    (out / "tokenizer.model").write_bytes(model.getvalue())
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "clean_up_tokenization_spaces": False,
        "legacy": legacy,
        "model_max_length": 4096,
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return out


def _copy_files(source: Path, out: Path) -> None:
    for file in source.iterdir():
        (out / file.name).write_bytes(file.read_bytes())


def llama_folder(out: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """Llama checkpoint (``config.json`` + safetensors shards) whose vocabulary is ``tokenizer_dir``'s."""
    import sentencepiece as spm
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model")).get_piece_size()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, num_key_value_heads=2, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, **TINY_TEXT
    )
    LlamaForCausalLM(config).save_pretrained(out, max_shard_size="100KB")
    _copy_files(tokenizer_dir, out)
    return out


def clip_336_folder(out: Path, seed: int = 0) -> Path:
    """openai/clip-vit-large-patch14-336 layout (text + vision ``CLIPModel``, 336 px, patch 14) at width 32."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=100, bos_token_id=0, eos_token_id=1, pad_token_id=1, **TINY_VISION),
        vision_config=dict(image_size=336, patch_size=14, **TINY_VISION),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(out)
    CLIPImageProcessor(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    ).save_pretrained(out)
    return out


def mm_projector_bin(path: Path, vision_width: int, text_width: int, seed: int = 0) -> Path:
    """LLaVA stage-1 ``mm_projector.bin``: ``model.mm_projector.{0,2}.{weight,bias}`` in bf16 (``mlp2x_gelu``)."""
    generator = torch.Generator().manual_seed(seed)
    state = {
        "model.mm_projector.0.weight": torch.randn(text_width, vision_width, generator=generator) * 0.05,
        "model.mm_projector.0.bias": torch.randn(text_width, generator=generator) * 0.05,
        "model.mm_projector.2.weight": torch.randn(text_width, text_width, generator=generator) * 0.05,
        "model.mm_projector.2.bias": torch.randn(text_width, generator=generator) * 0.05,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.to(torch.bfloat16) for k, v in state.items()}, path)
    return path


def llava_hf_folder(out: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """llava-hf/llava-1.5-7b-hf layout: ``LlavaForConditionalGeneration`` (CLIP 336/14 tower, Llama text model)
    and ``LlavaProcessor`` files; the tokenizer gets ``<image>`` and ``<pad>`` after its vocabulary, as there."""
    from tokenizers import AddedToken
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=336, patch_size=14, **TINY_VISION),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer),
            num_key_value_heads=2,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
            tie_word_embeddings=False,
            **TINY_TEXT,
        ),
        image_token_id=image_id,
        image_seq_length=576,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    LlavaForConditionalGeneration(config).save_pretrained(out)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        chat_template=LLAVA_HF_CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )
    processor.save_pretrained(out)
    return out


def chatml_bpe_tokenizer(texts: list[str], vocab_size: int, model_max_length: int = 32768):
    """A byte-level BPE ``tokenizer.json`` trained on ``texts`` with ChatML special tokens (``<|endoftext|>`` pad,
    ``<|im_start|>``, ``<|im_end|>`` eos) and the ChatML ``chat_template``: the tokenizer of Qwen2 and SmolLM2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts * 20, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=specials[1:],
        model_max_length=model_max_length,
    )
    tokenizer.chat_template = QWEN2_CHAT_TEMPLATE
    return tokenizer


def qwen2_folder(out: Path, seed: int = 0, vocab_size: int = 400) -> Path:
    """Qwen2-style folder: byte-level BPE ``tokenizer.json`` with ChatML special tokens and a Jinja
    ``chat_template`` (no ``<image>``, no BOS) + a tiny ``Qwen2ForCausalLM``."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = chatml_bpe_tokenizer(CORPUS, vocab_size)
    tokenizer.save_pretrained(out)
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        num_key_value_heads=2,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        **TINY_TEXT,
    )
    Qwen2ForCausalLM(config).save_pretrained(out)
    return out


def smollm2_folder(out: Path, texts: tuple[str, ...] | list[str] = (), seed: int = 0, vocab_size: int = 600) -> Path:
    """SmolLM2-Instruct-style folder: the ChatML byte-level BPE tokenizer (trained on ``CORPUS`` + ``texts``) + a
    tiny ``LlamaForCausalLM`` with tied input/output embeddings and GQA."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = chatml_bpe_tokenizer(CORPUS + list(texts), vocab_size, model_max_length=8192)
    tokenizer.save_pretrained(out)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def siglip_folder(out: Path, seed: int = 0, image_size: int = 384, patch_size: int = 14) -> Path:
    """SigLIP layout (full ``SiglipModel``, mean/std 0.5) at width 32."""
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    torch.manual_seed(seed)
    config = SiglipConfig(
        text_config=dict(vocab_size=100, bos_token_id=0, eos_token_id=1, pad_token_id=1, **TINY_VISION),
        vision_config=dict(image_size=image_size, patch_size=patch_size, **TINY_VISION),
    )
    SiglipModel(config).save_pretrained(out)
    SiglipImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(out)
    return out
