"""Checkpoint formats: llava-hf directories, LLaVA stage-1 ``mm_projector.bin``, and our adapter exports.

- :func:`load_llava_hf`: a ``LlavaForConditionalGeneration`` directory (e.g. ``llava-hf/llava-1.5-7b-hf``) mapped
  into :class:`LlavaMoLE` (vision tower, ``linear_1/linear_2`` projector, Llama LM and head), optionally with MoLE.
- :func:`load_projector`: LLaVA's ``mm_projector.bin`` (keys ``model.mm_projector.0.*`` / ``.2.*``), a llava-hf
  ``multi_modal_projector.linear_{1,2}.*`` dict, or a plain projector state dict, from ``.bin``/``.pt`` or
  ``.safetensors``.
- :func:`save_adapters` / :func:`load_adapters`: what training changes (the parameters that require grad:
  LoRA/experts/routers, projector, trainable new embedding rows, any tensor trained by hand) as
  ``adapter_model.safetensors`` + ``adapter_config.json``, loaded onto a base model.

Files are read with ``safetensors`` or ``torch.load(weights_only=True)``; custom code runs only with
``trust_remote_code=True``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM

from mole_lightning.models.llava_mole import LlavaMoLE
from mole_lightning.models.projector import MLPProjector, projector_name
from mole_lightning.models.trainable import load_trained_state, trainable_state_dict
from mole_lightning.models.vision import HFVisionTower
from mole_lightning.peft import MoLEConfig
from mole_lightning.tokenization import load_tokenizer, require_local_path

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"
_PROJECTOR_PREFIXES = (
    "model.mm_projector.",  # LLaVA stage 1 (mm_projector.bin)
    "mm_projector.",
    "model.multi_modal_projector.",  # llava-hf
    "multi_modal_projector.",
    "model.projector.",  # our training checkpoints (stage 1: configs/llava_pretrain_projector.yaml)
    "projector.",  # our exports
)
_HF_PROJECTOR_KEYS = {"linear_1": "0", "linear_2": "2"}


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file, or of a torch pickle read with ``weights_only=True``.

    Raises:
        FileNotFoundError: no such file.
    """
    path = str(path)
    if not os.path.isfile(os.path.expanduser(path)):
        raise FileNotFoundError(f"weights file {path!r} does not exist")
    path = os.path.expanduser(path)
    if path.endswith(".safetensors"):
        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return state


def projector_state_dict_from(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Projector tensors of a LLaVA / llava-hf state dict, renamed to :class:`MLPProjector` / ``nn.Linear`` keys.

    Keys under ``[model.]mm_projector.``, ``[model.]multi_modal_projector.`` or ``[model.]projector.`` are kept (other
    keys of a full checkpoint are dropped); a dict without any of these prefixes is taken as a projector state
    dict. llava-hf's ``linear_1`` / ``linear_2`` become ``0`` / ``2``.
    """
    prefixed = any(k.startswith(p) for k in state for p in _PROJECTOR_PREFIXES)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if prefixed:
            prefix = next((p for p in _PROJECTOR_PREFIXES if key.startswith(p)), None)
            if prefix is None:
                continue
            key = key[len(prefix) :]
        head, _, rest = key.partition(".")
        if rest and head in _HF_PROJECTOR_KEYS:
            key = f"{_HF_PROJECTOR_KEYS[head]}.{rest}"
        out[key] = value
    return out


def load_projector(projector: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load projector weights in place (LLaVA ``mm_projector.bin``, llava-hf names, or our own keys).

    Args:
        projector: a projector from :func:`~mole_lightning.models.projector.build_projector`.
        path: ``.bin``/``.pt`` (``torch.load(weights_only=True)``) or ``.safetensors`` file.

    Raises:
        ValueError: one line naming the file and its missing, unexpected or mis-shaped keys.
    """
    state = projector_state_dict_from(read_state_dict(path))
    ref = projector.state_dict()
    missing, unexpected = sorted(set(ref) - set(state)), sorted(set(state) - set(ref))
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(ref[k].shape)}"
        for k in ref
        if k in state and state[k].shape != ref[k].shape
    ]
    if missing or unexpected or shapes:
        problems = [f"missing {missing}"] * bool(missing) + [f"unexpected {unexpected[:6]}"] * bool(unexpected)
        problems += [f"shapes (file vs projector): {shapes}"] * bool(shapes)
        raise ValueError(f"projector file {str(path)!r} does not fit the {projector_name(projector)} projector: "
                         + "; ".join(problems))  # fmt: skip
    projector.load_state_dict({k: v.to(ref[k].dtype) for k, v in state.items()}, strict=True)
    return projector


def load_llava_hf(
    path: str | os.PathLike,
    mole: Any = None,
    *,
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    prune_vision: bool = True,
    adapter: str | os.PathLike | None = None,
) -> LlavaMoLE:
    """Our model from a llava-hf ``LlavaForConditionalGeneration`` checkpoint directory.

    The vision tower (CLIP/SigLIP), projector (``linear_1 → gelu → linear_2``), Llama decoder and ``lm_head`` are
    taken over unchanged; the tokenizer (if the directory has one) is attached as ``model.tokenizer`` and ``path``
    as ``model.base_model_name_or_path``. Requires a single integer ``vision_feature_layer`` and
    ``projector_hidden_act="gelu"``.

    Args:
        path: checkpoint directory (or hub id), old (``language_model.model.*``) or new key layout.
        mole: a ``MoLEConfig`` (or its dict) to apply to the LLM; ``None`` keeps it unadapted (projector trainable).
        dtype: weight dtype (``None``: float32).
        attn_implementation: LLM attention backend.
        trust_remote_code: allow custom code from the directory.
        prune_vision: drop vision layers after the feature layer.
        adapter: a ``mole`` adapter export folder to load on top (:func:`load_adapters`; applies its MoLE config).
    """
    from transformers import LlavaForConditionalGeneration  # heavy: loads transformers.modeling_utils

    path = require_local_path(str(path), "llava-hf folder")
    if adapter is not None:
        require_local_path(str(adapter), "adapter folder")
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    hf = LlavaForConditionalGeneration.from_pretrained(str(path), **kwargs)
    config = hf.config
    if not isinstance(config.vision_feature_layer, int):
        raise NotImplementedError(f"vision_feature_layer lists are not supported, got {config.vision_feature_layer}")
    if config.projector_hidden_act != "gelu":
        raise NotImplementedError(f"projector_hidden_act {config.projector_hidden_act!r} is not supported")

    tower = HFVisionTower(
        hf.model.vision_tower,
        feature_layer=config.vision_feature_layer,
        keep_cls=config.vision_feature_select_strategy == "full",
        prune=prune_vision,
    )
    hf_proj = hf.model.multi_modal_projector
    projector = MLPProjector(
        hf_proj.linear_1.in_features, hf_proj.linear_1.out_features, 2, bias=hf_proj.linear_1.bias is not None
    )
    projector[0] = hf_proj.linear_1
    projector[2] = hf_proj.linear_2

    text_config = config.text_config
    with torch.device("meta"):
        language_model = AutoModelForCausalLM.from_config(text_config, trust_remote_code=trust_remote_code)
    base_prefix = language_model.base_model_prefix  # "model" for Llama
    setattr(language_model, base_prefix, hf.model.language_model)
    language_model.lm_head = hf.lm_head
    language_model.generation_config = hf.generation_config
    language_model.config = hf.model.language_model.config
    meta = [n for n, t in language_model.state_dict().items() if t.device.type == "meta"]
    if meta:
        raise RuntimeError(f"tensors left uninitialised while mapping the llava-hf checkpoint: {meta[:5]}")
    del hf

    model = LlavaMoLE(tower, projector, language_model, image_token_id=config.image_token_id)
    model.tokenizer = _maybe_tokenizer(str(path), trust_remote_code)
    model.base_model_name_or_path = str(path)
    if mole is not None:
        model.apply_mole(_mole_config(mole))
    if adapter is not None:
        load_adapters(model, adapter)
    return model


def _maybe_tokenizer(path: str, trust_remote_code: bool) -> Any:
    """The folder's prepared tokenizer, or ``None`` when it holds none."""
    try:
        return load_tokenizer(path, trust_remote_code=trust_remote_code)
    except ValueError:
        return None


def _mole_config(mole: Any) -> Any:
    if isinstance(mole, MoLEConfig):
        return mole
    if isinstance(mole, dict):
        return MoLEConfig.from_dict(mole)
    raise TypeError(f"expected a MoLEConfig or dict, got {type(mole).__name__}")


def save_adapters(
    model: LlavaMoLE, directory: str | os.PathLike, *, base_model_name_or_path: str | None = None
) -> Path:
    """Write ``adapter_model.safetensors`` (:func:`trainable_state_dict`) and ``adapter_config.json``.

    The config records the ``MoLEConfig``, projector type, image token id, first trainable token row, the
    vision feature layer and the llava-hf base the adapters belong to (``base_model_name_or_path``, ``None`` when
    the base is rebuilt otherwise), so that :func:`load_adapters` can rebuild the adapted model on the same base.

    Returns:
        The directory.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(trainable_state_dict(model), str(directory / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
    meta = {
        "format": "mole",
        "base_model_name_or_path": base_model_name_or_path,
        "mole": dataclasses.asdict(model.mole_config) if model.mole_config is not None else None,
        "projector_type": projector_name(model.projector),
        "image_token_id": model.image_token_id,
        "token_row_start": model.token_row_start,
        "feature_layer": getattr(model.vision_tower, "feature_layer", None),
    }
    (directory / ADAPTER_CONFIG_NAME).write_text(json.dumps(meta, indent=2))
    return directory


def read_adapter_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The ``adapter_config.json`` of an adapter folder (ours or peft's).

    Raises:
        FileNotFoundError: the folder or its ``adapter_config.json`` does not exist.
    """
    if not Path(directory).expanduser().exists():
        raise FileNotFoundError(f"adapter folder {str(directory)!r} does not exist")
    path = Path(directory).expanduser() / ADAPTER_CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{str(directory)!r} holds no {ADAPTER_CONFIG_NAME}; is it an adapter export?")
    return json.loads(path.read_text())


def load_adapters(model: LlavaMoLE, directory: str | os.PathLike) -> LlavaMoLE:
    """Load an adapter export onto a base model built from the same LLM, tower and projector type.

    Applies MoLE with the saved config if the model has none yet, then loads every tensor of the export by
    parameter name (:func:`~mole_lightning.models.trainable.load_trained_state`): adapters, routers, projector,
    trainable token rows and tensors trained by hand.

    Raises:
        ValueError: a mismatch between the export and the base (projector type, image token, MoLE config, missing,
            unexpected or mis-shaped tensors).
    """
    directory = Path(directory)
    meta = read_adapter_config(directory)
    if meta.get("peft_type") is not None:
        raise ValueError(f"{str(directory)!r} is a peft adapter folder; load it with peft.PeftModel.from_pretrained")
    state = load_file(str(directory / ADAPTER_WEIGHTS_NAME))
    if meta["projector_type"] != projector_name(model.projector):
        raise ValueError(
            f"adapter projector is {meta['projector_type']!r}, base has {projector_name(model.projector)!r}"
        )
    if meta["image_token_id"] != model.image_token_id:
        raise ValueError(f"adapter image token id is {meta['image_token_id']}, base has {model.image_token_id}")
    if meta["mole"] is not None:
        config = _mole_config(meta["mole"])
        if model.mole_config is None:
            model.apply_mole(config)
        elif dataclasses.asdict(model.mole_config) != dataclasses.asdict(config):
            raise ValueError(f"base model already has a different MoLE config: {model.mole_config} vs {config}")
    start = meta.get("token_row_start")
    if start is not None:
        model.train_new_token_rows(start)
        for name, weight in zip(("input", "output"), model.embedding_weights()):
            rows = state[f"token_rows.{name}"]
            if weight.shape[0] != start + rows.shape[0]:
                raise ValueError(f"embedding has {weight.shape[0]} rows, adapter expects {start + rows.shape[0]}")
    try:
        load_trained_state(model, state)
    except ValueError as error:
        raise ValueError(f"adapter export {str(directory)!r} does not fit the model: {error}") from None
    return model
