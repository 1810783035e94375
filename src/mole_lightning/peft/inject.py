"""Turn any Llama-family HF causal LM (alone or inside a larger model) into a LLaVA-MoLE model, and back out.

`apply_mole` walks ``named_modules()``: Linear layers named like ``attn_targets`` get plain LoRA; every module that
directly holds Linear children named like ``mlp_targets`` becomes a MoLE block (a router on its input, registered as
``<mlp>.router``, plus K experts on each of those projections). Modules under a vision tower or projector are left
alone. Nothing depends on a model's attribute paths, so Llama/Vicuna, Mistral, Qwen2/3 and LLaVA wrappers all work.

After a forward, `collect_aux` gives the weighted auxiliary loss (with grad) and `routing_statistics` the per-layer
raw statistics; `routing_mask` tells the routers which tokens are padding and `source_supervision` which expert
each sample's source is assigned to (for the source-supervised routing loss).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import distribute_tensor

from mole_lightning.peft.config import MoLEConfig
from mole_lightning.peft.layers import LoRALinear, MoLELinear, _FrozenLinearBase, adapter_device
from mole_lightning.peft.router import (
    MoLEAux,
    MoLERouter,
    pooled_balance_loss,
    source_routing_loss,
    switch_balance_loss,
    z_loss,
)

DEFAULT_EXCLUDE: tuple[str, ...] = (
    "vision_tower",
    "vision_model",
    "visual",
    "multi_modal_projector",
    "mm_projector",
    "projector",
    "lm_head",
)
"""Module names never adapted (a model path containing one of them as a component is skipped)."""


def _is_excluded(name: str, exclude: tuple[str, ...]) -> bool:
    return any(part in exclude for part in name.split("."))


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def _router_in_features(projections: dict[str, nn.Linear]) -> int:
    """Input size of the MLP: the ``in_features`` most targets share (ties: the smallest, i.e. d over d_ffn)."""
    counts = Counter(p.in_features for p in projections.values())
    return min(counts, key=lambda n: (-counts[n], n))


def apply_mole(model: nn.Module, config: MoLEConfig, *, exclude: tuple[str, ...] = DEFAULT_EXCLUDE) -> nn.Module:
    """Adapt ``model`` in place: LoRA on attention targets, a MoLE block on every MLP; freeze everything else.

    Args:
        model: an HF causal LM of the Llama family, or any module containing one (e.g. a LLaVA model).
        config: the adapter configuration.
        exclude: module-name components whose subtrees are never adapted (vision tower, projector, lm_head).

    Returns:
        ``model`` itself, with only LoRA, expert and router parameters requiring grad.

    Raises:
        ValueError: if the model is already adapted, or no target module is found.
    """
    if any(isinstance(m, (_FrozenLinearBase, MoLERouter)) for m in model.modules()):
        raise ValueError("apply_mole: the model already has LoRA/MoLE adapters; apply it once")
    for param in model.parameters():
        param.requires_grad_(False)

    mlp_targets, attn_targets = set(config.mlp_targets), set(config.attn_targets)
    mlps: list[tuple[str, nn.Module, dict[str, nn.Linear]]] = []
    attn_linears: list[tuple[str, nn.Linear]] = []
    for name, module in model.named_modules():
        if _is_excluded(name, exclude):
            continue
        projections = {
            child_name: child
            for child_name, child in module.named_children()
            if child_name in mlp_targets and isinstance(child, nn.Linear)
        }
        if projections:
            mlps.append((name, module, projections))
        if name.rpartition(".")[2] in attn_targets and isinstance(module, nn.Linear):
            attn_linears.append((name, module))
    if not mlps and not attn_linears:
        raise ValueError(
            f"apply_mole: no module named like {sorted(mlp_targets | attn_targets)} found outside {list(exclude)}"
        )

    lora_kw = {"rank": config.rank, "alpha": config.alpha, "dropout": config.dropout}
    mlp_kw = {"rank": config.expert_rank, "alpha": config.expert_alpha, "dropout": config.dropout}
    for name, linear in attn_linears:
        _set_submodule(model, name, LoRALinear(linear, **lora_kw))
    for _, mlp, projections in mlps:
        if config.num_experts == 1:
            for child_name, linear in projections.items():
                setattr(mlp, child_name, LoRALinear(linear, **mlp_kw))
            continue
        router = MoLERouter(
            _router_in_features(projections), config, device=adapter_device(next(iter(projections.values())).weight)
        )
        mlp.router = router
        mlp.register_forward_pre_hook(router.route_mlp_input, with_kwargs=True)
        for child_name, linear in projections.items():
            setattr(
                mlp,
                child_name,
                MoLELinear(linear, router, num_experts=config.num_experts, impl=config.impl, **mlp_kw),
            )
    return model


def iter_routers(model: nn.Module) -> Iterator[tuple[str, MoLERouter]]:
    """(name, router) of every MoLE block, in model order."""
    for name, module in model.named_modules():
        if isinstance(module, MoLERouter):
            yield name, module


@contextlib.contextmanager
def _on_routers(model: nn.Module, name: str, value: torch.Tensor | None) -> Iterator[None]:
    """Within the block, every router of ``model`` has attribute ``name`` set to ``value`` (``None`` after)."""
    routers = [router for _, router in iter_routers(model)]
    for router in routers:
        setattr(router, name, value)
    try:
        yield
    finally:
        for router in routers:
            setattr(router, name, None)


@contextlib.contextmanager
def routing_mask(model: nn.Module, attention_mask: torch.Tensor | None) -> Iterator[None]:
    """Within the block, routers treat tokens where ``attention_mask`` (B, S) is 0 as padding.

    Padding tokens are still routed (their outputs are computed as usual) but count in neither the losses nor the
    statistics. During cached decoding the MLP sees only the newest tokens; the mask's last columns are used.
    """
    with _on_routers(model, "token_mask", attention_mask):
        yield


@contextlib.contextmanager
def source_supervision(model: nn.Module, source_expert: torch.Tensor | None) -> Iterator[None]:
    """Within the block, routers record ``source_expert`` (B,) int64, the target expert of each sample's source
    (-1: unknown, not supervised), for the source-supervised routing loss of `collect_aux`.

    Nothing else changes: routing, outputs and the other losses are the same with or without it.
    """
    with _on_routers(model, "source_expert", source_expert):
        yield


def collect_aux(model: nn.Module) -> MoLEAux:
    """Auxiliary router losses of the last forward: ``total`` weighted by the config's coefficients (with grad).

    ``balance`` is the switch loss averaged over layers or the pooled loss, as configured; ``z_loss`` is averaged over
    layers; ``source_routing`` is the source-supervised routing loss (computed only when ``source_routing_coef > 0``
    and targets were given with `source_supervision`; zero otherwise, and then ``total`` is the same tensor
    expression as without it). All are zero tensors when the model has no router (K = 1) or no router has run.
    """
    routers = [router for _, router in iter_routers(model) if router.record is not None]
    if not routers:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        zero = torch.zeros((), device=device)
        return MoLEAux(total=zero, balance=zero, z_loss=zero, source_routing=zero)
    config = routers[0].config
    records = [router.record for router in routers]
    if config.balance == "pooled":
        balance = pooled_balance_loss(records)
    else:
        balance = torch.stack([switch_balance_loss(r.probs, r.expert, r.valid) for r in records]).mean()
    z = torch.stack([z_loss(r.logits, r.valid) for r in records]).mean()
    total = config.balance_coef * balance + config.z_loss_coef * z
    source = torch.zeros((), device=z.device)
    if config.source_routing_coef > 0 and any(r.source_expert is not None for r in records):
        source = source_routing_loss(records)
        total = total + config.source_routing_coef * source
    return MoLEAux(total=total, balance=balance, z_loss=z, source_routing=source)


@torch.no_grad()
@torch.no_grad()
def expert_counts_per_sample(model: nn.Module) -> torch.Tensor | None:
    """Valid tokens each sample of the last forward sent to each expert, per MoLE block: ``(L, B, K)`` float32.

    ``None`` when no router has a record (plain LoRA with K = 1 has no router).
    """
    per_layer = []
    for _, router in iter_routers(model):
        rec = router.record
        if rec is None:
            continue
        one_hot = F.one_hot(rec.expert, router.num_experts).to(torch.float32)  # (T, K)
        one_hot = one_hot * rec.valid.to(torch.float32)[:, None]
        per_layer.append(one_hot.reshape(rec.batch_size, -1, router.num_experts).sum(1))  # (B, K)
    return torch.stack(per_layer) if per_layer else None  # (L, B, K)


def routing_statistics(model: nn.Module) -> dict[str, dict[str, torch.Tensor | float]]:
    """Per MoLE block of the last forward: ``tokens_per_expert`` (K,) over valid tokens, the layer's switch
    ``balance`` (1.0 when perfectly balanced) and ``z_loss``. Keys are the routers' module names."""
    stats: dict[str, dict[str, torch.Tensor | float]] = {}
    for name, router in iter_routers(model):
        rec = router.record
        if rec is None:
            continue
        counts = torch.zeros(router.num_experts, dtype=torch.long, device=rec.expert.device)
        counts.scatter_add_(0, rec.expert[rec.valid], torch.ones_like(rec.expert[rec.valid]))
        stats[name] = {
            "tokens_per_expert": counts,
            "balance": float(switch_balance_loss(rec.probs, rec.expert, rec.valid)),
            "z_loss": float(z_loss(rec.logits, rec.valid)),
        }
    return stats


def clear_routing(model: nn.Module) -> None:
    """Drop every router's stored decision and record (frees the small graph they keep until the next forward)."""
    for _, router in iter_routers(model):
        router.clear()


def adapter_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(name, parameter) of every LoRA, expert and router parameter, named as in ``model.named_parameters()``."""
    for module_name, module in model.named_modules():
        if isinstance(module, _FrozenLinearBase):
            names = module.adapter_parameter_names()
        elif isinstance(module, MoLERouter):
            names = tuple(n for n, p in module.named_parameters(recurse=False) if p is not None)
        else:
            continue
        for param_name in names:
            yield f"{module_name}.{param_name}" if module_name else param_name, getattr(module, param_name)


def _full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a possibly sharded (DTensor) one."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter and router tensors (detached, contiguous, gathered if sharded); savable with safetensors."""
    return {name: _full_tensor(param.detach()).contiguous() for name, param in adapter_parameters(model)}


def load_adapter_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Copy adapter/router tensors into an adapted model; names and shapes must match exactly.

    Raises:
        ValueError: naming the missing, unexpected or mis-shaped entries.
    """
    params = dict(adapter_parameters(model))
    missing = sorted(set(params) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(params))
    if missing or unexpected:
        raise ValueError(
            "adapter state dict does not match the adapted model: "
            f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''} ({len(missing)}), "
            f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''} ({len(unexpected)}). "
            "Was the model adapted with the same MoLEConfig?"
        )
    for name, param in params.items():
        value = state_dict[name]
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(
                f"adapter tensor {name!r} has shape {tuple(value.shape)}, the model expects {tuple(param.shape)}"
            )
    with torch.no_grad():
        for name, param in params.items():
            value = state_dict[name].to(dtype=param.dtype)
            if hasattr(param, "device_mesh"):  # DTensor under FSDP2: shard the full tensor like the parameter
                value = distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
            param.copy_(value)
