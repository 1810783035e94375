"""Vision-to-language projectors, built by LLaVA's names: ``mlp{N}x_gelu``, ``linear``, ``identity``.

Module layouts follow LLaVA's ``mm_projector`` so that its checkpoints load without renaming: ``mlp2x_gelu`` is
``nn.Sequential(Linear, GELU, Linear)`` with state-dict keys ``0.*`` and ``2.*``; ``linear`` is a bare
``nn.Linear`` (keys ``weight``, ``bias``).
"""

from __future__ import annotations

import re

from torch import nn

_MLP_PATTERN = re.compile(r"^mlp(\d+)x_gelu$")

PROJECTOR_NAMES = ("mlp2x_gelu", "mlpNx_gelu", "linear", "identity")
"""Accepted projector names (``N`` ≥ 1 is the number of linear layers)."""


class MLPProjector(nn.Sequential):
    """``mlp{N}x_gelu``: N linear layers with GELU in between.

    y = W_N · gelu(… gelu(W_1 · x + b_1) …) + b_N, shapes ``(…, in_dim)`` → ``(…, out_dim)``;
    W_1 is ``(out_dim, in_dim)``, the others ``(out_dim, out_dim)``. Layer i sits at index ``2 * i``.

    Args:
        in_dim: vision feature width.
        out_dim: language model hidden size.
        depth: N, number of linear layers.
        bias: whether the linear layers have biases (LLaVA's do).
    """

    def __init__(self, in_dim: int, out_dim: int, depth: int = 2, *, bias: bool = True) -> None:
        if depth < 1:
            raise ValueError(f"MLP projector depth must be >= 1, got {depth}")
        layers: list[nn.Module] = [nn.Linear(in_dim, out_dim, bias=bias)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(out_dim, out_dim, bias=bias)]
        super().__init__(*layers)


def build_projector(name: str, *, in_dim: int, out_dim: int, bias: bool = True) -> nn.Module:
    """Build a projector by name.

    Args:
        name: ``"mlp2x_gelu"`` (LLaVA-1.5), any ``"mlp{N}x_gelu"``, ``"linear"`` or ``"identity"``.
        in_dim: vision feature width D_v.
        out_dim: language model hidden size D.
        bias: biases on the linear layers.

    Returns:
        A module mapping ``(…, in_dim)`` to ``(…, out_dim)``.
    """
    match = _MLP_PATTERN.match(name)
    if match:
        return MLPProjector(in_dim, out_dim, int(match.group(1)), bias=bias)
    if name == "linear":
        return nn.Linear(in_dim, out_dim, bias=bias)
    if name == "identity":
        if in_dim != out_dim:
            raise ValueError(f"identity projector needs equal widths, got vision {in_dim} and language {out_dim}")
        return nn.Identity()
    raise ValueError(f"unknown projector {name!r}; expected one of {PROJECTOR_NAMES}")


def projector_name(projector: nn.Module) -> str:
    """Name of a projector built by :func:`build_projector` (inverse of it)."""
    if isinstance(projector, MLPProjector):
        return f"mlp{sum(isinstance(m, nn.Linear) for m in projector)}x_gelu"
    if isinstance(projector, nn.Linear):
        return "linear"
    if isinstance(projector, nn.Identity):
        return "identity"
    raise ValueError(f"not a known projector: {type(projector).__name__}")
