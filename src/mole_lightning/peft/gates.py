"""Gate modes: how a top-1 router's probabilities become the per-token coefficient of each expert.

A gate mode is a `GateSpec` registered under a name (``MoLEConfig.gate``). Its ``coefficients(probs, expert)`` maps
the router's softmax ``probs`` (T, K) and top-1 choice ``expert`` (T,) to ``coeff`` (T, K), the multiplier of each
expert's rank-r intermediate. Built-ins:

    prob              one_hot(expert) * p_top                              (Switch Transformer)
    straight_through  one_hot(expert) * (p_top - stopgrad(p_top) + 1)      (forward 1, gradient through p_top)
    none              one_hot(expert)                                      (router learns from the balance loss only)
    soft              probs                                                (dense mixture of all experts)

``dense`` says every expert runs for every token (``coeff`` has no zeros to exploit); a sparse mode
(``dense=False``) must keep ``coeff`` zero off each token's chosen expert, because the sparse kernels read only the
chosen expert's coefficient (``RoutingDecision.chosen_coeff``); ``router_gradient`` says
whether ``coeff`` carries a gradient to the router (without it the balance loss is the router's only signal, so it
must be switched on).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class GateSpec:
    """One gate mode.

    Attributes:
        coefficients: ``(probs (T, K) fp32, expert (T,) int64) -> coeff (T, K)``; zero off the chosen expert
            unless ``dense``.
        dense: every expert contributes to every token (the sparse expert kernels are skipped).
        router_gradient: ``coeff`` depends differentiably on ``probs``.
    """

    coefficients: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    dense: bool = False
    router_gradient: bool = True


def _one_hot(probs: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
    return F.one_hot(expert, probs.shape[-1]).to(probs.dtype)  # (T, K)


def _top_prob(probs: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
    return probs.gather(1, expert[:, None])  # (T, 1)


def _straight_through(probs: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
    top = _top_prob(probs, expert)
    return _one_hot(probs, expert) * (top - top.detach() + 1.0)


GATES: dict[str, GateSpec] = {
    "prob": GateSpec(lambda probs, expert: _one_hot(probs, expert) * _top_prob(probs, expert)),
    "straight_through": GateSpec(_straight_through),
    "none": GateSpec(_one_hot, router_gradient=False),
    "soft": GateSpec(lambda probs, expert: probs, dense=True),
}


def register_gate(name: str, spec: GateSpec) -> None:
    """Add (or replace) a gate mode; ``MoLEConfig(gate=name)`` then uses it."""
    if not isinstance(spec, GateSpec):
        raise TypeError(f"register_gate({name!r}, ...) needs a GateSpec, got {type(spec).__name__}")
    GATES[name] = spec


def gate_spec(name: str) -> GateSpec:
    """The registered gate mode ``name``; a one-line ValueError listing the known ones otherwise."""
    try:
        return GATES[name]
    except KeyError:
        raise ValueError(f"MoLEConfig.gate must be a registered gate mode {sorted(GATES)}, got {name!r}") from None
