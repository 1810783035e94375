"""Routing analysis: which expert the tokens of each source go to, per MoLE layer, for image and text tokens.

:class:`RoutingAccumulator` hooks every :class:`~mole_lightning.peft.MoLERouter` of a model and counts, for each
forward, the valid (non-padding) tokens routed to each expert, by source (set per batch) and by token type (image
placeholder positions vs text). The result is a :class:`RoutingCounts` of shape ``(sources, layers, 2, experts)``
with:

* :meth:`RoutingCounts.fractions` -- per source and layer, the fraction of tokens routed to each expert (rows sum
  to 1);
* :meth:`RoutingCounts.specialization` -- per layer, the mutual information ``MI(source; expert)`` in bits, as a
  "domain specialization" score, and the same divided by ``H(source)`` (0: the expert choice says nothing about
  the source; 1: each source has its own experts).

With ``weighting="tokens"`` the joint distribution is the empirical one over all counted tokens (a source that
contributes more tokens weighs more); ``weighting="uniform"`` gives every source the same weight
(``p(s) = 1/S``, ``p(e|s)`` from its counts), which makes the score independent of how many samples each source
had. ``MI = sum_{s,e} p(s,e) log2(p(s,e) / (p(s) p(e)))`` (the plug-in estimate): :func:`mutual_information`,
:func:`source_entropy` take count tables, :func:`entropy` a probability vector, as torch tensors or numpy arrays.

:func:`plot_routing_heatmaps` draws one figure per group of layers (a source × expert heatmap per layer) and
:func:`log_routing_to_tensorboard` writes the scores and heatmaps to a TensorBoard ``SummaryWriter``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mole_lightning.peft import iter_routers

if TYPE_CHECKING:
    import numpy as np

TOKEN_TYPES = ("image", "text")
SELECTIONS = ("all", "image", "text")
WEIGHTINGS = ("tokens", "uniform")
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)(?:\.|$)")


def layer_label(router_name: str, position: int) -> str:
    """Short name of a router's layer: ``"L<i>"`` from ``...layers.<i>.mlp.router``, else ``"R<position>"``."""
    match = _LAYER_INDEX.search(router_name)
    return f"L{match.group(1)}" if match else f"R{position}"


# ------------------------------------------------------------------------------------------- information measures
def entropy(probabilities: torch.Tensor | np.ndarray) -> float:
    """Shannon entropy in bits of a probability vector (zeros ignored)."""
    p = torch.as_tensor(probabilities).double().flatten()
    p = p[p > 0]
    return float(-(p * p.log2()).sum()) if p.numel() else 0.0


def joint_distribution(counts: torch.Tensor | np.ndarray, weighting: str = "tokens") -> torch.Tensor:
    """``p(source, expert)`` from ``(S, K)`` token counts; sources without tokens are dropped under ``uniform``.

    Args:
        counts: Tokens of each source routed to each expert.
        weighting: ``"tokens"`` (empirical joint) or ``"uniform"`` (each source with tokens weighs ``1/S``).

    Returns:
        ``(S', K)`` float64 probabilities summing to 1 (all zeros when there is no token).
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    counts = torch.as_tensor(counts).double()
    if weighting == "tokens":
        total = counts.sum()
        return counts / total if total > 0 else counts
    rows = counts[counts.sum(1) > 0]
    if rows.shape[0] == 0:
        return rows
    return rows / rows.sum(1, keepdim=True) / rows.shape[0]


def mutual_information(counts: torch.Tensor | np.ndarray, weighting: str = "tokens") -> float:
    """``MI(source; expert)`` in bits from ``(S, K)`` token counts.

    0 when the expert distribution is the same for every source; ``H(source)`` when each expert serves one source.

    Args:
        counts: Tokens of each source (rows) routed to each expert (columns).
        weighting: See :func:`joint_distribution`.
    """
    joint = joint_distribution(counts, weighting)
    if joint.numel() == 0 or joint.sum() <= 0:
        return 0.0
    p_source = joint.sum(1, keepdim=True)
    p_expert = joint.sum(0, keepdim=True)
    mask = joint > 0
    ratio = joint[mask] / (p_source.expand_as(joint)[mask] * p_expert.expand_as(joint)[mask])
    return max(float((joint[mask] * ratio.log2()).sum()), 0.0)


def source_entropy(counts: torch.Tensor | np.ndarray, weighting: str = "tokens") -> float:
    """``H(source)`` in bits under the same weighting (the largest possible MI)."""
    joint = joint_distribution(counts, weighting)
    return entropy(joint.sum(1)) if joint.numel() else 0.0


# ------------------------------------------------------------------------------------------------------ the counts
@dataclass
class RoutingCounts:
    """Token counts per source, layer, token type and expert.

    Attributes:
        sources: Source names (first axis).
        layers: Layer labels (second axis), e.g. ``["L0", "L1"]``.
        counts: LongTensor ``(S, L, 2, K)``; the third axis is :data:`TOKEN_TYPES` (image, text).
    """

    sources: list[str]
    layers: list[str]
    counts: torch.Tensor

    @property
    def num_experts(self) -> int:
        """K."""
        return int(self.counts.shape[-1])

    def select(self, tokens: str = "all") -> torch.Tensor:
        """``(S, L, K)`` counts of ``"all"``, ``"image"`` or ``"text"`` tokens."""
        if tokens not in SELECTIONS:
            raise ValueError(f"tokens must be one of {SELECTIONS}, got {tokens!r}")
        if tokens == "all":
            return self.counts.sum(2)
        return self.counts[:, :, TOKEN_TYPES.index(tokens)]

    def fractions(self, tokens: str = "all") -> torch.Tensor:
        """``(S, L, K)`` fraction of each source's tokens routed to each expert; NaN rows where it had no token."""
        counts = self.select(tokens).double()
        totals = counts.sum(-1, keepdim=True)
        return torch.where(totals > 0, counts / totals.clamp_min(1), torch.full_like(counts, float("nan")))

    def specialization(self, tokens: str = "all", weighting: str = "tokens") -> list[dict[str, float | str]]:
        """Per layer: ``layer``, ``mi_bits`` = MI(source; expert), ``source_entropy_bits`` and ``normalized_mi`` =
        MI / H(source) (0 when H(source) is 0)."""
        counts = self.select(tokens)
        rows = []
        for index, layer in enumerate(self.layers):
            mi = mutual_information(counts[:, index], weighting)
            h = source_entropy(counts[:, index], weighting)
            rows.append(
                {
                    "layer": layer,
                    "mi_bits": mi,
                    "source_entropy_bits": h,
                    "normalized_mi": mi / h if h > 0 else 0.0,
                    "tokens": float(counts[:, index].sum()),
                }
            )
        return rows

    def fraction_rows(self) -> list[dict[str, Any]]:
        """CSV rows ``layer, token_type, source, tokens, expert_0..expert_{K-1}`` (fractions summing to 1) for every
        (token type in ``all``/``image``/``text``, layer, source) with at least one token."""
        rows = []
        for tokens in SELECTIONS:
            counts = self.select(tokens)
            fractions = self.fractions(tokens)
            for layer_index, layer in enumerate(self.layers):
                for source_index, source in enumerate(self.sources):
                    total = int(counts[source_index, layer_index].sum())
                    if total == 0:
                        continue
                    row: dict[str, Any] = {"layer": layer, "token_type": tokens, "source": source, "tokens": total}
                    for expert in range(self.num_experts):
                        row[f"expert_{expert}"] = float(fractions[source_index, layer_index, expert])
                    rows.append(row)
        return rows

    def all_reduce(self) -> RoutingCounts:
        """Sums the counts over ranks in place when ``torch.distributed`` is initialized (collective: every rank must
        call it with the same shape); returns ``self``."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            backend = torch.distributed.get_backend()
            device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
            tensor = self.counts.to(device)
            torch.distributed.all_reduce(tensor)
            self.counts = tensor.cpu()
        return self


# -------------------------------------------------------------------------------------------------- accumulation
class RoutingAccumulator:
    """Counts routed tokens by source, layer, token type and expert while a model runs.

    Use as a context manager around forwards or ``generate`` calls, calling :meth:`set_batch` before each batch::

        acc = RoutingAccumulator(model, sources=["general", "doc"])
        with acc:
            for name, loader in loaders.items():
                for batch in loader:
                    acc.set_batch(name, batch["input_ids"] == model.image_token_id)
                    model(**inputs)
        counts = acc.result()          # RoutingCounts on the CPU

    Only tokens the router marks valid (the attention mask passed by the model) are counted. A forward whose token
    count equals the batch's ``input_ids`` size is the full prompt (image placeholders are image tokens); any other
    forward is a cached decoding step (new text tokens), counted only with ``include_generated``.

    Args:
        model: A model containing MoLE routers (e.g. :class:`~mole_lightning.models.LlavaMoLE`).
        sources: Source names (order of the first axis).
        include_generated: Also count the tokens produced during generation.
    """

    def __init__(self, model: nn.Module, sources: Sequence[str], include_generated: bool = False) -> None:
        self.routers = list(iter_routers(model))
        if not self.routers:
            raise ValueError("the model has no MoLE router (MoLE not applied, or one expert)")
        self.sources = list(sources)
        self.layers = [layer_label(name, i) for i, (name, _) in enumerate(self.routers)]
        self.num_experts = self.routers[0][1].num_experts
        self.include_generated = include_generated
        self._counts: torch.Tensor | None = None
        self._source: int | None = None
        self._image_mask: torch.Tensor | None = None
        self._handles: list[Any] = []
        self._prefill_pending = [True] * len(self.layers)

    def set_batch(self, source: str, image_mask: torch.Tensor | None) -> None:
        """Declares the source and image-token mask ``(B, L)`` of the next forwards (``None``: no image tokens; the
        next forward of each layer is then taken as the prompt)."""
        if source not in self.sources:
            self.sources.append(source)
            if self._counts is not None:
                extra = self._counts.new_zeros((1, *self._counts.shape[1:]))
                self._counts = torch.cat([self._counts, extra])
        self._source = self.sources.index(source)
        self._image_mask = image_mask
        self.new_batch()

    def pause(self) -> None:
        """Counts nothing until the next :meth:`set_batch` (e.g. during filler forwards)."""
        self._source = None

    def _hook(self, layer: int) -> Any:
        def count(module: nn.Module, args: Any, output: Any) -> None:
            record = getattr(module, "record", None)
            if record is None or self._source is None:
                return
            expert = record.expert
            if self._counts is None:
                shape = (len(self.sources), len(self.layers), len(TOKEN_TYPES), self.num_experts)
                self._counts = torch.zeros(shape, dtype=torch.long, device=expert.device)
            mask = self._image_mask
            if mask is not None and mask.numel() == expert.numel():
                token_type = (~mask.reshape(-1).to(expert.device)).long()  # 0 image, 1 text
            elif mask is None and self._prefill_pending[layer]:
                token_type = torch.ones_like(expert)
            elif self.include_generated:
                token_type = torch.ones_like(expert)
            else:
                return
            self._prefill_pending[layer] = False
            index = token_type * self.num_experts + expert
            valid = record.valid.to(expert.device)
            flat = torch.zeros(len(TOKEN_TYPES) * self.num_experts, dtype=torch.long, device=expert.device)
            flat.scatter_add_(0, index[valid], torch.ones_like(index[valid]))
            counts = self._counts.to(expert.device) if self._counts.device != expert.device else self._counts
            counts[self._source, layer] += flat.view(len(TOKEN_TYPES), self.num_experts)
            self._counts = counts

        return count

    def new_batch(self) -> None:
        """Marks the next forward of every layer as a prompt (used when no image mask is given)."""
        self._prefill_pending = [True] * len(self.layers)

    def __enter__(self) -> RoutingAccumulator:
        self._handles = [router.register_forward_hook(self._hook(i)) for i, (_, router) in enumerate(self.routers)]
        return self

    def __exit__(self, *exc_info: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def result(self) -> RoutingCounts:
        """The counts so far, on the CPU (zeros when nothing was counted)."""
        if self._counts is None:
            counts = torch.zeros(len(self.sources), len(self.layers), len(TOKEN_TYPES), self.num_experts)
        else:
            counts = self._counts.detach().cpu()
        return RoutingCounts(sources=list(self.sources), layers=list(self.layers), counts=counts.long())


# ------------------------------------------------------------------------------------------------------- plotting
def plot_routing_heatmaps(
    counts: RoutingCounts, tokens: str = "all", layers_per_figure: int = 8, title: str | None = None
) -> list[tuple[str, Any]]:
    """Heatmaps of :meth:`RoutingCounts.fractions`: one figure per group of ``layers_per_figure`` layers, one
    source × expert panel per layer, each cell annotated with its fraction.

    Args:
        counts: The routing counts.
        tokens: ``"all"``, ``"image"`` or ``"text"``.
        layers_per_figure: Layers per figure.
        title: Figure title prefix.

    Returns:
        ``[(group label such as "L0-L7", matplotlib Figure)]``; close them with ``matplotlib.pyplot.close``.
    """
    import matplotlib  # headless backend chosen at call time, before pyplot draws

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt  # only once a headless backend is chosen (matplotlib.use("Agg"))

    fractions = counts.fractions(tokens).numpy()
    specialization = counts.specialization(tokens)
    num_sources, num_layers, num_experts = fractions.shape
    figures = []
    for start in range(0, num_layers, max(1, layers_per_figure)):
        group = list(range(start, min(num_layers, start + layers_per_figure)))
        cols = min(4, len(group))
        rows = math.ceil(len(group) / cols)
        fig, axes = plt.subplots(
            rows,
            cols,
            figsize=(1.0 + 0.7 * num_experts * cols + 1.2, 0.6 + 0.5 * num_sources * rows + 0.6 * rows),
            squeeze=False,
        )
        image = None
        for slot, ax in enumerate(axes.flat):
            if slot >= len(group):
                ax.axis("off")
                continue
            layer = group[slot]
            data = fractions[:, layer]
            image = ax.imshow(data, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
            ax.set_title(f"{counts.layers[layer]}  MI={specialization[layer]['mi_bits']:.3f}", fontsize=8)
            ax.set_xticks(range(num_experts), [f"e{e}" for e in range(num_experts)], fontsize=7)
            ax.set_yticks(range(num_sources), counts.sources if slot % cols == 0 else [], fontsize=7)
            for s in range(num_sources):
                for e in range(num_experts):
                    value = data[s, e]
                    label = "-" if value != value else f"{value:.2f}"
                    colour = "black" if value == value and value > 0.6 else "white"
                    ax.text(e, s, label, ha="center", va="center", fontsize=6, color=colour)
        label = f"{counts.layers[group[0]]}-{counts.layers[group[-1]]}"
        fig.suptitle(f"{title or 'token fraction per expert'} ({tokens} tokens, {label})", fontsize=9)
        if image is not None:
            fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8)
        figures.append((label, fig))
    return figures


def log_routing_to_tensorboard(
    experiment: Any, counts: RoutingCounts, step: int, prefix: str = "routing", figures: bool = True
) -> dict[str, float]:
    """Writes per-layer MI scores (all/image/text tokens) as scalars and the all-token heatmaps as figures.

    Args:
        experiment: A ``torch.utils.tensorboard.SummaryWriter`` (``TensorBoardLogger.experiment``).
        counts: The routing counts.
        step: Global step.
        prefix: Tag prefix.
        figures: Also add the heatmap figures.

    Returns:
        The scalars written, ``{"<prefix>/mi_<tokens>/<layer>": bits, "<prefix>/mi_<tokens>/mean": ...}``.
    """
    scalars: dict[str, float] = {}
    for tokens in SELECTIONS:
        rows = [r for r in counts.specialization(tokens) if r["tokens"] > 0]
        for row in rows:
            scalars[f"{prefix}/mi_{tokens}/{row['layer']}"] = float(row["mi_bits"])
        if rows:
            scalars[f"{prefix}/mi_{tokens}/mean"] = sum(float(r["mi_bits"]) for r in rows) / len(rows)
    for tag, value in scalars.items():
        experiment.add_scalar(tag, value, step)
    if figures and int(counts.counts.sum()) > 0:
        import matplotlib.pyplot as plt  # only once a headless backend is chosen (matplotlib.use("Agg"))

        for label, fig in plot_routing_heatmaps(counts, "all"):
            experiment.add_figure(f"{prefix}/heatmap/{label}", fig, step, close=True)
            plt.close(fig)
    return scalars
