"""Methods of the data-conflict study and one training run ("job") of a method on one seed.

Every method puts plain LoRA of rank r (alpha = 2r) on the attention projections q, k, v, o, identical across
methods, and differs only in the MLP adapter and in its data:

=============  ====================================  ==============================  ==========================
method         MLP adapter (gate, up, down)          data                            activated MLP adapter
=============  ====================================  ==============================  ==========================
``single``     LoRA rank r                           one domain (one run per domain)  r
``mix``        LoRA rank r                           union of the D domain sets       r
``mix2x``      LoRA rank r                           union of 2x larger domain sets   r
``mix_long``   LoRA rank r                           union, twice the epochs          r
``dense``      LoRA rank K*r (parameter-matched)     union                            K*r
``mole``       K routed rank-r experts, top-1        union                            r (+ router)
``soft``       K rank-r experts, softmax mixture     union                            K*r (+ router)
``mole_src``   as ``mole``, plus source-supervised   union, each sample's domain      r (+ router)
               routing toward its domain's expert    as the routing target
=============  ====================================  ==============================  ==========================

``mole_src`` adds ``source_routing_coef`` times the source-supervised routing loss (``docs/peft.md``): the domain
index is the sample's source; its expert is ``source_map[d]`` (one expert per domain when unset, which needs K >= D).
The label is used in training only; evaluation routes without it.

All runs use the same optimiser, batch size and number of epochs over their own data (so ``mix2x`` takes twice the
steps of ``mix``, and ``single`` 1/D of them; ``mix_long`` takes the steps of ``mix2x`` on the data of ``mix``,
which tells a gain from more data apart from a gain from more steps), and are evaluated on the same held-out
per-domain sets at the same numbers of per-domain samples seen. Adapters are built with the project's `apply_mole`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from experiments.conflict_study.base import BaseConfig, load_base, lr_factor
from experiments.conflict_study.tasks import DomainSet, TaskConfig, domain_rules, make_domain_sets
from mole_lightning.peft import (
    MoLEConfig,
    apply_mole,
    collect_aux,
    gate_spec,
    iter_routers,
    routing_mask,
    source_supervision,
)

METHOD_KINDS: tuple[str, ...] = ("single", "mix", "mix2x", "mix_long", "dense", "mole", "soft", "mole_src")

SourceVariant = tuple[str, str, float, float, tuple[int, ...] | None]
"""(gate, balance, balance_coef, source_routing_coef, domain -> expert map or None) of a ``mole_src`` method."""


@dataclass(frozen=True)
class MethodSpec:
    """One method of the comparison.

    Attributes:
        name: label used in tables and plots (e.g. ``mole[prob,switch=0.01]``).
        kind: one of `METHOD_KINDS`.
        num_experts: K of the MLP adapter (1 for the LoRA methods).
        mlp_rank: rank of each MLP expert (K*r for ``dense``).
        gate: router gate mode (``mole``/``soft``).
        balance: balance-loss form (``switch`` or ``pooled``).
        balance_coef: balance-loss weight.
        z_loss_coef: router z-loss weight.
        data_mult: samples per domain relative to the base count (2 for ``mix2x``).
        epoch_mult: epochs relative to the shared schedule (2 for ``mix_long``).
        lr: peak learning rate of this method; None uses the schedule's shared one.
        source_routing_coef: weight of the source-supervised routing loss (``mole_src``; 0 otherwise).
        source_map: expert of each domain index for that loss; None: domain d -> expert d.
    """

    name: str
    kind: str
    num_experts: int = 1
    mlp_rank: int = 2
    gate: str = "prob"
    balance: str = "switch"
    balance_coef: float = 0.0
    z_loss_coef: float = 0.0
    data_mult: int = 1
    epoch_mult: int = 1
    lr: float | None = None
    source_routing_coef: float = 0.0
    source_map: tuple[int, ...] | None = None

    @property
    def routed(self) -> bool:
        return self.num_experts > 1

    def source_expert_map(self) -> dict[str, int] | None:
        """``MoLEConfig.source_expert_map`` of the method: ``{str(domain): expert}`` (None: one expert per domain)."""
        return None if self.source_map is None else {str(d): e for d, e in enumerate(self.source_map)}


def make_methods(
    kinds: list[str],
    rank: int,
    num_experts: int,
    mole_variants: list[tuple[str, str, float]],
    z_loss_coef: float = 0.0,
    source_variants: list[SourceVariant] | None = None,
) -> list[MethodSpec]:
    """Method specs from kind names; ``mole`` expands into one spec per (gate, balance, coef) variant.

    A kind may carry its own peak learning rate as ``kind@lr`` (``dense@0.0025``), so a baseline can be run at
    the learning rate that suits its rank next to the shared one; the lr then appears in the method's name.

    Args:
        kinds: subset of `METHOD_KINDS` (optionally ``kind@lr``), in the order wanted.
        rank: r, the LoRA rank of attention adapters and of every expert.
        num_experts: K.
        mole_variants: (gate, balance, balance_coef) triples for ``mole``.
        z_loss_coef: router z-loss weight for routed methods.
        source_variants: (gate, balance, balance_coef, source_routing_coef, map) for ``mole_src``
            (`parse_source_variants`).
    """
    specs: list[MethodSpec] = []
    for item in kinds:
        kind, _, lr_text = item.partition("@")
        if kind not in METHOD_KINDS:
            raise ValueError(f"unknown method {kind!r}; choose from {METHOD_KINDS}")
        lr = _parse_lr(item, lr_text)
        tag = "" if lr is None else f"lr={lr:g}"
        if kind in ("single", "mix"):
            specs.append(MethodSpec(_name(kind, tag), kind, 1, rank, lr=lr))
        elif kind == "mix2x":
            specs.append(MethodSpec(_name(kind, tag), kind, 1, rank, data_mult=2, lr=lr))
        elif kind == "mix_long":
            specs.append(MethodSpec(_name(kind, tag), kind, 1, rank, epoch_mult=2, lr=lr))
        elif kind == "dense":
            specs.append(MethodSpec(_name("dense", f"r={num_experts * rank}", tag), kind, 1, num_experts * rank, lr=lr))
        elif kind == "soft":
            name = _name("soft", tag)
            specs.append(MethodSpec(name, kind, num_experts, rank, gate="soft", z_loss_coef=z_loss_coef, lr=lr))
        elif kind == "mole_src":
            for gate, balance, coef, src_coef, source_map in source_variants or []:
                where = "" if source_map is None else "map=" + "/".join(map(str, source_map))
                name = _name("mole_src", gate, f"{balance}={coef:g}", f"src={src_coef:g}", where, tag)
                specs.append(
                    MethodSpec(
                        name,
                        kind,
                        num_experts,
                        rank,
                        gate,
                        balance,
                        coef,
                        z_loss_coef,
                        lr=lr,
                        source_routing_coef=src_coef,
                        source_map=source_map,
                    )
                )
        else:
            for gate, balance, coef in mole_variants:
                name = _name("mole", gate, f"{balance}={coef:g}", tag)
                specs.append(MethodSpec(name, kind, num_experts, rank, gate, balance, coef, z_loss_coef, lr=lr))
    return specs


def _parse_lr(item: str, text: str) -> float | None:
    """The ``lr`` of a ``kind@lr`` method item (None without ``@``)."""
    if not text:
        return None
    try:
        lr = float(text)
    except ValueError:
        raise ValueError(f"method {item!r}: the part after '@' must be a learning rate, e.g. dense@0.0025") from None
    if not lr > 0:
        raise ValueError(f"method {item!r}: learning rate must be > 0")
    return lr


def _name(kind: str, *tags: str) -> str:
    """``mole[prob,switch=0.01]``-style label; no brackets without tags."""
    tags = tuple(t for t in tags if t)
    return f"{kind}[{','.join(tags)}]" if tags else kind


def parse_variants(text: str) -> list[tuple[str, str, float]]:
    """``"prob:switch:0.01,none:pooled:0.05"`` -> [("prob", "switch", 0.01), ("none", "pooled", 0.05)]."""
    variants = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        parts = item.split(":")
        if len(parts) != 3:
            raise ValueError(f"MoLE variant {item!r} is not gate:balance:coef")
        variants.append((parts[0], parts[1], float(parts[2])))
    return variants


def parse_source_variants(text: str) -> list[SourceVariant]:
    """``"prob:switch:0.01:1,prob:switch:0.01:1:0/0/1/1/2/2"`` -> (gate, balance, coef, source coef, map) tuples.

    The optional fifth field is the expert of domain 0, 1, ... separated by ``/`` (many-to-one allowed); without it
    domain d is sent to expert d.
    """
    variants: list[SourceVariant] = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        parts = item.split(":")
        if len(parts) not in (4, 5):
            raise ValueError(f"source-routing variant {item!r} is not gate:balance:coef:source_coef[:e0/e1/...]")
        try:
            source_map = tuple(int(e) for e in parts[4].split("/")) if len(parts) == 5 else None
            variants.append((parts[0], parts[1], float(parts[2]), float(parts[3]), source_map))
        except ValueError:
            raise ValueError(f"source-routing variant {item!r}: coefficients are numbers, the map integers") from None
    return variants


@dataclass(frozen=True)
class TrainConfig:
    """Adapter-finetuning schedule shared by every method.

    Attributes:
        rank: r, attention LoRA rank (and expert rank).
        num_experts: K.
        per_domain: training samples per domain (``mix2x`` uses twice as many).
        epochs: passes over each run's own data.
        batch: batch size.
        lr: peak learning rate (AdamW, 5% warmup, cosine to 10%).
        evals_per_epoch: evaluations per epoch of ``per_domain`` samples per domain.
        eval_per_domain: held-out samples per domain.
        impl: compute path of the routed experts.
    """

    rank: int = 2
    num_experts: int = 3
    per_domain: int = 256
    epochs: int = 12
    batch: int = 32
    lr: float = 3e-3
    evals_per_epoch: int = 2
    eval_per_domain: int = 128
    impl: str = "auto"


def study_schedule_and_methods(args: Any, z_loss_coef: float = 0.0) -> tuple[TrainConfig, list[MethodSpec]]:
    """The shared schedule and the method specs of a study's parsed command line (``--rank``, ``--experts``,
    ``--per-domain``, ``--epochs``, ``--batch``, ``--lr``, ``--evals-per-epoch``, ``--eval-per-domain``, ``--impl``,
    ``--methods``, ``--mole-variants``, ``--source-variants``); ``z_loss_coef`` for the routed methods."""
    train = TrainConfig(
        rank=args.rank,
        num_experts=args.experts,
        per_domain=args.per_domain,
        epochs=args.epochs,
        batch=args.batch,
        lr=args.lr,
        evals_per_epoch=args.evals_per_epoch,
        eval_per_domain=args.eval_per_domain,
        impl=args.impl,
    )
    kinds = [k.strip() for k in args.methods.split(",") if k.strip()]
    variants, source_variants = parse_variants(args.mole_variants), parse_source_variants(args.source_variants)
    return train, make_methods(kinds, args.rank, args.experts, variants, z_loss_coef, source_variants)


@dataclass
class JobSpec:
    """One training run: a method on one seed (and, for ``single``, one domain)."""

    task: TaskConfig
    base: BaseConfig
    train: TrainConfig
    method: MethodSpec
    seed: int
    base_path: str
    domain: int | None = None

    @property
    def label(self) -> str:
        suffix = "" if self.domain is None else f"/d{self.domain}"
        return f"seed{self.seed}:{self.method.name}{suffix}"


@dataclass
class JobResult:
    """What a job returns (plain, picklable values).

    Attributes:
        seed, method, domain: identify the job.
        samples: (P,) per-domain training samples seen at each evaluation point.
        steps: (P,) optimiser steps at each evaluation point.
        loss: (P, D_eval) mean answer cross-entropy (nats/token) per evaluated domain.
        em: (P, D_eval) exact match per evaluated domain.
        domains: the evaluated domain indices (all D, or the single one).
        params: trainable adapter parameters; ``activated``: adapter parameters used per token.
        routing: for routed methods, per layer ``{"domain": (D, K), "domain_answer": (D, K), "token": (V, K)}``
            expert counts on the held-out sets after training.
        seconds: wall time.
    """

    seed: int
    method: str
    domain: int | None
    samples: list[int]
    steps: list[int]
    loss: np.ndarray
    em: np.ndarray
    domains: list[int]
    params: int
    activated: int
    routing: list[dict[str, np.ndarray]] = field(default_factory=list)
    seconds: float = 0.0


def adapt_model(model: nn.Module, method: MethodSpec, train: TrainConfig) -> nn.Module:
    """Add the method's adapters with `apply_mole`: attention LoRA rank r always, the MLP adapter per method.

    When the MLP rank differs from r (``dense``), the MLP is adapted by one `apply_mole` call on the whole model
    (no attention targets) and each layer's attention by a second call on that ``self_attn`` module.
    """
    rank = train.rank
    mlp_cfg = MoLEConfig(
        num_experts=method.num_experts,
        rank=method.mlp_rank,
        alpha=2.0 * method.mlp_rank,
        gate=method.gate,
        balance=method.balance,
        balance_coef=method.balance_coef,
        z_loss_coef=method.z_loss_coef,
        impl=train.impl,
        source_routing_coef=method.source_routing_coef,
        source_expert_map=method.source_expert_map(),
    )
    if method.mlp_rank == rank:
        return apply_mole(model, mlp_cfg)
    apply_mole(model, MoLEConfig(**{**mlp_cfg.to_dict(), "attn_targets": []}))
    attn_cfg = MoLEConfig(num_experts=1, rank=rank, alpha=2.0 * rank, mlp_targets=[])
    for layer in model.model.layers:
        apply_mole(layer.self_attn, attn_cfg)
    return model


def adapter_counts(model: nn.Module, method: MethodSpec) -> tuple[int, int]:
    """(trainable, activated per token) adapter parameter counts; a top-1 expert activates 1/K of its block."""
    trainable = activated = 0
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        n = param.numel()
        trainable += n
        is_expert = method.routed and name.rsplit(".", 1)[-1] in ("lora_A", "lora_B") and param.dim() == 3
        activated += n // method.num_experts if is_expert and not gate_spec(method.gate).dense else n
    return trainable, activated


@torch.no_grad()
def evaluate(
    model: nn.Module, sets: list[DomainSet], task: TaskConfig, *, routing: bool = False, batch: int = 256
) -> tuple[np.ndarray, np.ndarray, list[dict[str, np.ndarray]]]:
    """Answer loss and exact match per domain set; optionally the expert-count tables of every router.

    Args:
        model: the adapted model (switched to eval mode and back).
        sets: held-out sets, one per evaluated domain (all samples of a set share its domain).
        task: the task family (answer positions, vocabulary).
        routing: collect routing tables (routed models only).
        batch: evaluation batch size.

    Returns:
        loss (D_eval,), em (D_eval,), and per layer ``{"domain": (D, K), "domain_answer": (D, K), "token": (V, K)}``.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    routers = [router for _, router in iter_routers(model)] if routing else []
    num_experts = routers[0].num_experts if routers else 0
    tables = [
        {
            "domain": np.zeros((task.num_domains, num_experts), np.int64),
            "domain_answer": np.zeros((task.num_domains, num_experts), np.int64),
            "token": np.zeros((task.vocab_size, num_experts), np.int64),
        }
        for _ in routers
    ]
    start, length = task.answer_start, task.length
    answer_pos = torch.zeros(task.seq_len, dtype=torch.bool)
    answer_pos[start - 1 : start - 1 + length] = True  # positions whose outputs predict y_1..y_L
    losses, ems = [], []
    for dset in sets:
        loss_sum, em_sum, count = 0.0, 0.0, 0
        for lo in range(0, len(dset), batch):
            ids = dset.input_ids[lo : lo + batch].to(device)  # (B, S)
            mask = torch.ones_like(ids)
            with routing_mask(model, mask):
                logits = model(input_ids=ids, attention_mask=mask).logits  # (B, S, V)
            pred_logits = logits[:, start - 1 : start - 1 + length].float()  # (B, L, V)
            target = ids[:, start : start + length]  # (B, L)
            ce = F.cross_entropy(pred_logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
            loss_sum += float(ce.view(-1, length).mean(1).sum())
            em_sum += float((pred_logits.argmax(-1) == target).all(1).float().sum())
            count += ids.shape[0]
            dom = dset.domain[lo : lo + batch]  # (B,)
            ids = ids.cpu()
            for router, table in zip(routers, tables):
                expert = router.record.expert.view(ids.shape).cpu()  # (B, S)
                dom_tok = dom[:, None].expand_as(ids)  # (B, S)
                np.add.at(table["domain"], (dom_tok.numpy().ravel(), expert.numpy().ravel()), 1)
                ans = answer_pos[None, :].expand_as(ids)
                np.add.at(table["domain_answer"], (dom_tok[ans].numpy(), expert[ans].numpy()), 1)
                np.add.at(table["token"], (ids.numpy().ravel(), expert.numpy().ravel()), 1)
        losses.append(loss_sum / count)
        ems.append(em_sum / count)
    model.train(was_training)
    return np.asarray(losses), np.asarray(ems), tables


def source_targets(model: nn.Module, num_domains: int) -> torch.Tensor:
    """(D,) target expert of each domain index (-1: not supervised) from the routers' `MoLEConfig.source_experts`
    (a ``ValueError`` when K < D without a map)."""
    config = next(router for _, router in iter_routers(model)).config
    table = config.source_experts([str(d) for d in range(num_domains)])
    return torch.tensor([table.get(str(d), -1) for d in range(num_domains)], dtype=torch.long)


def fit_adapters(
    model: nn.Module,
    method: MethodSpec,
    train: TrainConfig,
    task: TaskConfig,
    data: DomainSet,
    eval_sets: list[DomainSet],
    per_domain: int,
    seed: int,
    source_lookup: torch.Tensor | None = None,
    *,
    eval_batch: int = 256,
) -> dict[str, Any]:
    """Train the adapted ``model``'s trainable parameters on ``data`` and evaluate on ``eval_sets`` along the way.

    AdamW (no weight decay) at the method's peak lr with `lr_factor`'s warmup and cosine; ``train.epochs`` times
    ``method.epoch_mult`` passes in batches of ``train.batch`` (order from ``1000 + seed``); the loss is the answer
    cross-entropy plus `collect_aux`'s router losses. Evaluation points are spaced so that every method is evaluated
    at the same per-domain samples seen, ``train.evals_per_epoch`` per epoch of ``train.per_domain`` samples.

    Args:
        model: the adapted model, on its device (batches are moved there).
        method, train, task: the method, the shared schedule and the task family (`evaluate`'s positions).
        data: the run's training samples (all domains of the run).
        eval_sets: one held-out set per domain of the run.
        per_domain: training samples per domain in ``data``.
        seed: the job's seed.
        source_lookup: (D,) target expert of each domain for the source-supervised routing loss, or None.
        eval_batch: `evaluate`'s batch size.

    Returns:
        ``{"samples": (P,) per-domain samples seen, "steps": (P,), "loss": (P, D_eval), "em": (P, D_eval)}``.
    """
    device = next(model.parameters()).device
    domains_in_run = len(eval_sets)
    trainable = [p for p in model.parameters() if p.requires_grad]
    peak_lr = train.lr if method.lr is None else method.lr
    opt = torch.optim.AdamW(trainable, lr=peak_lr, weight_decay=0.0)

    steps_per_epoch = len(data) // train.batch
    epochs = train.epochs * method.epoch_mult
    total_steps = steps_per_epoch * epochs
    # per-domain samples seen advance by batch / domains_in_run per step; evaluate on a grid shared by all methods
    eval_every = max(1, steps_per_epoch * train.per_domain // (per_domain * train.evals_per_epoch))
    gen = torch.Generator().manual_seed(1000 + seed)
    samples, steps, loss_curve, em_curve = [], [], [], []

    def record(step: int) -> None:
        loss, em, _ = evaluate(model, eval_sets, task, batch=eval_batch)
        samples.append(step * train.batch // domains_in_run)
        steps.append(step)
        loss_curve.append(loss)
        em_curve.append(em)

    model.train()
    record(0)
    step = 0
    for _ in range(epochs):
        order = torch.randperm(len(data), generator=gen)
        for b in range(steps_per_epoch):
            idx = order[b * train.batch : (b + 1) * train.batch]
            ids, labels = data.input_ids[idx].to(device), data.labels[idx].to(device)  # (B, S)
            for group in opt.param_groups:
                group["lr"] = peak_lr * lr_factor(step, total_steps)
            mask = torch.ones_like(ids)
            targets = None if source_lookup is None else source_lookup[data.domain[idx]].to(device)  # (B,) or -1
            with routing_mask(model, mask), source_supervision(model, targets):
                out = model(input_ids=ids, attention_mask=mask, labels=labels)
            loss = out.loss + collect_aux(model).total
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step % eval_every == 0 or step == total_steps:
                if not steps or steps[-1] != step:
                    record(step)
    return {"samples": samples, "steps": steps, "loss": np.stack(loss_curve), "em": np.stack(em_curve)}


def run_job(job: JobSpec) -> JobResult:
    """Train one method on one seed from the cached stage-0 base and record its learning curves.

    Seeds: the domain rules and data come from ``seed`` (shared by every method of that seed, so method
    differences are paired); the adapter initialisation and batch order from ``1000 + seed``.
    """
    torch.set_num_threads(1)
    start_time = time.perf_counter()
    task, train, method = job.task, job.train, job.method
    rules = domain_rules(task, seed=job.seed)
    per_domain = train.per_domain * method.data_mult
    train_sets = make_domain_sets(task, rules, 2 * train.per_domain, seed=20_000 + job.seed)
    train_sets = [s.subset(torch.arange(per_domain)) for s in train_sets]  # the 1x sets are prefixes of the 2x
    eval_sets = make_domain_sets(task, rules, train.eval_per_domain, seed=30_000 + job.seed)
    if job.domain is not None:
        train_sets, eval_sets = [train_sets[job.domain]], [eval_sets[job.domain]]
    data = DomainSet.concat(train_sets)

    model = load_base(task, job.base, job.base_path)
    torch.manual_seed(1000 + job.seed)
    adapt_model(model, method, train)
    params, activated = adapter_counts(model, method)
    source_lookup = source_targets(model, task.num_domains) if method.source_routing_coef else None
    curves = fit_adapters(model, method, train, task, data, eval_sets, per_domain, job.seed, source_lookup)
    routing: list[dict[str, np.ndarray]] = []
    if method.routed:
        all_eval = make_domain_sets(task, rules, train.eval_per_domain, seed=30_000 + job.seed)
        _, _, routing = evaluate(model, all_eval, task, routing=True)
    return JobResult(
        seed=job.seed,
        method=method.name,
        domain=job.domain,
        samples=curves["samples"],
        steps=curves["steps"],
        loss=curves["loss"],
        em=curves["em"],
        domains=[job.domain] if job.domain is not None else list(range(task.num_domains)),
        params=params,
        activated=activated,
        routing=routing,
        seconds=time.perf_counter() - start_time,
    )


def describe(obj: object) -> dict:
    """A dataclass as a plain dictionary (for the run's JSON record)."""
    return asdict(obj)
