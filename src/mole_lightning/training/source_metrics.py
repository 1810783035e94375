"""Per-source evaluation losses and expert shares as a torchmetrics ``Metric``, synchronised over ranks.

For every source (one validation/test loader per source) the token-weighted mean cross-entropy of the reply tokens
and the share of tokens routed to each expert (over all layers). Logged names::

    <prefix>/<source>/loss, <prefix>/<source>/ppl, <prefix>/<source>/expert<k>, <prefix>/loss (all sources)
"""

from __future__ import annotations

import math

import torch
from torchmetrics import Metric


class SourceLossMetric(Metric):
    """Sums, per source, ``[loss × tokens, tokens, tokens of expert 0..K-1]`` in one ``(S, 2 + K)`` state.

    Every rank declares the same sources in the same order, so the summed state means the same on all ranks.

    Args:
        sources: Source names, in loader order.
        num_experts: K (1 for plain LoRA: no expert shares are reported).
    """

    full_state_update = False

    def __init__(self, sources: list[str], num_experts: int) -> None:
        super().__init__()
        self.sources = list(sources)
        self.num_experts = num_experts
        self.add_state(
            "sums", default=torch.zeros(len(sources), 2 + num_experts, dtype=torch.float64), dist_reduce_fx="sum"
        )

    def update(self, source: str, loss: torch.Tensor, tokens: torch.Tensor, counts: torch.Tensor | None) -> None:
        """Add a batch of ``source``: its mean ``loss`` over ``tokens`` targets and its ``(K,)`` expert ``counts``."""
        row = self.sources.index(source)
        self.sums[row, 0] += loss.detach().double() * tokens
        self.sums[row, 1] += tokens
        if counts is not None:
            self.sums[row, 2:] += counts.double()

    def compute(self) -> dict[str, float]:
        """Loss, perplexity and expert shares per source and the loss over all sources (sources without targets
        are left out)."""
        metrics: dict[str, float] = {}
        for source, (loss_sum, tokens, *counts) in zip(self.sources, self.sums.tolist()):
            if not tokens:
                continue
            loss = loss_sum / tokens
            metrics[f"{source}/loss"] = loss
            metrics[f"{source}/ppl"] = math.exp(min(loss, 50.0))
            if self.num_experts > 1 and sum(counts) > 0:
                for expert, count in enumerate(counts):
                    metrics[f"{source}/expert{expert}"] = count / sum(counts)
        total = self.sums.sum(0)
        if float(total[1]):
            metrics["loss"] = float(total[0] / total[1])
        return metrics
