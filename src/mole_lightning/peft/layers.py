"""Adapter layers: plain LoRA on a frozen Linear, and K stacked LoRA experts driven by a top-1 router.

Both keep the frozen base ``weight`` (and ``bias``) under the same names as ``nn.Linear``, so base checkpoints load
into an adapted model unchanged. Tokens are flattened: x (T, d_in) with T = B * S.

Plain LoRA (``LoRALinear``)::

    y = x W^T + b + (alpha / r) * dropout(x) A B          A: (d_in, r)   B: (r, d_out)

Routed experts (``MoLELinear``), with ``coeff`` (T, K) from the router (see `routing`)::

    y_t = x_t W^T + b + (alpha / r) * sum_e coeff[t, e] * (dropout(x_t) A_e) B_e
        A: (K, d_in, r)   B: (K, r, d_out)

A 4-bit base (QLoRA: a ``bitsandbytes`` ``Params4bit`` weight, see `quantization`) is computed by
``bitsandbytes.matmul_4bit`` in the base's compute dtype instead of ``F.linear``; names and adapters are unchanged.

The coefficient multiplies the rank-r intermediate, never the d_out output (cheaper, and it saves no extra
activation). Init for both: A kaiming-uniform (a = sqrt(5), fan-in d_in, i.e. U(-1/sqrt(d_in), 1/sqrt(d_in))), B zeros,
so an adapted model starts equal to its base.

Compute paths for the routed experts (identical results):
    ``loop``          per expert: index its tokens, two matmuls, ``index_add_`` back (reference).
    ``dense_masked``  H = x [A_1 .. A_K] (T, K*r), masked by coeff, one matmul with stacked B (K*r, d_out). Static
                      shapes, no sort, no host sync; costs K times the adapter FLOPs.
    ``grouped``       tokens sorted by expert once per MLP, ``torch.nn.functional.grouped_mm`` for A and B, unsorted.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mole_lightning.peft.quantization import is_4bit, linear_4bit
from mole_lightning.peft.router import MoLERouter, RoutingDecision


def adapter_device(weight: torch.Tensor) -> torch.device:
    """Device of the adapters (and router) of a frozen weight: the weight's, or CPU for a weight on the meta device
    (a base loaded later shard by shard), so that their initialisation draws the same random numbers either way."""
    return torch.device("cpu") if weight.is_meta else weight.device


def _init_lora_a_(a: torch.Tensor, fan_in: int) -> None:
    """kaiming_uniform_(a=sqrt(5)) as nn.Linear does for a (r, d_in) weight: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    nn.init.uniform_(a, -bound, bound)


class _FrozenLinearBase(nn.Module):
    """Holds the frozen base weight/bias of an ``nn.Linear`` (shared, not copied) plus LoRA bookkeeping.

    The base may be a ``bitsandbytes.nn.Linear4bit`` (its packed 4-bit weight is kept under the same name):
    ``compute_dtype`` is then its matmul dtype (``None``: the input's), unused for a plain weight.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.compute_dtype: torch.dtype | None = getattr(base, "compute_dtype", None)
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def _adapter_dtype(self) -> torch.dtype:
        """Adapters are fp32 master weights whatever the base dtype; they compute in the input's dtype."""
        return torch.float32

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x W^T + b``: x (T, d_in) -> (T, d_out), through bitsandbytes for a 4-bit weight."""
        if is_4bit(self.weight):
            return linear_4bit(x, self.weight, self.bias, self.compute_dtype)
        return F.linear(x, self.weight, self.bias)

    def adapter_parameter_names(self) -> tuple[str, ...]:
        return ("lora_A", "lora_B")


class LoRALinear(_FrozenLinearBase):
    """Plain LoRA: y = x W^T + b + (alpha/r) * dropout(x) A B.

    Shapes: x (..., d_in) -> y (..., d_out); lora_A (d_in, r); lora_B (r, d_out). Init: A kaiming-uniform, B zeros.
    A and B are fp32 (master weights: updates below bf16 resolution are kept) and compute in x's dtype.
    """

    def __init__(self, base: nn.Linear, *, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__(base, rank, alpha, dropout)
        kw = {"device": adapter_device(self.weight), "dtype": self._adapter_dtype()}
        self.lora_A = nn.Parameter(torch.empty(self.in_features, rank, **kw))
        self.lora_B = nn.Parameter(torch.empty(rank, self.out_features, **kw))
        self.reset_adapter_parameters()

    def reset_adapter_parameters(self) -> None:
        _init_lora_a_(self.lora_A.data.T, self.in_features)
        nn.init.zeros_(self.lora_B)

    def reset_parameters(self) -> None:
        """Re-initialise the adapter only (the base weight is loaded, never re-initialised here)."""
        self.reset_adapter_parameters()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, alpha={self.alpha}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        leading = x.shape[:-1]
        x2d = x.reshape(-1, self.in_features)  # (T, d_in)
        base = self.base_forward(x2d)  # (T, d_out)
        h = self.lora_dropout(x2d) @ self.lora_A.to(x2d.dtype)  # (T, r), in the input's dtype
        h = h * self.scaling
        out = torch.addmm(base, h.to(base.dtype), self.lora_B.to(base.dtype))  # (T, d_out)
        return out.reshape(*leading, self.out_features)


def experts_loop(
    base: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    decision: RoutingDecision,
    scaling: float,
) -> torch.Tensor:
    """Reference: per expert, gather its tokens, (x A_e) * coeff * scaling, times B_e, add to their base rows."""
    num_tokens = x.shape[0]
    out = base
    coeff = decision.coeff.to(x.dtype) * scaling  # (T, K)
    for e in range(lora_a.shape[0]):
        if decision.dense:
            idx = torch.arange(num_tokens, device=x.device)
        else:
            idx = torch.nonzero(decision.expert == e, as_tuple=True)[0]  # (T_e,)
        h = x.index_select(0, idx) @ lora_a[e]  # (T_e, r)
        h = h * coeff.index_select(0, idx)[:, e : e + 1]
        out = out.index_add(0, idx, (h @ lora_b[e]).to(out.dtype))
    return out


def experts_dense_masked(
    base: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    decision: RoutingDecision,
    scaling: float,
) -> torch.Tensor:
    """All experts' A in one matmul, rank-r intermediate masked by coeff, one matmul with stacked B, fused add."""
    num_experts, d_in, rank = lora_a.shape
    a_cat = lora_a.permute(1, 0, 2).reshape(d_in, num_experts * rank)  # (d_in, K*r)
    h = (x @ a_cat).view(-1, num_experts, rank)  # (T, K, r)
    h = h * (decision.coeff.to(x.dtype) * scaling).unsqueeze(-1)  # (T, K, r)
    b_cat = lora_b.reshape(num_experts * rank, -1)  # (K*r, d_out)
    return torch.addmm(base, h.reshape(-1, num_experts * rank).to(base.dtype), b_cat.to(base.dtype))  # (T, d_out)


def grouped_mm_supported(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor) -> bool:
    """Whether ``grouped_mm`` can run these shapes: it needs 16-byte aligned rows in every operand."""
    if not hasattr(F, "grouped_mm"):
        return False
    size = x.element_size()
    return all((n * size) % 16 == 0 for n in (lora_a.shape[1], lora_a.shape[2], lora_b.shape[2]))


class _GroupedExperts(torch.autograd.Function):
    """Routed LoRA experts on tokens sorted by expert, with a hand-written backward.

    Forward, with ``s`` the sort order and ``offsets`` the cumulative group ends::

        h = grouped_mm(x[s], A)            # (T, r), token t uses A of its expert
        y = grouped_mm(h * c[s], B)[s^-1]  # (T, d_out)

    Backward saves only x (already kept by the caller's graph), the rank-r ``h`` and the small routing tensors, and
    re-gathers ``x[s]`` instead of keeping a sorted copy: no extra (T, d_in) activation per projection, and every
    permutation is a gather (autograd's own backward of a gather is a much slower scatter-add on CPU).
    """

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, coeff, order, inverse, offsets):
        h = F.grouped_mm(x.index_select(0, order), lora_a, offs=offsets)  # (T, r)
        coeff_sorted = coeff.index_select(0, order).unsqueeze(-1)  # (T, 1)
        y = F.grouped_mm(h * coeff_sorted, lora_b, offs=offsets)  # (T, d_out), all rows written: offsets[-1] == T
        ctx.save_for_backward(x, lora_a, lora_b, h, coeff_sorted, order, inverse, offsets)
        return y.index_select(0, inverse)

    @staticmethod
    def backward(ctx, grad_y):
        x, lora_a, lora_b, h, coeff_sorted, order, inverse, offsets = ctx.saved_tensors
        grad_y_sorted = grad_y.index_select(0, order)  # (T, d_out)
        grad_lora_b = F.grouped_mm((h * coeff_sorted).t(), grad_y_sorted, offs=offsets)  # (K, r, d_out)
        grad_hc = F.grouped_mm(grad_y_sorted, lora_b.transpose(1, 2).contiguous(), offs=offsets)  # (T, r)
        grad_coeff = (grad_hc * h).sum(-1).index_select(0, inverse)  # (T,)
        grad_h = grad_hc * coeff_sorted  # (T, r)
        grad_lora_a = F.grouped_mm(x.index_select(0, order).t(), grad_h, offs=offsets)  # (K, d_in, r)
        grad_x = F.grouped_mm(grad_h, lora_a.transpose(1, 2).contiguous(), offs=offsets).index_select(0, inverse)
        return grad_x, grad_lora_a, grad_lora_b, grad_coeff, None, None, None


def experts_grouped(
    base: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    decision: RoutingDecision,
    scaling: float,
) -> torch.Tensor:
    """Tokens sorted by expert (once per MLP), two ``grouped_mm`` calls, unsorted and added to the base rows."""
    if decision.dense:
        return experts_dense_masked(base, x, lora_a, lora_b, decision, scaling)
    if not grouped_mm_supported(x, lora_a, lora_b):
        raise ValueError(
            "impl='grouped' needs torch.nn.functional.grouped_mm (torch >= 2.10) and rank, d_in and d_out whose "
            f"rows are multiples of 16 bytes; got rank={lora_a.shape[2]}, d_in={lora_a.shape[1]}, "
            f"d_out={lora_b.shape[2]} in {x.dtype}. Use impl='auto' or 'dense_masked'."
        )
    order, offsets, inverse = decision.sorted_by_expert()
    coeff = decision.chosen_coeff().to(x.dtype) * scaling  # (T,)
    y = _GroupedExperts.apply(x, lora_a, lora_b, coeff, order, inverse, offsets)  # (T, d_out)
    return base.add_(y.to(base.dtype))  # base is not saved for backward


EXPERT_IMPLS = {"loop": experts_loop, "dense_masked": experts_dense_masked, "grouped": experts_grouped}


AUTO_DENSE_MAX_STACKED_RANK = 512
"""On CUDA, ``impl="auto"`` uses the dense masked path while K * r is at most this. Measured on an H200 in bf16 at
Llama-7B MLP shapes (docs/benchmarks.md): dense masked costs 1.03-1.05x plain LoRA up to K * r = 384 while the
grouped path costs about 1.22x whatever K; at K * r = 1024 grouped wins (1.25x vs 1.31x)."""


def select_impl(impl: str, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, dense: bool) -> str:
    """Resolve ``"auto"`` for these operands.

    Dense mixtures and shapes ``grouped_mm`` cannot take use the dense masked path. On CPU the grouped path wins
    (compute-bound: the dense path pays K times the adapter FLOPs). On CUDA the grouped path is used only where
    ``grouped_mm`` has its fast kernel (bf16 on sm90+) and K * r exceeds ``AUTO_DENSE_MAX_STACKED_RANK``;
    elsewhere the dense masked path.
    """
    if impl != "auto":
        return impl
    if dense or not grouped_mm_supported(x, lora_a, lora_b):
        return "dense_masked"
    if x.device.type == "cuda":
        num_experts, _, rank = lora_a.shape
        major, _ = torch.cuda.get_device_capability(x.device)
        fast_grouped = major >= 9 and x.dtype == torch.bfloat16
        if not fast_grouped or num_experts * rank <= AUTO_DENSE_MAX_STACKED_RANK:
            return "dense_masked"
    return "grouped"


class MoLELinear(_FrozenLinearBase):
    """K LoRA experts stacked on a frozen Linear; the owning MLP's router picks one expert per token.

    y_t = x_t W^T + b + (alpha/r) * sum_e coeff[t, e] * (dropout(x_t) A_e) B_e

    Shapes: x (..., d_in) -> y (..., d_out); lora_A (K, d_in, r); lora_B (K, r, d_out). Every expert stays in the
    autograd graph whatever the routing (an expert without tokens gets a zero gradient), so DDP/FSDP never see an
    unused parameter. Init: each A_e kaiming-uniform, B zeros.
    """

    def __init__(
        self,
        base: nn.Linear,
        router: MoLERouter,
        *,
        num_experts: int,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        impl: str = "auto",
    ) -> None:
        super().__init__(base, rank, alpha, dropout)
        self.num_experts = num_experts
        self.impl = impl
        self._router = (router,)  # a tuple so the router is not registered twice (it belongs to the MLP)
        kw = {"device": adapter_device(self.weight), "dtype": self._adapter_dtype()}
        self.lora_A = nn.Parameter(torch.empty(num_experts, self.in_features, rank, **kw))
        self.lora_B = nn.Parameter(torch.empty(num_experts, rank, self.out_features, **kw))
        self.reset_adapter_parameters()

    @property
    def router(self) -> MoLERouter:
        return self._router[0]

    def reset_adapter_parameters(self) -> None:
        for e in range(self.num_experts):
            _init_lora_a_(self.lora_A.data[e].T, self.in_features)
        nn.init.zeros_(self.lora_B)

    def reset_parameters(self) -> None:
        """Re-initialise the experts only (the base weight is loaded, never re-initialised here)."""
        self.reset_adapter_parameters()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, num_experts={self.num_experts}, "
            f"rank={self.rank}, alpha={self.alpha}, impl={self.impl!r}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        decision = self.router.decision
        if decision is None:
            raise RuntimeError(
                "MoLELinear ran without a routing decision: call the MLP module that owns it (its forward pre-hook "
                "routes the MLP input), not the projection alone"
            )
        leading = x.shape[:-1]
        x2d = x.reshape(-1, self.in_features)  # (T, d_in)
        if x2d.shape[0] != decision.expert.shape[0]:
            raise RuntimeError(
                f"MoLELinear got {x2d.shape[0]} tokens but its router decided for {decision.expert.shape[0]}"
            )
        base = self.base_forward(x2d)  # (T, d_out)
        xa = self.lora_dropout(x2d)
        lora_a, lora_b = self.lora_A.to(xa.dtype), self.lora_B.to(xa.dtype)  # fp32 masters, compute in x's dtype
        impl = select_impl(self.impl, xa, lora_a, lora_b, decision.dense)
        out = EXPERT_IMPLS[impl](base, xa, lora_a, lora_b, decision, self.scaling)  # (T, d_out)
        return out.reshape(*leading, self.out_features)
