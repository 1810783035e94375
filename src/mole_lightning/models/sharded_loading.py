"""Sharded loading: frozen weights built on the meta device, sharded, then read by each rank for its own rows only.

The unsharded path builds the whole model on every rank (``from_pretrained``) before ``fully_shard``, so every rank
briefly holds all the frozen weights. With a device mesh, :func:`~mole_lightning.models.build_llava_mole` can instead
build the LLM and the HF vision tower that come from local folders with their parameters on the meta device
(``frozen_on_meta=True``, this module), and :func:`~mole_lightning.training.sharded_loading.shard_and_load` then

1. applies ``fully_shard`` (:func:`~mole_lightning.training.strategies.fully_shard_llava_mole`),
2. allocates only the local shards (``to_empty``),
3. reads each frozen tensor's local rows straight from the safetensors files into the shard (plain file reads at the
   rows' byte offsets: no memory map, so no page of other ranks' rows enters the process),
4. copies every tensor that was built for real (adapters, routers, projector, random-init parts, buffers) into its
   shard.

Everything random (added embedding rows, projector, adapters, routers) is drawn at build time in the unsharded
path's order, on real tensors, so for a given seed the result equals the unsharded build exactly. Embedding rows
added for new tokens are computed by the same :func:`~mole_lightning.models.builders.resize_embeddings` on the full
embedding matrices read from the folder (the only tensors read in full, before anything else is loaded).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from mole_lightning.models.vision import HFVisionTower
from mole_lightning.tokenization import resize_embeddings

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Create every ``nn.Parameter`` registered inside the block on the meta device; buffers stay real.

    Buffers computed at construction (rotary frequencies, position ids) keep their values; initialisers run on meta
    tensors. The global random generator is restored when the block ends (tensors drawn before they are registered,
    such as CLIP's class embedding, would otherwise consume it), as ``from_pretrained`` leaves it untouched.
    """
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


class SafetensorsFolder:
    """The tensors of a folder's ``*.safetensors`` files (sharded with an index, or one file), read by rows.

    Args:
        path: checkpoint folder.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = str(path)
        index = os.path.join(self.path, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as handle:
                files = sorted(set(json.load(handle)["weight_map"].values()))
        else:
            files = sorted(f for f in os.listdir(self.path) if f.endswith(".safetensors"))
        if not files:
            raise FileNotFoundError(f"no safetensors weights in {self.path!r}")
        self.entries: dict[str, tuple[str, torch.dtype, tuple[int, ...], int]] = {}
        for name in files:
            file = os.path.join(self.path, name)
            with open(file, "rb") as handle:
                size = int.from_bytes(handle.read(8), "little")
                header = json.loads(handle.read(size))
            for key, info in header.items():
                if key != "__metadata__":
                    dtype = SAFETENSORS_DTYPES[info["dtype"]]
                    self.entries[key] = (file, dtype, tuple(info["shape"]), 8 + size + info["data_offsets"][0])

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of tensor ``key`` in the file."""
        return self.entries[key][2]

    def read_rows(self, key: str, start: int, out: torch.Tensor) -> None:
        """Read rows ``start : start + len(out)`` (along dim 0) of tensor ``key`` into ``out`` (cast to its dtype).

        Raises:
            KeyError: ``key`` is not in the folder.
            ValueError: the file's row shape differs from ``out``'s.
        """
        if key not in self.entries:
            raise KeyError(f"tensor {key!r} is not in the safetensors files of {self.path!r}")
        file, dtype, shape, offset = self.entries[key]
        rows = out.shape[0] if out.dim() else 1
        if tuple(shape[1:]) != tuple(out.shape[1:]) or start + rows > (shape[0] if shape else 1):
            raise ValueError(f"{key!r} in {self.path!r} has shape {shape}, cannot fill rows {start}+{rows} of "
                             f"{tuple(out.shape)}")  # fmt: skip
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        direct = out.dtype == dtype and out.is_contiguous() and out.device.type == "cpu"
        target = out if direct else torch.empty(out.shape, dtype=dtype)
        with open(file, "rb", buffering=0) as handle:
            handle.seek(offset + start * row_bytes)
            view = memoryview(target.reshape(-1).view(torch.uint8).numpy())
            done = 0
            while done < len(view):
                read = handle.readinto(view[done:])
                if not read:
                    raise OSError(f"{file!r} ended before the end of {key!r}")
                done += read
        if not direct:
            out.copy_(target)


@dataclass
class WeightSource:
    """Where a meta parameter's values come from: tensor ``key`` of ``folder``, then ``added_rows`` (rows appended
    after the file's, e.g. embedding rows of added tokens)."""

    folder: SafetensorsFolder
    key: str
    added_rows: torch.Tensor | None = None


def register_weight_sources(module: nn.Module, folder: SafetensorsFolder, sources: dict[int, WeightSource]) -> None:
    """Record the file tensor of every meta parameter of ``module``.

    The checkpoint key is the parameter's name, behind the one prefix the folder puts in front of the module's names
    (``vision_model.`` for a vision tower inside a full CLIP/SigLIP checkpoint), or without the model's
    ``base_model_prefix``.

    Raises:
        KeyError: a parameter has no tensor in the folder.
    """
    names = [name for name, param in module.named_parameters() if param.is_meta]
    outer = ""
    if names and names[0] not in folder:
        found = {key[: -len(names[0])] for key in folder.entries if key.endswith("." + names[0])}
        outer = found.pop() if len(found) == 1 else ""
    inner = getattr(module, "base_model_prefix", "") + "."
    for name, param in module.named_parameters():
        if not param.is_meta:
            continue
        candidates = [outer + name, name] + ([name[len(inner) :]] if name.startswith(inner) else [])
        key = next((k for k in candidates if k in folder), None)
        if key is None:
            raise KeyError(f"parameter {name!r} has no tensor in the safetensors files of {folder.path!r}")
        sources[id(param)] = WeightSource(folder, key)


def load_full(folder: SafetensorsFolder, key: str, dtype: torch.dtype) -> torch.Tensor:
    """The whole tensor ``key`` of ``folder`` in ``dtype``."""
    out = torch.empty(folder.shape(key), dtype=dtype)
    folder.read_rows(key, 0, out)
    return out


def resize_meta_embeddings(
    language_model: nn.Module, tokenizer: Any, sources: dict[int, WeightSource], *, pad_to_multiple_of: int | None
) -> int:
    """:func:`~mole_lightning.models.builders.resize_embeddings` for a language model whose weights are on meta.

    The input (and untied output) embeddings are read in full from their files, resized by the same function (same
    mean initialisation, same random draws), and put back on meta; the added rows are kept in the new parameters'
    :class:`WeightSource`. Returns the number of rows before resizing.
    """
    old = language_model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) <= old:
        return old
    modules = [language_model.get_input_embeddings(), language_model.get_output_embeddings()]
    keys: list[str] = []
    for module in modules:
        if module is None or (keys and module.weight is modules[0].weight):
            continue
        weight = module.weight
        source = sources.pop(id(weight))
        module.weight = nn.Parameter(load_full(source.folder, source.key, weight.dtype), weight.requires_grad)
        keys.append(source.key)
        folder = source.folder
    resize_embeddings(language_model, tokenizer, pad_to_multiple_of=pad_to_multiple_of)
    resized = [language_model.get_input_embeddings(), language_model.get_output_embeddings()]
    for module, key in zip(resized, keys, strict=False):
        weight = module.weight
        meta = nn.Parameter(weight.detach().to("meta"), weight.requires_grad)
        sources[id(meta)] = WeightSource(folder, key, weight.detach()[old:].clone())
        module.weight = meta
    if len(keys) == 1 and resized[1] is not None:  # tied: the output embedding shares the new parameter
        resized[1].weight = resized[0].weight
    return old


def _config_dtype(config: Any) -> torch.dtype:
    """The dtype ``from_pretrained`` picks by default (the checkpoint's ``dtype`` in its config, else float32)."""
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def meta_language_model(
    path: str,
    sources: dict[int, WeightSource],
    *,
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
) -> nn.Module:
    """The causal LM of folder ``path`` as ``from_pretrained`` builds it (config, dtype, generation config, eval
    mode), with its parameters on meta and their file tensors recorded in ``sources``."""
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    kwargs: dict[str, Any] = {"dtype": dtype or _config_dtype(config)}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, **kwargs)
    if model.can_generate() and os.path.exists(os.path.join(path, "generation_config.json")):
        model.generation_config = GenerationConfig.from_pretrained(path)
    register_weight_sources(model, SafetensorsFolder(path), sources)
    return model.eval()


def meta_vision_tower(
    path: str, sources: dict[int, WeightSource], *, feature_layer: int = -2, dtype: torch.dtype | None = None
) -> nn.Module:
    """The HF vision tower of folder ``path`` (CLIP/SigLIP, vision or full model) as
    :meth:`~mole_lightning.models.vision.HFVisionTower.from_pretrained` builds it, parameters on meta."""
    config = AutoConfig.from_pretrained(path)
    with parameters_on_meta():
        tower = HFVisionTower.from_config(getattr(config, "vision_config", config), feature_layer=feature_layer)
    tower = tower.to(dtype or _config_dtype(config))
    tower.model.eval()
    register_weight_sources(tower.model, SafetensorsFolder(path), sources)
    return tower


__all__ = [
    "SafetensorsFolder",
    "WeightSource",
    "meta_language_model",
    "meta_vision_tower",
    "parameters_on_meta",
    "register_weight_sources",
    "resize_meta_embeddings",
]
