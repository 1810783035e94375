"""Optimizer parameter groups of a LLaVA-MoLE model: trainable parameters only, by role, decay and learning rate."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mole_lightning.models import clean_parameter_name


def is_no_decay(name: str, param: torch.Tensor) -> bool:
    """True for parameters that get no weight decay: biases, norm weights and every other 1-D tensor."""
    lowered = name.lower()
    return param.ndim < 2 or lowered.endswith(".bias") or "norm" in lowered


def parameter_groups(model: nn.Module, lrs: dict[str, float | None]) -> list[dict[str, Any]]:
    """Parameter groups of the trainable parameters of a ``LlavaMoLE``.

    Roles from ``model.parameter_roles()`` (adapters, routers, projector, embeddings, other), each split into a
    decayed part and a ``weight_decay=0`` part (biases, norms, 1-D tensors; embeddings never decay). A role listed
    in ``lrs`` with a value gets that learning rate. Empty groups are dropped; every group has a ``name`` (used by
    ``LearningRateMonitor``: ``lr-<Optimizer>/<name>``).
    """
    role_of = {id(p): role for role, params in model.parameter_roles().items() for p in params}
    buckets: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        role = role_of.get(id(param), "other")
        no_decay = role == "embeddings" or is_no_decay(clean_parameter_name(name), param)
        buckets.setdefault((role, no_decay), []).append(param)
    groups = []
    for (role, no_decay), params in buckets.items():
        group: dict[str, Any] = {"params": params, "name": f"{role}_no_decay" if no_decay else role}
        if no_decay:
            group["weight_decay"] = 0.0
        if lrs.get(role) is not None:
            group["lr"] = lrs[role]
        groups.append(group)
    return groups
