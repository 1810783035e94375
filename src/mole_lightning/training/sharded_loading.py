"""Sharded loading, the sharding half: ``fully_shard`` a model whose frozen weights are on the meta device, then fill
each rank's shards from the weights' files (rows of this rank only) and from the tensors built for real.

The meta-device build and the file readers are :mod:`mole_lightning.models.sharded_loading`.
"""

from __future__ import annotations

import ctypes
import gc
import math
from typing import Any

import torch
from torch.distributed.tensor import Shard

from mole_lightning.models.llava_mole import LlavaMoLE
from mole_lightning.models.sharded_loading import WeightSource
from mole_lightning.training.strategies import fully_shard_llava_mole


def _local_rows(param: torch.Tensor, local: torch.Tensor) -> int:
    """First global row of a parameter's local shard (``Shard(0)`` on a 1-D mesh, or replicated: 0)."""
    placements = getattr(param, "placements", ())
    if not any(isinstance(p, Shard) for p in placements):
        return 0
    if len(placements) != 1 or placements[0] != Shard(0):
        raise NotImplementedError(f"sharded loading supports Shard(0) on a 1-D mesh, got {placements}")
    rows = param.shape[0]
    chunk = math.ceil(rows / param.device_mesh.size())
    start = min(param.device_mesh.get_local_rank() * chunk, rows)
    if min(start + chunk, rows) - start != local.shape[0]:
        raise RuntimeError(f"unexpected local shard of {tuple(local.shape)} rows at {start} for {tuple(param.shape)}")
    return start


def _fill(local: torch.Tensor, start: int, source: WeightSource) -> None:
    file_rows = source.folder.shape(source.key)[0] if source.folder.shape(source.key) else 1
    stop = start + (local.shape[0] if local.dim() else 1)
    if start < file_rows:
        source.folder.read_rows(source.key, start, local[: min(stop, file_rows) - start])
    if stop > file_rows:
        assert source.added_rows is not None, source.key
        first = max(start, file_rows)
        local[first - start :].copy_(source.added_rows[first - file_rows : stop - file_rows])


def shard_and_load(model: LlavaMoLE, mesh: Any, **fsdp_options: Any) -> LlavaMoLE:
    """``fully_shard`` a model built with ``frozen_on_meta=True`` and fill every rank's shards.

    Meta parameters are read from their files (their :class:`WeightSource` in ``model.weight_sources``), rows of this
    rank only; parameters and buffers built for real are copied into their shards.

    Args:
        model: a :class:`~mole_lightning.models.LlavaMoLE` from ``build_llava_mole(..., frozen_on_meta=True)``.
        mesh: the device mesh.
        **fsdp_options: :func:`~mole_lightning.training.strategies.fully_shard_llava_mole` options.

    Returns:
        The model, sharded and loaded in place.
    """
    sources: dict[int, WeightSource] = model.weight_sources
    if not sources:  # nothing on the meta device: plain sharding
        return fully_shard_llava_mole(model, mesh, **fsdp_options)
    plan: dict[str, WeightSource] = {}
    built: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        if param.is_meta:
            if id(param) not in sources:
                raise RuntimeError(f"meta parameter {name!r} has no file to load it from")
            plan[name] = sources[id(param)]
        else:
            built[name] = param.detach()  # keeps the built storage alive (fully_shard and to_empty replace it)
    buffers = {name: buffer.detach() for name, buffer in model.named_buffers()}
    fully_shard_llava_mole(model, mesh, **fsdp_options)
    device = "cpu" if fsdp_options.get("cpu_offload") else torch.device(mesh.device_type, _device_index(mesh))
    model.to_empty(device=device)
    shards = [(name, param, param.to_local() if hasattr(param, "to_local") else param)
              for name, param in model.named_parameters()]  # fmt: skip
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffer.copy_(buffers.pop(name))
        for name, param, local in shards:  # built tensors first: their full copies are freed before the reads
            if name not in plan:
                full = built.pop(name)
                local.copy_(full[_local_rows(param, local) :][: local.shape[0]] if full.dim() else full)
                del full
        _release_freed_memory()
        for name, param, local in shards:
            if name in plan:
                _fill(local, _local_rows(param, local), plan[name])
    model.weight_sources = {}
    return model


def _release_freed_memory() -> None:
    """Hand memory freed by the allocator back to the system (glibc ``malloc_trim``; nothing elsewhere)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _device_index(mesh: Any) -> int | None:
    if mesh.device_type == "cuda":
        return torch.cuda.current_device()
    return None
