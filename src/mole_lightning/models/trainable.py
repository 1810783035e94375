"""The trainable state of a LLaVA-MoLE model: one definition of what is trained, saved, loaded and exported.

Trained: LoRA adapters and MoLE experts (``lora_A``/``lora_B``), routers, the projector, and the embedding rows of
tokens added to the vocabulary when they are trainable. Everything else (LLM and vision weights) is frozen and
never written to a checkpoint. Two views of the same set:

- parameter names (:func:`trainable_names`), as Lightning checkpoints key them (``model.<path>``), with the
  components that FSDP1, activation-checkpoint wrappers and ``torch.compile`` insert removed;
- :func:`trainable_state_dict`: the tensors as exports write them (adapters by module path, ``projector.*``, and
  only the new rows of the embeddings as ``token_rows.{input,output}``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mole_lightning.peft import adapter_state_dict

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


def trainable_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """What training changes, for exports: ``language_model.*`` adapter/router tensors, ``projector.*``, and
    ``token_rows.{input,output}`` (rows added for new tokens, when trainable); contiguous CPU tensors."""
    state: dict[str, torch.Tensor] = {}
    if model.mole_config is not None:
        state.update({f"language_model.{k}": v for k, v in adapter_state_dict(model.language_model).items()})
    state.update({f"projector.{k}": v for k, v in model.projector.state_dict().items()})
    state.update({f"token_rows.{name}": rows for name, rows in model.token_rows.items()})
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}
