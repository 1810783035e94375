"""The trainable state of a LLaVA-MoLE model: one definition of what is trained, saved, loaded and exported.

The trained set is the parameters that require grad, whatever made them trainable. By default: LoRA adapters and
MoLE experts (``lora_A``/``lora_B``), routers, the projector, and the embedding rows of tokens added to the
vocabulary when they are trainable; everything else (LLM and vision weights) is frozen and never written to a
checkpoint. A tensor made trainable by hand (``requires_grad_(True)``) joins the set, a frozen adapter leaves it.
Two views of the same set, both derived from :func:`trainable_names`:

- parameter names, as Lightning checkpoints key them (``model.<path>``), with the components that FSDP1,
  activation-checkpoint wrappers and ``torch.compile`` insert removed;
- :func:`trainable_state_dict`: the tensors as exports write them, by parameter path of the model
  (``language_model.<path>.lora_A``, ``projector.0.weight``, and only the new rows of the embeddings as
  ``token_rows.{input,output}``).

:func:`load_trained_state` copies such tensors back into a model (a checkpoint's or an export's).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
"""Name components inserted by FSDP1, activation-checkpoint wrappers and ``torch.compile``."""


def clean_parameter_name(name: str) -> str:
    """``name`` without the wrapper components added by FSDP1 / checkpoint wrappers / ``torch.compile``."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def trainable_names(module: nn.Module) -> list[str]:
    """Clean names of the parameters of ``module`` that require grad (the keys a checkpoint must hold)."""
    return [clean_parameter_name(n) for n, p in module.named_parameters() if p.requires_grad]


def select_trainable(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The entries of a (possibly wrapper-named) ``state`` dict whose clean name is in ``names``."""
    keep = set(names)
    return {k: v for k, v in state.items() if clean_parameter_name(k) in keep}


def missing_trainable(state: dict[str, Any], names: list[str]) -> list[str]:
    """The ``names`` that a (possibly wrapper-named) ``state`` dict lacks."""
    present = {clean_parameter_name(k) for k in state}
    return [n for n in names if n not in present]


def _full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a possibly sharded (DTensor) one."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters of :func:`trainable_names` (those that require grad) under their clean names, for exports:
    for a :class:`~mole_lightning.models.LlavaMoLE`, ``language_model.*`` adapter/router tensors, ``projector.*``,
    ``token_rows.{input,output}`` (rows added for new tokens, when trainable) and any tensor made trainable by
    hand; detached, gathered if sharded, contiguous CPU tensors."""
    names = set(trainable_names(model))
    state = {clean_parameter_name(n): p for n, p in model.named_parameters()}
    return {n: _full_tensor(p.detach()).contiguous().cpu() for n, p in state.items() if n in names}


def load_trained_state(model: nn.Module, state: dict[str, torch.Tensor], *, strict: bool = True) -> list[str]:
    """Copy ``state`` (clean parameter names of ``model`` to tensors, e.g. :func:`trainable_state_dict`'s) into the
    parameters of ``model``, cast to their dtypes (a sharded parameter gets the full tensor sharded like it).

    Every parameter of ``model`` that requires grad must be in ``state``; entries may name frozen parameters too (a
    tensor trained by hand in the run that wrote ``state``): they are made to require grad, so that the loaded
    model's trained set is ``state``'s and an export of it writes the same tensors.

    Args:
        strict: raise on entries that name no parameter of ``model``; else they are skipped and returned.

    Returns:
        The names in ``state`` that ``model`` lacks (empty with ``strict``).

    Raises:
        ValueError: one line naming the missing, unexpected or mis-shaped tensors, or tensors for frozen weights
            still on the meta device (a sharded build reads those later, from the base's files).
    """
    own = {clean_parameter_name(n): p for n, p in model.named_parameters()}
    missing = [n for n in trainable_names(model) if n not in state]
    if missing:
        raise ValueError(f"it lacks {len(missing)} trainable tensor(s) of the model, e.g. {missing[:3]}")
    unexpected = [n for n in state if n not in own]
    if unexpected and strict:
        raise ValueError(f"it holds {len(unexpected)} tensor(s) the model lacks, e.g. {unexpected[:3]}")
    shapes = [f"{n} {tuple(v.shape)} vs {tuple(own[n].shape)}" for n, v in state.items() if n in own
              and tuple(v.shape) != tuple(own[n].shape)]  # fmt: skip
    if shapes:
        raise ValueError(f"{len(shapes)} tensor(s) differ in shape (given vs model), e.g. {shapes[:3]}")
    on_meta = [n for n in state if n in own and own[n].is_meta]  # frozen weights of a sharded build, read later
    if on_meta:
        raise ValueError(
            f"{len(on_meta)} tensor(s) would land on frozen weights still on the meta device, e.g. {on_meta[:3]}: "
            "load them onto a model built without a device mesh"
        )
    with torch.no_grad():
        for name, value in state.items():
            if name not in own:
                continue
            param = own[name]
            value = value.to(dtype=param.dtype)
            if hasattr(param, "device_mesh"):  # DTensor under FSDP2: shard the full tensor like the parameter
                from torch.distributed.tensor import distribute_tensor

                value = distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
            param.copy_(value)
            param.requires_grad_(True)
    return unexpected
