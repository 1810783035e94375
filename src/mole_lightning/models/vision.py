"""Frozen vision towers with one protocol: pixels ``(B, 3, H, W)`` in, patch features ``(B, N, D)`` out.

Both towers return the hidden states of one transformer layer (LLaVA-1.5 uses the second to last, ``-2``) before
the final layer norm, with the CLS token dropped where the encoder has one, exactly as LLaVA's ``"default"``
feature selection. Layers after the selected one are removed from memory; so is the text tower of a CLIP model.

- :class:`OpenCLIPVisionTower`: an ``open_clip`` model (``model_name`` + ``pretrained`` tag or file), features from
  ``visual.forward_intermediates``.
- :class:`HFVisionTower`: a transformers ``CLIPVisionModel`` or ``SiglipVisionModel`` (from a directory or a
  config), features from ``hidden_states``.

A tower is always frozen: every parameter has ``requires_grad=False``, it stays in eval mode when its parent is put
in train mode, and its forward runs under ``torch.no_grad()``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, CLIPVisionConfig, SiglipVisionConfig

from mole_lightning.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, SIGLIP_MEAN_STD
from mole_lightning.tokenization import require_local_path


def _absolute_layer(layer: int, num_layers: int) -> int:
    """Index of ``layer`` among the ``num_layers`` blocks (0-based block index, negative counts from the end)."""
    index = layer if layer >= 0 else num_layers + layer
    if not 0 <= index < num_layers:
        raise ValueError(f"feature_layer={layer} is out of range for a vision encoder with {num_layers} blocks")
    return index


class VisionTower(nn.Module):
    """Common protocol of the frozen vision towers.

    Attributes:
        hidden_size: D, width of the returned features.
        num_patches: N, features per image (= placeholder tokens per image in ``input_ids``).
        image_size: side of the square input the tower expects, in pixels.
        image_mean: per-channel normalisation mean of the pixel values.
        image_std: per-channel normalisation std of the pixel values.
    """

    hidden_size: int
    num_patches: int
    image_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]

    def freeze(self) -> None:
        """Set ``requires_grad=False`` on every parameter and switch to eval mode."""
        for param in self.parameters():
            param.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> VisionTower:
        """Ignore ``mode``: the tower is frozen and always runs in eval mode (no dropout, fixed norms)."""
        return super().train(False)

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the tower's weights; pixel values are cast to it."""
        return next(self.parameters()).dtype

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patch features of the selected layer, CLS dropped. Subclasses implement this (no grad handling)."""
        raise NotImplementedError

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Encode images.

        Args:
            pixel_values: normalised images, shape ``(B, 3, image_size, image_size)``.

        Returns:
            Features of shape ``(B, num_patches, hidden_size)`` in the tower's dtype, without grad.
        """
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must have shape (B, 3, H, W), got {tuple(pixel_values.shape)}")
        with torch.no_grad():
            out = self.features(pixel_values.to(self.dtype))  # (B, N, D)
        if out.shape[1] != self.num_patches:
            raise RuntimeError(
                f"vision tower returned {out.shape[1]} features per image but num_patches is {self.num_patches}; "
                f"pixel_values must be {self.image_size}x{self.image_size}, got {tuple(pixel_values.shape[-2:])}"
            )
        return out


class OpenCLIPVisionTower(VisionTower):
    """Image encoder of an ``open_clip`` ViT, returning the patch tokens of one block.

    features = blocks[: L + layer + 1](ln_pre(patch_embed(x) + pos))[:, 1:]  for ``layer < 0``, with L blocks,
    i.e. ``visual.forward_intermediates(x, indices=[layer], output_fmt="NLC")``, pre ``ln_post``, CLS dropped.
    Shapes: ``(B, 3, S, S)`` → ``(B, (S / p)^2, width)``.

    Args:
        model_name: an ``open_clip`` architecture name (``"ViT-L-14-336"``), ``"hf-hub:org/repo"`` or
            ``"local-dir:/path"``. Ignored when ``model_cfg`` is given.
        pretrained: a pretrained tag (``"openai"``), a local checkpoint file, or ``None`` for random init.
        feature_layer: block whose output is returned; ``-2`` (LLaVA-1.5) is the second to last.
        model_cfg: an ``open_clip`` model config dict (``embed_dim``, ``vision_cfg``, ``text_cfg``, optional
            ``quick_gelu``) used instead of a registered name; ``pretrained`` must then be a file or ``None``.
        dtype: dtype of the weights (``None`` keeps float32).
    """

    def __init__(
        self,
        model_name: str = "ViT-L-14-336",
        pretrained: str | None = None,
        *,
        feature_layer: int = -2,
        model_cfg: dict[str, Any] | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        import open_clip  # heavy (~0.7 s): only open_clip towers need it

        if model_cfg is not None:
            cfg = dict(model_cfg)
            cfg.pop("custom_text", None)
            clip = open_clip.CLIP(**cfg)
            if pretrained:
                open_clip.load_checkpoint(clip, pretrained, strict=True, weights_only=True)
            size = clip.visual.image_size
            mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
        else:
            clip = open_clip.create_model(model_name, pretrained=pretrained, weights_only=True)
            pp = getattr(clip.visual, "preprocess_cfg", {}) or {}
            size = clip.visual.image_size
            mean = tuple(pp.get("mean", OPENAI_CLIP_MEAN))
            std = tuple(pp.get("std", OPENAI_CLIP_STD))
        visual = clip.visual
        del clip  # drops the text tower
        num_blocks = len(visual.transformer.resblocks)
        self.feature_index = _absolute_layer(feature_layer, num_blocks)
        visual.prune_intermediate_layers(indices=[self.feature_index], prune_head=True)  # drops unused blocks
        self.visual = visual
        if dtype is not None:
            self.visual.to(dtype)

        self.feature_layer = feature_layer
        self.hidden_size = visual.transformer.width
        grid = visual.grid_size
        self.num_patches = grid[0] * grid[1]
        self.image_size = size[0] if isinstance(size, (tuple, list)) else int(size)
        self.image_mean = tuple(float(m) for m in mean)
        self.image_std = tuple(float(s) for s in std)
        self.freeze()

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patch tokens of block ``feature_layer``, shape ``(B, N, D)``."""
        out = self.visual.forward_intermediates(
            pixel_values, indices=[self.feature_index], output_fmt="NLC", intermediates_only=True
        )
        return out["image_intermediates"][0]  # (B, N, D), CLS already split off


class HFVisionTower(VisionTower):
    """A transformers ``CLIPVisionModel`` / ``SiglipVisionModel`` returning ``hidden_states[feature_layer]``.

    ``hidden_states`` holds the embeddings followed by the output of each of the L encoder layers, so
    ``feature_layer=-2`` is the output of layer L-1 before any final norm. CLIP's CLS token is dropped (LLaVA's
    ``"default"`` strategy); SigLIP has none. Encoder layers after the selected one are removed (unless
    ``prune=False``), which leaves the selected features unchanged.
    Shapes: ``(B, 3, S, S)`` → ``(B, (S / p)^2, hidden_size)``.

    Args:
        model: the vision model (``CLIPVisionModel`` or ``SiglipVisionModel``).
        feature_layer: index into ``hidden_states``; ``-2`` (LLaVA-1.5) is the second to last layer's output.
        prune: remove encoder layers (and the pooling head) that the selected features do not depend on.
        keep_cls: keep CLS (LLaVA's ``"full"`` strategy, N + 1 features) instead of dropping it.
    """

    def __init__(
        self, model: nn.Module, *, feature_layer: int = -2, prune: bool = True, keep_cls: bool = False
    ) -> None:
        super().__init__()
        config = model.config
        self.feature_layer = feature_layer
        has_cls = _has_cls(model)  # CLIP: CLS first; SigLIP: none
        self.num_prefix_tokens = 1 if has_cls and not keep_cls else 0
        num_layers = config.num_hidden_layers
        # hidden_states has num_layers + 1 entries (embeddings first)
        self.hidden_index = _absolute_layer(feature_layer, num_layers + 1)
        if prune:
            layers = _encoder_layers(model)
            del layers[self.hidden_index :]
            if getattr(model, "use_head", False):  # SigLIP attention-pooling head
                model.use_head = False
                del model.head
        self.model = model
        self.hidden_size = config.hidden_size
        self.image_size = int(config.image_size)
        grid = self.image_size // int(config.patch_size)
        self.num_patches = grid * grid + (1 if has_cls and keep_cls else 0)
        self.image_mean, self.image_std = hf_mean_std(config.to_dict())
        self.freeze()

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        *,
        feature_layer: int = -2,
        dtype: torch.dtype | None = None,
        siglip: bool | None = None,
        prune: bool = True,
    ) -> HFVisionTower:
        """Load a vision tower from a transformers directory (a CLIP/SigLIP vision or full model checkpoint).

        Args:
            path: local directory or hub id of a ``CLIPModel``/``CLIPVisionModel`` (or SigLIP) checkpoint.
            feature_layer: index into ``hidden_states``.
            dtype: weight dtype (``None`` keeps the checkpoint's default float32).
            siglip: force SigLIP (``True``) or CLIP (``False``); ``None`` reads ``model_type`` from the config.
            prune: remove encoder layers after the selected one.
        """
        from transformers import CLIPVisionModel, SiglipVisionModel  # heavy: loads transformers.modeling_utils

        path = require_local_path(path, "vision tower folder")
        if siglip is None:
            siglip = "siglip" in AutoConfig.from_pretrained(path).model_type
        model_cls = SiglipVisionModel if siglip else CLIPVisionModel
        kwargs = {"dtype": dtype} if dtype is not None else {}
        model = model_cls.from_pretrained(path, **kwargs)
        tower = cls(model, feature_layer=feature_layer, prune=prune)
        tower.image_mean, tower.image_std = hf_mean_std(model.config.to_dict(), path)
        return tower

    @classmethod
    def from_config(cls, config: Any, *, feature_layer: int = -2, prune: bool = True) -> HFVisionTower:
        """Randomly initialised tower from a ``CLIPVisionConfig`` / ``SiglipVisionConfig`` (or its dict form).

        Args:
            config: the vision config, or a dict with ``model_type`` ``"clip_vision_model"`` (default) or
                ``"siglip_vision_model"`` plus the config fields.
            feature_layer: index into ``hidden_states``.
            prune: remove encoder layers after the selected one.
        """
        from transformers import CLIPVisionModel, SiglipVisionModel  # heavy: loads transformers.modeling_utils

        if isinstance(config, dict):
            values = dict(config)
            model_type = values.pop("model_type", "clip_vision_model")
            config = (SiglipVisionConfig if "siglip" in model_type else CLIPVisionConfig)(**values)
        model_cls = SiglipVisionModel if "siglip" in config.model_type else CLIPVisionModel
        return cls(model_cls(config), feature_layer=feature_layer, prune=prune)

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``hidden_states[feature_layer]`` with CLS dropped, shape ``(B, N, D)``."""
        out = self.model(pixel_values=pixel_values, output_hidden_states=True)
        hidden = out.hidden_states[self.hidden_index]  # (B, prefix + N, D)
        return hidden[:, self.num_prefix_tokens :]


def _has_cls(model: nn.Module) -> bool:
    return any(name.endswith("class_embedding") for name, _ in model.named_parameters())


def _encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ``nn.ModuleList`` of encoder layers of a transformers vision model."""
    for name, module in model.named_modules():
        if name.endswith("encoder.layers") and isinstance(module, nn.ModuleList):
            return module
    raise ValueError(f"cannot find the encoder layers of {type(model).__name__}")


# ------------------------------------------------------------------------------------------------------ registry
def _pair(value: Any) -> int:
    return int(value[0]) if isinstance(value, (tuple, list)) else int(value)


def hf_mean_std(config: dict[str, Any], folder: str | None = None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Pixel mean and std of a transformers tower: its folder's ``preprocessor_config.json`` when there is one, else
    SigLIP's 0.5 for SigLIP configs and OpenAI CLIP's otherwise."""
    path = os.path.join(folder, "preprocessor_config.json") if folder else None
    if path and os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            processor = json.load(handle)
        if "image_mean" in processor and "image_std" in processor:
            return tuple(float(v) for v in processor["image_mean"]), tuple(float(v) for v in processor["image_std"])
    if "siglip" in str(config.get("model_type", "")):
        return SIGLIP_MEAN_STD, SIGLIP_MEAN_STD
    return OPENAI_CLIP_MEAN, OPENAI_CLIP_STD


@dataclass(frozen=True)
class VisionGeometry:
    """What the data pipeline must produce for a vision tower.

    Attributes:
        num_image_tokens: features (placeholder tokens) per image.
        image_size: square input side in pixels.
        image_mean: per-channel normalisation mean.
        image_std: per-channel normalisation std.
    """

    num_image_tokens: int
    image_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]


@dataclass(frozen=True)
class TowerKind:
    """A kind of vision tower: how to build it and how to read its geometry from configs alone.

    Attributes:
        build: ``build(name_or_path, pretrained, config, feature_layer, dtype) -> VisionTower``.
        geometry: ``geometry(name_or_path, config, trust_remote_code) -> VisionGeometry`` without building anything
            (the CLI links it into the DataModule before the model exists).
    """

    build: Callable[[str | None, str | None, dict[str, Any] | None, int, torch.dtype | None], VisionTower]
    geometry: Callable[[str | None, dict[str, Any] | None, bool], VisionGeometry]


VISION_TOWERS: dict[str, TowerKind] = {}
"""Tower kinds by name (``vision:`` in a model spec); add one with :func:`register_vision_tower`."""


def register_vision_tower(kind: str, spec: TowerKind) -> TowerKind:
    """Register (or replace) a tower kind: ``build_vision_tower(kind=...)`` and the geometry links then use it."""
    VISION_TOWERS[kind] = spec
    return spec


def tower_kind(kind: str) -> TowerKind:
    """The registered :class:`TowerKind` ``kind``.

    Raises:
        ValueError: an unknown kind (the message lists the registered ones).
    """
    try:
        return VISION_TOWERS[kind]
    except KeyError:
        raise ValueError(f"unknown vision tower kind {kind!r}; registered: {sorted(VISION_TOWERS)}") from None


KNOWN_HF_TOWERS: dict[str, dict[str, Any]] = {
    "openai/clip-vit-large-patch14-336": {"image_size": 336, "patch_size": 14, "model_type": "clip_vision_model"},
    "openai/clip-vit-large-patch14": {"image_size": 224, "patch_size": 14, "model_type": "clip_vision_model"},
}
"""Geometry of common towers, used when their config cannot be read (offline, before the download)."""


def _build_hf(name_or_path: str | None, pretrained: str | None, config: dict[str, Any] | None, feature_layer: int,
              dtype: torch.dtype | None) -> VisionTower:  # fmt: skip
    if name_or_path is not None:
        return HFVisionTower.from_pretrained(name_or_path, feature_layer=feature_layer, dtype=dtype)
    if config is None:
        raise ValueError("an 'hf' vision tower needs `name_or_path` or `config`")
    tower = HFVisionTower.from_config(config, feature_layer=feature_layer)
    return tower.to(dtype) if dtype is not None else tower


def _hf_geometry(name_or_path: str | None, config: dict[str, Any] | None, trust_remote_code: bool) -> VisionGeometry:
    """Tokens per image (CLS not counted), size and mean/std of a transformers tower, from its config."""
    folder = None
    if config is not None:
        fields = dict(config)
    else:
        if name_or_path is None:
            raise ValueError("an 'hf' vision tower needs vision_name_or_path or vision_config")

        try:
            loaded = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        except OSError:
            if name_or_path not in KNOWN_HF_TOWERS:
                raise
            fields = dict(KNOWN_HF_TOWERS[name_or_path])  # offline: a well-known tower's geometry
        else:
            fields = getattr(loaded, "vision_config", loaded).to_dict()
            folder = name_or_path if os.path.isdir(name_or_path) else None
    size, patch = _pair(fields.get("image_size", 224)), _pair(fields.get("patch_size", 16))
    mean, std = hf_mean_std(fields, folder)
    return VisionGeometry((size // patch) ** 2, size, mean, std)


def _build_open_clip(name_or_path: str | None, pretrained: str | None, config: dict[str, Any] | None,
                     feature_layer: int, dtype: torch.dtype | None) -> VisionTower:  # fmt: skip
    return OpenCLIPVisionTower(
        name_or_path or "ViT-L-14-336", pretrained, feature_layer=feature_layer, model_cfg=config, dtype=dtype
    )


def _open_clip_geometry(name_or_path: str | None, config: dict[str, Any] | None, _: bool) -> VisionGeometry:
    """Tokens per image (class token not counted), size and OpenAI CLIP mean/std of an ``open_clip`` tower."""
    if config is None:
        import open_clip  # heavy (~0.7 s): only open_clip towers need it

        config = open_clip.get_model_config(name_or_path or "ViT-L-14-336")
        if config is None:
            raise ValueError(f"unknown open_clip architecture {name_or_path!r}")
    vision_cfg = config["vision_cfg"]
    size, patch = _pair(vision_cfg["image_size"]), _pair(vision_cfg["patch_size"])
    return VisionGeometry((size // patch) ** 2, size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)


register_vision_tower("hf", TowerKind(_build_hf, _hf_geometry))
register_vision_tower("open_clip", TowerKind(_build_open_clip, _open_clip_geometry))


def vision_geometry(
    *, kind: str, name_or_path: str | None, config: dict[str, Any] | None, trust_remote_code: bool = False
) -> VisionGeometry:
    """Tokens per image, input size and normalisation of a registered tower kind, from configs (nothing is built)."""
    return tower_kind(kind).geometry(name_or_path, config, trust_remote_code)
