"""Top-1 router of a MoLE block and the auxiliary losses computed from its decisions.

One router per MLP layer reads the MLP input and picks one expert per token; the same decision is used by every
adapted projection of that MLP (gate, up and down). The router keeps its last decision (for the projections) and a
record of logits/probabilities (for the losses and statistics), both overwritten at each forward.

Router (computed in fp32 whatever the model dtype)::

    logits = x W_r^T + b_r          # (T, K)
    probs  = softmax(logits)        # (T, K)
    expert = argmax(probs)          # (T,)

Per-token expert coefficient ``coeff`` (T, K) that multiplies the expert's rank-r intermediate: given by the gate
mode (`peft.gates`: ``prob``, ``straight_through``, ``none``, ``soft`` or a registered one).

Losses, over valid (non-padding) tokens only:

    switch balance  per layer  K * sum_i f_i * P_i, averaged over layers      f_i: fraction of tokens routed to i
    pooled balance  per sample sum_i f_i * P_i over all layers' tokens pooled, averaged over samples (no K factor)
    z-loss          per layer  mean(logsumexp(logits)^2), averaged over layers  P_i: mean probability of expert i
    source routing  per layer  mean over samples b with a known target e_b of -log p̄_b[e_b], averaged over layers
                    p̄_b = mean over b's valid tokens of probs (K,); e_b = -1 (unknown source) contributes nothing
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mole_lightning.peft.config import MoLEConfig
from mole_lightning.peft.gates import gate_spec


@dataclass
class RoutingDecision:
    """One router's choice for the tokens of one forward pass (tokens flattened to T = B * S).

    Attributes:
        expert: (T,) index of the chosen expert.
        coeff: (T, K) fp32 multiplier of each expert's rank-r intermediate (zero for unchosen experts, except in
            a dense gate mode such as ``soft``).
        dense: the gate mode is dense (``GateSpec.dense``, e.g. ``soft``): every expert contributes to every token.
    """

    expert: torch.Tensor
    coeff: torch.Tensor
    dense: bool
    _sorted: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def num_experts(self) -> int:
        return self.coeff.shape[-1]

    def chosen_coeff(self) -> torch.Tensor:
        """(T,) coefficient of each token's chosen expert."""
        return self.coeff.gather(1, self.expert[:, None]).squeeze(1)

    def sorted_by_expert(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token order grouped by expert, cumulative group ends (int32) and the inverse order; computed once.

        Counts use ``scatter_add_`` rather than ``bincount`` so no device-to-host sync happens here.
        """
        if self._sorted is None:
            order = torch.argsort(self.expert, stable=True)  # (T,)
            counts = torch.zeros(self.num_experts, dtype=torch.int32, device=self.expert.device)
            counts.scatter_add_(0, self.expert, torch.ones_like(self.expert, dtype=torch.int32))
            offsets = torch.cumsum(counts, 0, dtype=torch.int32)  # (K,) end index of each expert's group
            inverse = torch.argsort(order)  # (T,)
            self._sorted = (order, offsets, inverse)
        return self._sorted


@dataclass
class RouterRecord:
    """What a router saw in its last forward, for losses and statistics (valid tokens only are used)."""

    logits: torch.Tensor  # (T, K) fp32
    probs: torch.Tensor  # (T, K) fp32
    expert: torch.Tensor  # (T,)
    valid: torch.Tensor  # (T,) bool
    batch_size: int  # B, with T = B * S
    source_expert: torch.Tensor | None = None  # (B,) int64 target expert of each sample, -1 unknown (None: unset)


class MoLEAux(NamedTuple):
    """Auxiliary router losses after a forward: ``total`` is weighted and carries grad; the parts are raw."""

    total: torch.Tensor
    balance: torch.Tensor
    z_loss: torch.Tensor
    source_routing: torch.Tensor


class _Fp32Linear(torch.autograd.Function):
    """``x W^T + b`` computed in fp32 from a low-precision ``x`` without keeping an fp32 copy of ``x``.

    Autograd would save ``x.float()`` (T, d) for the weight gradient: 128 MiB per layer at 8k tokens and d = 4096 in
    a bf16 model. Here ``x`` is saved in its own dtype (usually the same storage the MLP keeps anyway) and upcast
    again in backward.
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.linear(x.float(), weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x = (grad_out @ weight).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_weight = grad_out.t() @ x.float() if ctx.needs_input_grad[1] else None
        grad_bias = grad_out.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias


def fp32_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(T, d) x (K, d) -> (T, K) logits in fp32, with autocast off (``bf16-mixed`` would compute them in bf16);
    fp32 inputs take the plain path."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        if x.dtype == torch.float32:
            return F.linear(x, weight, bias)
        return _Fp32Linear.apply(x, weight, bias)


def _in_backward_pass() -> bool:
    """True while autograd runs a backward pass, e.g. when activation checkpointing recomputes a layer."""
    current_task = getattr(torch._C, "_current_graph_task_id", None)
    return current_task is not None and current_task() != -1


class MoLERouter(nn.Module):
    """Linear(d, K) top-1 router computed in fp32; one per MoLE block.

    Shapes: weight (K, d), bias (K,). Init: ``nn.Linear``'s default (kaiming-uniform weight, uniform bias), as the
    official code. Parameters are kept in fp32 whatever the base model dtype.
    """

    def __init__(self, in_features: int, config: MoLEConfig, *, device: torch.device | None = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.num_experts = config.num_experts
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.num_experts, in_features, device=device, dtype=torch.float32))
        if config.router_bias:
            self.bias = nn.Parameter(torch.empty(config.num_experts, device=device, dtype=torch.float32))
        else:
            self.register_parameter("bias", None)
        self.token_mask: torch.Tensor | None = None
        self.source_expert: torch.Tensor | None = None  # (B,) set by `inject.source_supervision`
        self.decision: RoutingDecision | None = None
        self.record: RouterRecord | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_experts={self.num_experts}, gate={self.config.gate!r}"

    def _valid_tokens(self, leading_shape: torch.Size, device: torch.device) -> torch.Tensor:
        """(T,) bool mask of non-padding tokens from the mask set by `routing_mask` (all valid when unset)."""
        num_tokens = math.prod(leading_shape)
        mask = self.token_mask
        if mask is None:
            return torch.ones(num_tokens, dtype=torch.bool, device=device)
        if len(leading_shape) == 2 and mask.dim() == 2 and mask.shape[-1] != leading_shape[-1]:
            if mask.shape[0] != leading_shape[0] or mask.shape[-1] < leading_shape[-1]:
                raise ValueError(
                    f"routing mask of shape {tuple(mask.shape)} does not fit MLP input tokens {tuple(leading_shape)}"
                )
            mask = mask[:, -leading_shape[-1] :]  # decoding with a KV cache: the newest tokens
        if mask.numel() != num_tokens:
            raise ValueError(
                f"routing mask of shape {tuple(mask.shape)} does not fit MLP input tokens {tuple(leading_shape)}"
            )
        return mask.reshape(num_tokens).to(device=device, dtype=torch.bool)

    def forward(self, x: torch.Tensor) -> RoutingDecision:
        """Route every token of ``x`` (..., d); stores and returns the decision."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"router expects inputs of size {self.in_features}, got {x.shape[-1]}")
        leading_shape = x.shape[:-1]
        bias = None if self.bias is None else self.bias.float()
        logits = fp32_linear(x.reshape(-1, self.in_features), self.weight.float(), bias)  # (T, K) fp32
        probs = logits.softmax(dim=-1)  # (T, K)
        expert = probs.argmax(dim=-1)  # (T,)
        gate = gate_spec(self.config.gate)
        coeff = gate.coefficients(probs, expert)  # (T, K)
        if not _in_backward_pass():  # activation-checkpoint recomputation keeps the forward's record (and its mask)
            batch_size = leading_shape[0] if len(leading_shape) == 2 else 1
            valid = self._valid_tokens(leading_shape, x.device)
            self.record = RouterRecord(
                logits=logits,
                probs=probs,
                expert=expert,
                valid=valid,
                batch_size=batch_size,
                source_expert=self.source_expert,
            )
        self.decision = RoutingDecision(expert=expert, coeff=coeff, dense=gate.dense)
        return self.decision

    def route_mlp_input(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook on the MLP: route its input before any projection runs."""
        x = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
        self(x)

    def clear(self) -> None:
        """Drop the stored decision and record (and the graph they hold)."""
        self.decision = None
        self.record = None


def switch_balance_loss(probs: torch.Tensor, expert: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Switch Transformer balance loss of one layer: K * sum_i f_i * P_i over valid tokens (0 when none)."""
    num_experts = probs.shape[-1]
    probs, expert = probs[valid], expert[valid]
    if probs.shape[0] == 0:
        return probs.sum() * 0.0
    fraction = F.one_hot(expert, num_experts).to(probs.dtype).mean(0)  # (K,) f_i, no grad
    mean_prob = probs.mean(0)  # (K,) P_i
    return num_experts * (fraction * mean_prob).sum()


def z_loss(logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Router z-loss of one layer: mean over valid tokens of logsumexp(logits)^2 (0 when none)."""
    logits = logits[valid]
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return torch.logsumexp(logits, dim=-1).square().mean()


def pooled_balance_loss(records: list[RouterRecord]) -> torch.Tensor:
    """Official LLaVA-MoLE balance loss: per sample, pool the valid tokens of all layers, sum_i f_i * P_i (no K).

    Averaged over samples that have at least one valid token.
    """
    batch_size = records[0].batch_size
    prob_sums, count_sums, token_counts = 0.0, 0.0, 0.0
    for rec in records:
        if rec.batch_size != batch_size:
            raise ValueError("pooled balance loss needs the same batch size in every layer")
        num_experts = rec.probs.shape[-1]
        valid = rec.valid.reshape(batch_size, -1, 1).to(rec.probs.dtype)  # (B, S, 1)
        probs = rec.probs.reshape(batch_size, -1, num_experts)  # (B, S, K)
        one_hot = F.one_hot(rec.expert, num_experts).to(rec.probs.dtype).reshape(batch_size, -1, num_experts)
        prob_sums = prob_sums + (probs * valid).sum(1)  # (B, K)
        count_sums = count_sums + (one_hot * valid).sum(1)  # (B, K)
        token_counts = token_counts + valid.sum(1)  # (B, 1)
    has_tokens = token_counts.squeeze(1) > 0  # (B,)
    if not bool(has_tokens.any()):
        return records[0].probs.sum() * 0.0
    denom = token_counts.clamp_min(1.0)
    per_sample = ((prob_sums / denom) * (count_sums / denom)).sum(-1)  # (B,)
    return per_sample[has_tokens].mean()


def source_routing_loss(records: list[RouterRecord]) -> torch.Tensor:
    """Source-supervised routing loss: per layer, mean over samples b with a target e_b >= 0 and a valid token of
    ``-log p̄_b[e_b]`` where ``p̄_b = mean_{t valid in b} softmax(logits_{b,t})`` (K,); averaged over layers.

    Computed as ``log n_b - logsumexp_t log_softmax(logits_{b,t})[e_b]`` (stable for tiny probabilities) and without
    data-dependent branches or host syncs; 0 (with a graph) when no sample qualifies or no target was set.
    """
    per_layer = []
    for rec in records:
        if rec.source_expert is None:
            continue
        batch_size, num_experts = rec.batch_size, rec.logits.shape[-1]
        target = rec.source_expert.to(device=rec.logits.device, dtype=torch.long).reshape(-1)  # (B,)
        if target.shape[0] != batch_size:
            raise ValueError(f"source routing targets for {target.shape[0]} samples, the batch has {batch_size}")
        valid = rec.valid.reshape(batch_size, -1)  # (B, S)
        counts = valid.sum(1)  # (B,)
        weight = ((target >= 0) & (counts > 0)).to(rec.logits.dtype)  # (B,) samples that count
        # a sample without valid tokens pools all its tokens instead, so every term stays finite (weight 0 anyway)
        pooled = valid | (counts == 0)[:, None]  # (B, S)
        log_probs = rec.logits.log_softmax(-1).reshape(batch_size, -1, num_experts)  # (B, S, K)
        index = target.clamp(0, num_experts - 1)[:, None, None].expand(-1, log_probs.shape[1], 1)
        target_log_probs = log_probs.gather(2, index).squeeze(2)  # (B, S)
        target_log_probs = target_log_probs.masked_fill(~pooled, float("-inf"))
        log_mean = torch.logsumexp(target_log_probs, dim=1) - pooled.sum(1).to(rec.logits.dtype).log()  # (B,)
        per_layer.append(-(weight * log_mean).sum() / weight.sum().clamp_min(1.0))
    if not per_layer:
        return records[0].logits.sum() * 0.0
    return torch.stack(per_layer).mean()
