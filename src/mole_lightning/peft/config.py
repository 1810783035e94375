"""`MoLEConfig`: every knob of the sparse Mixture of LoRA Experts adapter, validated on construction.

Defaults are structural (which modules, which formulas), not tuned values: ranks, coefficients and expert counts
for real runs live in `configs/`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from mole_lightning.peft.gates import gate_spec

BalanceMode = Literal["switch", "pooled"]
ComputeImpl = Literal["auto", "dense_masked", "grouped", "loop"]

BALANCE_MODES: tuple[str, ...] = get_args(BalanceMode)
COMPUTE_IMPLS: tuple[str, ...] = get_args(ComputeImpl)


@dataclass
class MoLEConfig:
    """Configuration of LoRA on attention and a Mixture of LoRA Experts on every MLP.

    Attributes:
        num_experts: K, LoRA experts per MLP projection. ``1`` is plain LoRA on the MLP (no router).
        rank: r, LoRA rank of attention adapters and of every expert.
        alpha: LoRA alpha; adapters are scaled by ``alpha / rank``.
        mlp_rank: LoRA rank of the MLP adapters (every expert), ``None``: ``rank``. With ``num_experts=1`` and
            ``mlp_rank = K * rank`` this is the parameter-matched dense baseline of a K-expert MoLE: the same
            trainable count (less the routers), attention kept at ``rank``, every MLP parameter active per token.
        mlp_alpha: LoRA alpha of the MLP adapters, ``None``: ``alpha * mlp_rank / rank`` (the same scale
            ``alpha / rank`` as attention).
        dropout: dropout on the adapter input (the base path never sees it); 0.05 as in the official code
            (``moe.py: LoRALayer`` and its PEFT ``LoraConfig``; the paper does not state it).
        attn_targets: names of attention projections that get plain LoRA (matched on the last name component).
        mlp_targets: names of MLP projections that get K experts (matched on the last name component inside a
            module that holds at least one of them).
        gate: name of a registered gate mode (`peft.gates`: how the top-1 router's probability enters the
            output). ``"prob"``: expert delta scaled by its top-1 probability (Switch Transformer).
            ``"straight_through"``: unscaled forward, gradient through the probability. ``"none"``: unscaled; the
            router learns only from the balance loss (the official code's sparse path). ``"soft"``: dense mixture,
            every expert weighted by the softmax (the official released config; costs K times plain LoRA).
            `register_gate` adds more.
        balance: ``"switch"``: K * sum_i f_i * P_i per layer, averaged over layers. ``"pooled"``: the official
            variant, per sample over all layers' valid tokens pooled, sum_i f_i * P_i without the K factor,
            averaged over samples.
        balance_coef: weight of the balance loss in the total auxiliary loss (0.01, the Switch Transformer value;
            must be > 0 with a gate mode whose coefficient carries no gradient to the router, e.g. ``gate="none"``:
            the balance loss is then the router's only training signal).
        z_loss_coef: weight of the router z-loss mean(logsumexp(logits)^2) (0 disables it).
        impl: compute path of the routed experts; all give the same result. ``"loop"``: per-expert reference.
            ``"dense_masked"``: all experts' A in one matmul, masked rank-r intermediate, one matmul with stacked B.
            ``"grouped"``: sort tokens by expert and use ``torch.nn.functional.grouped_mm``. ``"auto"``: picks
            by device, dtype and shapes.
        router_bias: whether the router Linear(d, K) has a bias (the official code has one).
        source_routing_coef: weight of the source-supervised routing loss (0 disables it): per MLP router,
            ``-log p̄_b[e_b]`` with ``p̄_b`` the sample's router probabilities averaged over its valid tokens and
            ``e_b`` the expert assigned to the sample's data source (`source_experts`); averaged over layers and
            over samples with a known source. Training only: the router needs no label at inference.
        source_expert_map: ``{source: expert}`` assignment for that loss (many-to-one allowed; sources left out are
            not supervised). ``None``: one expert per source, in the order the training sources are declared.
    """

    num_experts: int = 3
    rank: int = 8
    alpha: float = 16.0
    mlp_rank: int | None = None
    mlp_alpha: float | None = None
    dropout: float = 0.05
    attn_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    mlp_targets: list[str] = field(default_factory=lambda: ["gate_proj", "up_proj", "down_proj"])
    gate: str = "prob"
    balance: BalanceMode = "switch"
    balance_coef: float = 0.01
    z_loss_coef: float = 0.0
    impl: ComputeImpl = "auto"
    router_bias: bool = True
    source_routing_coef: float = 0.0
    source_expert_map: dict[str, int] | None = None

    def __post_init__(self) -> None:
        self.attn_targets = list(self.attn_targets)
        self.mlp_targets = list(self.mlp_targets)
        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise ValueError(f"MoLEConfig.num_experts must be an integer >= 1, got {self.num_experts!r}")
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"MoLEConfig.rank must be an integer >= 1, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"MoLEConfig.alpha must be > 0, got {self.alpha!r}")
        if self.mlp_rank is not None and (not isinstance(self.mlp_rank, int) or self.mlp_rank < 1):
            raise ValueError(f"MoLEConfig.mlp_rank must be None or an integer >= 1, got {self.mlp_rank!r}")
        if self.mlp_alpha is not None and not self.mlp_alpha > 0:
            raise ValueError(f"MoLEConfig.mlp_alpha must be None or > 0, got {self.mlp_alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"MoLEConfig.dropout must be in [0, 1), got {self.dropout!r}")
        gate = gate_spec(self.gate)
        if self.balance not in BALANCE_MODES:
            raise ValueError(f"MoLEConfig.balance must be one of {BALANCE_MODES}, got {self.balance!r}")
        if self.impl not in COMPUTE_IMPLS:
            raise ValueError(f"MoLEConfig.impl must be one of {COMPUTE_IMPLS}, got {self.impl!r}")
        for name in ("balance_coef", "z_loss_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"MoLEConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        self._check_source_routing()
        if (
            not gate.router_gradient
            and self.num_experts > 1
            and self.balance_coef == 0
            and not self.source_routing_coef
        ):
            raise ValueError(
                f"MoLEConfig: gate={self.gate!r} with balance_coef=0 never trains the router (the balance loss is its "
                "only gradient); set balance_coef > 0 (official: 0.05 with balance='pooled') or use gate='prob'"
            )
        overlap = set(self.attn_targets) & set(self.mlp_targets)
        if overlap:
            raise ValueError(f"MoLEConfig: {sorted(overlap)} listed in both attn_targets and mlp_targets")
        if not self.attn_targets and not self.mlp_targets:
            raise ValueError("MoLEConfig: attn_targets and mlp_targets are both empty; nothing to adapt")

    def _check_source_routing(self) -> None:
        """Validate ``source_routing_coef`` and ``source_expert_map`` (experts must exist: 0 <= e < K)."""
        if not self.source_routing_coef >= 0:
            raise ValueError(f"MoLEConfig.source_routing_coef must be >= 0, got {self.source_routing_coef!r}")
        if self.source_routing_coef > 0 and self.num_experts < 2:
            raise ValueError("MoLEConfig.source_routing_coef > 0 needs num_experts >= 2 (K = 1 has no router)")
        if self.source_expert_map is None:
            return
        self.source_expert_map = dict(self.source_expert_map)
        for source, expert in self.source_expert_map.items():
            if isinstance(expert, bool) or not isinstance(expert, int) or not 0 <= expert < self.num_experts:
                raise ValueError(
                    f"MoLEConfig.source_expert_map[{source!r}] = {expert!r} is not an expert index in "
                    f"[0, {self.num_experts}) (num_experts={self.num_experts})"
                )

    def source_experts(self, sources: list[str]) -> dict[str, int]:
        """``{source: expert}`` targets of the source-supervised routing loss for the declared training ``sources``.

        With ``source_expert_map`` that map; otherwise expert ``i`` for the ``i``-th source, which needs
        K >= len(sources). Sources absent from the result contribute nothing to the loss.

        Raises:
            ValueError: K < len(sources) without a map.
        """
        if self.source_expert_map is not None:
            return dict(self.source_expert_map)
        sources = list(dict.fromkeys(sources))
        if len(sources) > self.num_experts:
            raise ValueError(
                f"source routing with one expert per source needs num_experts >= {len(sources)} sources "
                f"{sources}, got num_experts={self.num_experts}; set mole.source_expert_map to share experts"
            )
        return {source: index for index, source in enumerate(sources)}

    @property
    def scaling(self) -> float:
        """The LoRA scale ``alpha / rank`` of the attention adapters."""
        return self.alpha / self.rank

    @property
    def expert_rank(self) -> int:
        """Rank of the MLP adapters: ``mlp_rank``, else ``rank``."""
        return self.rank if self.mlp_rank is None else self.mlp_rank

    @property
    def expert_alpha(self) -> float:
        """Alpha of the MLP adapters: ``mlp_alpha``, else ``alpha * expert_rank / rank`` (attention's scale)."""
        return self.alpha * self.expert_rank / self.rank if self.mlp_alpha is None else self.mlp_alpha

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dictionary; ``MoLEConfig(**cfg.to_dict())`` rebuilds the same config."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MoLEConfig:
        """Build from a dictionary, naming any unknown key in the error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"MoLEConfig: unknown field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**values)
