"""Keyword-only builders that assemble a :class:`LlavaMoLE` from names, paths or configs, and the presets.

- :func:`build_language_model`: a transformers causal LM from a directory (``AutoModelForCausalLM``) or a config,
  optionally with a 4-bit bitsandbytes base (QLoRA).
- :func:`resize_embeddings`: the LM embeddings grow only when the tokenizer (prepared by
  :mod:`mole_lightning.tokenization`: ``<image>`` added, pad = unk) outgrows them.
- :func:`build_vision_tower`: ``open_clip`` or transformers CLIP/SigLIP tower.
- :func:`build_llava_mole`: the whole model (optionally a stage-1 ``mm_projector.bin`` and MoLE adapters).
- :func:`build_preset`: ``"tiny"`` (random weights, CPU, seconds) and ``"llava-1.5-7b"`` (vicuna-7b-v1.5 +
  CLIP ViT-L/14-336 + ``mlp2x_gelu``, MoLE K=3, r=32, alpha=64).
"""

from __future__ import annotations

import copy
import os
import warnings
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig

from mole_lightning.constants import DEFAULT_IMAGE_TOKEN
from mole_lightning.models import sharded_loading
from mole_lightning.models.llava_mole import LlavaMoLE
from mole_lightning.models.loading import load_projector
from mole_lightning.models.projector import build_projector
from mole_lightning.models.vision import VisionTower, tower_kind
from mole_lightning.peft import MoLEConfig
from mole_lightning.peft.quantization import check_quantize, quantize_linears, require_bitsandbytes
from mole_lightning.tokenization import (
    load_tokenizer,
    prepare_tokenizer,
    require_local_path,
    resize_embeddings,
    tiny_tokenizer,
)

VisionKind = str
"""A registered tower kind (``mole_lightning.models.vision.VISION_TOWERS``: ``"hf"``, ``"open_clip"``...)."""

TINY_LLAMA_CONFIG: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
"""Tiny Llama (vocabulary size comes from the tokenizer)."""

TINY_CLIP_VISION_CONFIG: dict[str, Any] = dict(
    model_type="clip_vision_model",
    image_size=32,
    patch_size=8,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
)
"""Tiny transformers CLIP vision tower: 32 px images, 16 patches."""

TINY_OPEN_CLIP_CONFIG: dict[str, Any] = dict(
    embed_dim=32,
    vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=3, head_width=8),
    text_cfg=dict(context_length=16, vocab_size=64, width=32, heads=4, layers=1),
)
"""Tiny ``open_clip`` model config: 32 px images, 16 patches, width 32."""


def bitsandbytes_config(quantize: str, compute_dtype: torch.dtype | None = None) -> Any:
    """transformers' ``BitsAndBytesConfig`` for ``from_pretrained(path, quantization_config=...)``: 4-bit
    ``quantize`` codes with double quantisation, the base matmul in ``compute_dtype`` (``None``: float32)."""
    check_quantize(quantize)
    require_bitsandbytes()
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantize,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype or torch.float32,
    )


def build_language_model(
    *,
    path: str | None = None,
    config: Any = None,
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    quantize: str | None = None,
) -> nn.Module:
    """A transformers causal LM (Llama family) from a directory or a config (random init).

    Args:
        path: directory (or hub id) for ``AutoModelForCausalLM.from_pretrained``.
        config: a ``PretrainedConfig`` or a dict of ``LlamaConfig`` fields, used when ``path`` is ``None``.
        dtype: weight dtype (``None``: the checkpoint's / float32).
        attn_implementation: ``"sdpa"``, ``"eager"``, ``"flash_attention_2"``… (``None``: transformers' default).
        trust_remote_code: allow custom modeling code from the directory.
        quantize: ``"nf4"`` or ``"fp4"``: every ``nn.Linear`` but the LM head becomes a frozen bitsandbytes
            ``Linear4bit`` (double quantisation, matmul in ``dtype``, float32 when unset). From a directory through
            ``from_pretrained(path, quantization_config=BitsAndBytesConfig(...))`` (on the current CUDA device when
            there is one, else on CPU); from a config by :func:`~mole_lightning.peft.quantization.quantize_linears`
            after building.
    """
    check_quantize(quantize)
    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if path is not None:
        path = require_local_path(path, "LLM folder")
        if quantize is not None:
            kwargs["quantization_config"] = bitsandbytes_config(quantize, dtype)
        return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    if config is None:
        raise ValueError("build_language_model needs `path` or `config`")
    if isinstance(config, dict):
        config = LlamaConfig(**config)
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, **kwargs)
    if quantize is not None:
        quantize_linears(model, quantize, compute_dtype=dtype or torch.float32)
    return model


def build_vision_tower(
    *,
    kind: VisionKind = "hf",
    name_or_path: str | None = None,
    pretrained: str | None = None,
    config: dict[str, Any] | None = None,
    feature_layer: int = -2,
    dtype: torch.dtype | None = None,
) -> VisionTower:
    """A frozen vision tower.

    Args:
        kind: a registered tower kind: ``"hf"`` (transformers CLIP/SigLIP) or ``"open_clip"`` by default.
        name_or_path: ``"hf"``: directory or hub id of the checkpoint; ``"open_clip"``: architecture name
            (``"ViT-L-14-336"``).
        pretrained: ``"open_clip"`` only: a tag (``"openai"``), a local file, or ``None`` for random weights.
        config: random-init config instead of a checkpoint: ``"hf"``: ``CLIPVisionConfig`` fields (``model_type``
            ``"siglip_vision_model"`` for SigLIP); ``"open_clip"``: an ``open_clip`` model config dict.
        feature_layer: layer whose features are used (``-2``: LLaVA-1.5).
        dtype: weight dtype.
    """
    return tower_kind(kind).build(name_or_path, pretrained, config, feature_layer, dtype)


def build_llava_mole(
    *,
    llm_path: str | None = None,
    llm_config: dict[str, Any] | None = None,
    tokenizer: Any = None,
    vision: VisionKind = "hf",
    vision_name_or_path: str | None = None,
    vision_pretrained: str | None = None,
    vision_config: dict[str, Any] | None = None,
    feature_layer: int = -2,
    projector: str = "mlp2x_gelu",
    projector_path: str | None = None,
    mole: Any = None,
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
    image_token: str = DEFAULT_IMAGE_TOKEN,
    train_new_token_rows: bool = False,
    pad_to_multiple_of: int | None = None,
    trust_remote_code: bool = False,
    frozen_on_meta: bool = False,
    quantize: str | None = None,
) -> LlavaMoLE:
    """Assemble vision tower, projector and (MoLE-adapted) LLM.

    The tokenizer (with ``image_token`` added) is attached as ``model.tokenizer``.

    Args:
        llm_path: LLM directory or hub id (``AutoModelForCausalLM``); its tokenizer is loaded from there too.
        llm_config: ``LlamaConfig`` fields for a random LLM when ``llm_path`` is ``None`` (``vocab_size`` defaults
            to the tokenizer's size). Beside an ``llm_path`` it is ignored, with a warning saying so: the folder's
            weights and config win (a recipe's ``llm_config`` of a tiny preset under ``--model.architecture.llm_path``).
        tokenizer: a tokenizer object or a tokenizer directory; default: from ``llm_path``, or the byte-level
            :func:`tiny_tokenizer` for a config-built LLM.
        vision: ``"hf"`` (transformers CLIP/SigLIP) or ``"open_clip"``.
        vision_name_or_path: HF directory/hub id, or ``open_clip`` architecture name.
        vision_pretrained: ``open_clip`` pretrained tag or file.
        vision_config: random-init vision config (see :func:`build_vision_tower`).
        feature_layer: vision layer used (``-2``: LLaVA-1.5).
        projector: ``"mlp2x_gelu"``, ``"mlp{N}x_gelu"``, ``"linear"`` or ``"identity"``.
        projector_path: LLaVA stage-1 ``mm_projector.bin`` (or safetensors) to initialise the projector.
        mole: a ``MoLEConfig`` (or its dict) to adapt the LLM with; ``None`` trains the projector only (stage 1).
        dtype: dtype of the frozen LLM and tower (``None``: float32); trained tensors (projector, adapters,
            routers, added token rows) are fp32 master weights that compute in their input's dtype.
        attn_implementation: LLM attention backend.
        image_token: image placeholder token.
        train_new_token_rows: train the embedding (and head) rows added for new tokens, as parameters of their own
            (``LlavaMoLE.train_new_token_rows``).
        pad_to_multiple_of: round the resized vocabulary up (e.g. 64) when tokens are added.
        trust_remote_code: allow custom code from model/tokenizer directories.
        frozen_on_meta: build the LLM (from an ``llm_path`` folder) and the HF tower (from a
            ``vision_name_or_path`` folder) with their parameters on the meta device, to be sharded and loaded by
            :func:`~mole_lightning.models.sharded_loading.shard_and_load` (``model.weight_sources`` says where each
            comes from). Everything else, random draws included, is built as without it.
        quantize: ``"nf4"`` (QLoRA) or ``"fp4"``: the LLM's linear layers (not the LM head, the vision tower or the
            projector) as frozen 4-bit bitsandbytes weights (see :func:`build_language_model`); the adapters run
            over them unchanged. Not with ``frozen_on_meta``.
    """

    if check_quantize(quantize) is not None and frozen_on_meta:
        raise ValueError(
            f"quantize={quantize!r} cannot be combined with frozen_on_meta (sharded loading for FSDP2): a 4-bit base "
            "is not sharded; train it on one device or with DDP"
        )
    for path, what in ((llm_path, "LLM folder"), (projector_path, "projector file")):
        if path is not None:
            require_local_path(path, what)
    if vision == "hf" and vision_name_or_path is not None:
        require_local_path(vision_name_or_path, "vision tower folder")
    if tokenizer is None and llm_path is not None:
        tokenizer = llm_path
    if isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer, image_token, trust_remote_code)
    elif tokenizer is None:
        tokenizer = tiny_tokenizer(image_token=image_token)
    else:
        prepare_tokenizer(tokenizer, image_token)
    image_token_id = int(tokenizer.convert_tokens_to_ids(image_token))

    if llm_path is not None and llm_config is not None:
        warnings.warn(
            f"llm_path {llm_path!r} is loaded with its own config; llm_config (fields of a random LLM) is ignored",
            stacklevel=2,
        )
        llm_config = None
    if llm_path is None and llm_config is not None:
        llm_config = {"vocab_size": len(tokenizer), **llm_config}
        llm_config.setdefault("pad_token_id", tokenizer.pad_token_id)
        llm_config.setdefault("bos_token_id", tokenizer.bos_token_id)
        llm_config.setdefault("eos_token_id", tokenizer.eos_token_id)
    sources: dict[int, sharded_loading.WeightSource] = {}
    if frozen_on_meta and llm_path is not None and os.path.isdir(llm_path):
        language_model = sharded_loading.meta_language_model(
            llm_path,
            sources,
            dtype=dtype,
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
        )
        first_new_row = sharded_loading.resize_meta_embeddings(
            language_model, tokenizer, sources, pad_to_multiple_of=pad_to_multiple_of
        )
    else:
        language_model = build_language_model(
            path=llm_path,
            config=llm_config,
            dtype=dtype,
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
            quantize=quantize,
        )
        first_new_row = resize_embeddings(language_model, tokenizer, pad_to_multiple_of=pad_to_multiple_of)

    if frozen_on_meta and vision == "hf" and vision_name_or_path is not None and os.path.isdir(vision_name_or_path):
        tower = sharded_loading.meta_vision_tower(
            vision_name_or_path, sources, feature_layer=feature_layer, dtype=dtype
        )
    else:
        tower = build_vision_tower(
            kind=vision,
            name_or_path=vision_name_or_path,
            pretrained=vision_pretrained,
            config=vision_config,
            feature_layer=feature_layer,
            dtype=dtype,
        )
    lm_hidden = language_model.get_input_embeddings().weight.shape[1]
    proj = build_projector(projector, in_dim=tower.hidden_size, out_dim=lm_hidden).float()  # trained: fp32 masters
    if projector_path is not None:
        load_projector(proj, projector_path)

    model = LlavaMoLE(tower, proj, language_model, image_token_id=image_token_id, projector_type=projector)
    model.tokenizer = tokenizer
    model.weight_sources = sources
    if mole is not None:
        if isinstance(mole, dict):
            mole = MoLEConfig(**mole)
        model.apply_mole(mole)
    if train_new_token_rows and len(tokenizer) > first_new_row:
        model.train_new_token_rows(first_new_row)
    return model


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        llm_config=TINY_LLAMA_CONFIG,
        vision="hf",
        vision_config=TINY_CLIP_VISION_CONFIG,
        projector="mlp2x_gelu",
        mole=dict(num_experts=3, rank=8, alpha=16.0, dropout=0.0, balance_coef=0.01),
    ),
    "llava-1.5-7b": dict(
        llm_path="lmsys/vicuna-7b-v1.5",
        vision="hf",
        vision_name_or_path="openai/clip-vit-large-patch14-336",
        feature_layer=-2,
        projector="mlp2x_gelu",
        mole=dict(num_experts=3, rank=32, alpha=64.0, dropout=0.05, balance_coef=0.01),
        dtype=torch.bfloat16,
    ),
}
"""Named argument sets of :func:`build_llava_mole`."""


def preset_kwargs(name: str | None, *, vision: VisionKind | None = None, **overrides: Any) -> dict[str, Any]:
    """:func:`build_llava_mole` arguments of preset ``name`` (``None``: none) with ``overrides`` on top.

    ``vision`` switches the tower kind: the tiny preset gets the tiny config of that kind (:data:`TINY_OPEN_CLIP_CONFIG`
    or :data:`TINY_CLIP_VISION_CONFIG`, unless ``vision_config`` is overridden), the 7B preset ViT-L/14-336 of that
    kind. An ``llm_path`` without an ``llm_config`` replaces the preset's random LLM.

    Raises:
        ValueError: an unknown preset.
    """
    kwargs: dict[str, Any] = {}
    if name is not None:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
        kwargs = copy.deepcopy(PRESETS[name])
    if vision is not None and vision != kwargs.get("vision", "hf"):
        kwargs["vision"] = vision
        if name == "tiny":
            kwargs["vision_config"] = TINY_OPEN_CLIP_CONFIG if vision == "open_clip" else TINY_CLIP_VISION_CONFIG
        elif name is not None:
            kwargs.pop("vision_name_or_path", None)
            if vision == "open_clip":
                kwargs.update(vision_name_or_path="ViT-L-14-336-quickgelu", vision_pretrained="openai")
    elif vision is not None:
        kwargs["vision"] = vision
    if overrides.get("llm_path") is not None and "llm_config" not in overrides:
        kwargs.pop("llm_config", None)  # the folder replaces the preset's random LLM
    kwargs.update(copy.deepcopy(overrides))
    return kwargs


def build_preset(
    name: str,
    *,
    tokenizer: Any = None,
    vision: VisionKind | None = None,
    mole: Any = "preset",
    **overrides: Any,
) -> LlavaMoLE:
    """Build a preset, with any :func:`build_llava_mole` argument overridden.

    Both presets use a switch balance loss with coefficient 0.01 (pass ``mole=`` to change any MoLE setting).
    ``"tiny"``: random 2-layer Llama (hidden 64) + tiny CLIP (32 px, patch 8, 16 tokens) + ``mlp2x_gelu`` + MoLE
    K=3, r=8; byte-level tokenizer unless ``tokenizer`` names one. ``vision="open_clip"`` switches to a tiny
    ``open_clip`` tower. ``"llava-1.5-7b"``: ``lmsys/vicuna-7b-v1.5`` + ``openai/clip-vit-large-patch14-336``
    (layer -2) + ``mlp2x_gelu`` + MoLE K=3, r=32, alpha=64, dropout 0.05, bf16 (pass a stage-1
    ``projector_path``; local directories work in place of hub ids).

    Args:
        name: ``"tiny"`` or ``"llava-1.5-7b"``.
        tokenizer: tokenizer object or directory (tiny: the LLM vocabulary follows its size).
        vision: override the tower kind (:func:`preset_kwargs`).
        mole: ``"preset"`` keeps the preset's MoLE config; ``None`` builds without adapters; or a ``MoLEConfig``.
        **overrides: other :func:`build_llava_mole` arguments.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
    if mole != "preset":
        overrides["mole"] = mole
    kwargs = preset_kwargs(name, vision=vision, **overrides)
    if tokenizer is not None:
        kwargs["tokenizer"] = tokenizer
    return build_llava_mole(**kwargs)
