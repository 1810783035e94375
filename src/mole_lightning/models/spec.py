"""`ModelSpec`: the typed, YAML-friendly description of the model to build (a preset plus builder overrides).

The Lightning module stores a `ModelSpec` and builds the network lazily in ``configure_model``. The spec can also
tell, without building anything, how many visual tokens an image becomes and how images are normalised, so that the
CLI can link these values into the DataModule.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import torch

from mole_lightning.models.builders import build_llava_mole, preset_kwargs
from mole_lightning.models.vision import VisionGeometry, vision_geometry
from mole_lightning.peft import MoLEConfig
from mole_lightning.peft.quantization import Quantize, check_quantize

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelSpec:
    """Which model to build: a preset of ``mole_lightning.models.build_preset`` and overrides of its arguments.

    Every field left ``None`` keeps the preset's value (or ``build_llava_mole``'s default without a preset). The
    MoLE adapter configuration is not part of the spec: it is the Lightning module's ``mole`` argument.

    Attributes:
        preset: ``"tiny"``, ``"llava-1.5-7b"`` or ``None`` (only the fields below).
        llm_path: LLM directory or hub id (``AutoModelForCausalLM``).
        llm_config: ``LlamaConfig`` fields of a randomly initialised LLM (used when ``llm_path`` is unset).
        vision: a registered vision tower kind (``models.vision.VISION_TOWERS``), ``"hf"`` (transformers
            CLIP/SigLIP) or ``"open_clip"`` by default.
        vision_name_or_path: HF directory/hub id, or ``open_clip`` architecture name.
        vision_pretrained: ``open_clip`` pretrained tag or checkpoint file.
        vision_config: random-init vision config (CLIPVisionConfig fields, or an ``open_clip`` model config).
        feature_layer: vision layer whose features are used (-2 in LLaVA-1.5).
        projector: ``"mlp2x_gelu"``, ``"mlp{N}x_gelu"``, ``"linear"`` or ``"identity"``.
        projector_path: LLaVA stage-1 ``mm_projector.bin`` (or safetensors) that initialises the projector.
        dtype: weight dtype of the frozen model, ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        attn_implementation: LLM attention backend (``"sdpa"``, ``"eager"``, ``"flash_attention_2"``).
        train_new_token_rows: also train embedding rows of tokens added to the tokenizer.
        pad_to_multiple_of: round the resized vocabulary up to a multiple of this.
        trust_remote_code: allow custom code from model/tokenizer directories.
        quantize: ``"nf4"`` (QLoRA) or ``"fp4"``: the LLM's linear layers (not the LM head, vision tower or
            projector) stored as frozen 4-bit bitsandbytes weights, their matmul in ``dtype``; ``None``: no
            quantization. Not with FSDP/FSDP2 sharding.
    """

    preset: str | None = "tiny"
    llm_path: str | None = None
    llm_config: dict[str, Any] | None = None
    vision: str | None = None
    vision_name_or_path: str | None = None
    vision_pretrained: str | None = None
    vision_config: dict[str, Any] | None = None
    feature_layer: int | None = None
    projector: str | None = None
    projector_path: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    attn_implementation: str | None = None
    train_new_token_rows: bool | None = None
    pad_to_multiple_of: int | None = None
    trust_remote_code: bool = False
    quantize: Quantize | None = None

    def __post_init__(self) -> None:
        check_quantize(self.quantize)

    def builder_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``build_llava_mole``: the preset's, updated with every field that is set.

        ``mole`` is not included (it comes from the preset and is replaced by the module's ``mole`` argument).
        """
        overrides: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name in ("preset", "vision") or value is None:
                continue
            overrides[field.name] = DTYPES[value] if field.name == "dtype" else value
        return preset_kwargs(self.preset, vision=self.vision, **overrides)

    def preset_mole(self) -> dict[str, Any] | None:
        """The preset's MoLE settings (``None`` without preset or when the preset has none)."""
        return self.builder_kwargs().get("mole")

    def resolve_mole(self, mole: Any = None) -> Any:
        """The MoLE configuration to apply: ``mole`` if given, else the preset's, else ``None`` (no adapters)."""
        if mole is None:
            mole = self.preset_mole()
        return MoLEConfig.from_dict(mole) if isinstance(mole, dict) else mole

    def build(self, mole: Any = None, tokenizer: Any = None, *, seed: int = 0, frozen_on_meta: bool = False) -> Any:
        """Build the :class:`~mole_lightning.models.LlavaMoLE` with the global RNG forked and seeded by ``seed``.

        ``frozen_on_meta``: the LLM and HF tower that come from folders get their parameters on the meta device, to
        be loaded shard by shard (``build_llava_mole``'s argument).

        Raises:
            ValueError: The built tower gives another number of tokens per image than its config said (the data
                would be prepared for the wrong geometry).
        """
        kwargs = {**self.builder_kwargs(), "mole": self.resolve_mole(mole), "frozen_on_meta": frozen_on_meta}
        if tokenizer is not None:
            kwargs["tokenizer"] = tokenizer
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            model = build_llava_mole(**kwargs)
        expected = self.vision_geometry().num_image_tokens
        if model.num_image_tokens != expected:
            raise ValueError(
                f"the vision tower {kwargs.get('vision_name_or_path') or kwargs.get('vision')!r} gives "
                f"{model.num_image_tokens} tokens per image, its config said {expected}"
            )
        return model

    def vision_geometry(self) -> VisionGeometry:
        """Visual tokens per image and the image preprocessing the tower expects, read from configs only."""
        kwargs = self.builder_kwargs()
        return vision_geometry(
            kind=kwargs.get("vision", "hf"),
            name_or_path=kwargs.get("vision_name_or_path"),
            config=kwargs.get("vision_config"),
            trust_remote_code=bool(kwargs.get("trust_remote_code", False)),
        )


__all__ = ["DTYPES", "ModelSpec"]
