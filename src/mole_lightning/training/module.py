"""`MoLELightningModule`: instruction-finetuning of a LLaVA-style model with a sparse Mixture of LoRA Experts.

What a step does::

    batch ── LlavaMoLE ──> CE loss (labels != -100) + weighted MoLE aux loss (balance, z) = returned loss
                       └─> router records ──> per-layer expert load, per-source routing (logged)

Lightning divides the returned loss by ``accumulate_grad_batches``, so the LM and the aux loss are scaled alike.
The network is built in :meth:`MoLELightningModule.configure_model` (idempotent; sharded with FSDP2 when the
strategy gives a device mesh). Checkpoints keep only trainable tensors (adapters, routers, projector) plus
optimizer, scheduler and loop state, so ``strict_loading`` is off and a key check replaces it.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from mole_lightning.constants import IGNORE_INDEX
from mole_lightning.peft import MoLEConfig
from mole_lightning.training.spec import ModelSpec, VisionGeometry

WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
"""Name components inserted by FSDP1, activation-checkpoint wrappers and ``torch.compile``."""


def clean_parameter_name(name: str) -> str:
    """``name`` without the wrapper components added by FSDP1 / checkpoint wrappers / ``torch.compile``."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def is_no_decay(name: str, param: torch.Tensor) -> bool:
    """True for parameters that get no weight decay: biases, norm weights and every other 1-D tensor."""
    lowered = name.lower()
    return param.ndim < 2 or lowered.endswith(".bias") or "norm" in lowered


class MoLELightningModule(pl.LightningModule):
    """LightningModule around :class:`~mole_lightning.models.LlavaMoLE` for instruction tuning with MoLE.

    Args:
        architecture: Model to build (preset + ``build_llava_mole`` overrides); default: the ``tiny`` preset.
        mole: MoLE adapter configuration; ``None`` uses the preset's (no adapters when the spec has none: only the
            projector trains, as in LLaVA's stage 1).
        tokenizer: Tokenizer directory (or hub id); the LLM vocabulary follows it. ``None``: the LLM's own
            tokenizer, or the byte-level tiny tokenizer for a config-built LLM. The CLI links it to
            ``data.tokenizer``.
        optimizer: Optimizer factory called with the parameter groups (``lr``/``weight_decay`` in YAML).
        scheduler: Learning-rate scheduler factory called with the optimizer, stepped every optimizer step. A
            scheduler with ``set_total_steps(n)`` gets ``trainer.estimated_stepping_batches``.
        projector_lr: Learning rate of the projector group (LLaVA's ``mm_projector_lr``); ``None``: optimizer lr.
        router_lr: Learning rate of the router group; ``None``: optimizer lr.
        gradient_checkpointing: Recompute each LLM decoder layer in the backward pass.
        model_seed: Seed of the random initialisation (adapters, routers, random base weights), independent of
            the global seed, so every rank and every resumed run builds identical weights.
        routing_log_every_n_steps: Steps between per-layer and per-source routing logs (``None``: the trainer's
            ``log_every_n_steps``).
        max_nonfinite_in_a_row: Consecutive non-finite losses tolerated (each one skips its step) before the run
            stops with an error.
        max_new_tokens: Tokens generated per prompt in :meth:`predict_step` (128, LLaVA's eval default).
        adapter_path: Directory of an adapter export (``tools/export_adapter.py``: ``adapter_model.safetensors`` +
            ``adapter_config.json``) loaded onto the built model, e.g. to ``validate``/``test``/``predict`` an
            export, or to start training from one. Its MoLE config must match ``mole``.
    """

    def __init__(
        self,
        architecture: ModelSpec | None = None,
        mole: MoLEConfig | None = None,
        tokenizer: str | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        projector_lr: float | None = None,
        router_lr: float | None = None,
        gradient_checkpointing: bool = False,
        model_seed: int = 0,
        routing_log_every_n_steps: int | None = None,
        max_nonfinite_in_a_row: int = 5,
        max_new_tokens: int = 128,
        adapter_path: str | None = None,
    ) -> None:
        super().__init__()
        if isinstance(architecture, dict):  # hyper-parameters of a checkpoint (load_from_checkpoint)
            architecture = ModelSpec(**architecture)
        if isinstance(mole, dict):
            mole = MoLEConfig.from_dict(mole)
        self.architecture = architecture if architecture is not None else ModelSpec()
        # plain types only, so checkpoints load with torch.load(weights_only=True)
        self.save_hyperparameters(
            {
                "architecture": dataclasses.asdict(self.architecture),
                "mole": mole.to_dict() if mole is not None else None,
                "tokenizer": tokenizer,
                "projector_lr": projector_lr,
                "router_lr": router_lr,
                "gradient_checkpointing": gradient_checkpointing,
                "model_seed": model_seed,
                "max_new_tokens": max_new_tokens,
                "adapter_path": adapter_path,
            }
        )
        self.mole_config = mole
        self.tokenizer_path = tokenizer
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.projector_lr = projector_lr
        self.router_lr = router_lr
        self.gradient_checkpointing = gradient_checkpointing
        self.model_seed = model_seed
        self.routing_log_every_n_steps = routing_log_every_n_steps
        self.max_nonfinite_in_a_row = max_nonfinite_in_a_row
        self.max_new_tokens = max_new_tokens
        self.adapter_path = adapter_path
        self.strict_loading = False  # checkpoints hold trainable tensors only; on_load_checkpoint checks the keys
        self.model: nn.Module | None = None

        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        self.last_expert_load: torch.Tensor | None = None  # (L, K) fractions, for the heatmap callback
        self.last_routing_step: int | None = None  # global step of last_expert_load
        self.routing_snapshot_requested = False  # set by callbacks that need routing at the coming step
        self.last_source_routing: dict[str, torch.Tensor] = {}  # source -> (K,) fractions over layers
        self.val_routing: dict[str, torch.Tensor] = {}  # source -> (K,) fractions of the last validation
        self.val_losses: dict[str, float] = {}  # source -> token-weighted CE of the last validation
        self.test_losses: dict[str, float] = {}  # same for the last test run
        self.test_routing: dict[str, torch.Tensor] = {}
        self._val_sums: dict[str, dict[str, torch.Tensor]] = {}
        self._tokens_since_log: torch.Tensor | None = None
        self._time_of_last_log: float | None = None

    # ------------------------------------------------------------------------------------------------ building
    @property
    def vision_geometry(self) -> VisionGeometry:
        """Visual tokens per image, image size and normalisation of the configured tower (nothing is built)."""
        return self.architecture.vision_geometry()

    @property
    def num_image_tokens(self) -> int:
        """Placeholder tokens per image (linked to ``data.num_image_tokens``)."""
        return self.vision_geometry.num_image_tokens

    @property
    def image_size(self) -> int:
        """Input side of the vision tower (linked to ``data.image_size``)."""
        return self.vision_geometry.image_size

    @property
    def image_mean(self) -> tuple[float, float, float]:
        """Normalisation mean of the vision tower (linked to ``data.image_mean``)."""
        return self.vision_geometry.image_mean

    @property
    def image_std(self) -> tuple[float, float, float]:
        """Normalisation std of the vision tower (linked to ``data.image_std``)."""
        return self.vision_geometry.image_std

    def resolved_mole_config(self) -> MoLEConfig | None:
        """The MoLE configuration used: the ``mole`` argument, else the preset's, else ``None``."""
        if self.mole_config is not None:
            return self.mole_config
        preset = self.architecture.preset_mole()
        return MoLEConfig(**preset) if isinstance(preset, dict) else preset

    def build_model(self) -> nn.Module:
        """Build the :class:`LlavaMoLE` of the spec with a fixed seed (no sharding, no checkpointing)."""
        from mole_lightning.models import build_llava_mole

        kwargs = self.architecture.builder_kwargs()
        kwargs["mole"] = self.resolved_mole_config()
        if self.tokenizer_path is not None:
            kwargs["tokenizer"] = self.tokenizer_path
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.model_seed)
            model = build_llava_mole(**kwargs)
        expected = self.vision_geometry.num_image_tokens
        if model.num_image_tokens != expected:
            raise ValueError(
                f"the built vision tower gives {model.num_image_tokens} tokens per image, its config said {expected}"
            )
        return model

    def configure_model(self) -> None:
        """Build the model once (later calls do nothing); shard it when the strategy provides a device mesh."""
        if self.model is not None:
            return
        model = self.build_model()
        if self.adapter_path is not None:
            from mole_lightning.models import load_adapters

            load_adapters(model, self.adapter_path)
        if self.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        mesh = self._device_mesh if hasattr(self, "_device_mesh") else None
        if mesh is not None:
            from mole_lightning.training.strategies import fully_shard_llava_mole

            strategy = self._trainer.strategy if self._trainer is not None else None
            options = strategy.fsdp2_options() if hasattr(strategy, "fsdp2_options") else {}
            fully_shard_llava_mole(model, mesh, **options)
        self.model = model

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer (after :meth:`configure_model`)."""
        return self._require_model().tokenizer

    def _require_model(self) -> nn.Module:
        if self.model is None:
            raise RuntimeError("the model is not built yet; call configure_model() first")
        return self.model

    def trainable_parameter_names(self) -> list[str]:
        """Checkpoint keys of the trainable parameters (``model.``-prefixed, wrapper components removed)."""
        return [clean_parameter_name(n) for n, p in self.named_parameters() if p.requires_grad]

    # ------------------------------------------------------------------------------------------------- forward
    def forward(self, batch: dict[str, Any], *, return_routing_stats: bool = False) -> Any:
        """Run the model on a batch dict (``input_ids``, ``attention_mask``, ``pixel_values``, ``labels``, ...)."""
        return self._require_model()(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            pixel_values=batch.get("pixel_values"),
            labels=batch.get("labels"),
            has_image=batch.get("has_image"),
            return_routing_stats=return_routing_stats,
        )

    def _routers(self) -> Iterator[Any]:
        from mole_lightning.peft import iter_routers

        model = self._require_model()
        for _, router in iter_routers(model.language_model):
            if router.record is not None:
                yield router

    @torch.no_grad()
    def sample_expert_counts(self) -> torch.Tensor | None:
        """Tokens routed to each expert in the last forward, per layer and sample: ``(L, B, K)`` (padding excluded).

        ``None`` without MoLE routers (plain LoRA with K=1 has none).
        """
        per_layer = []
        for router in self._routers():
            rec = router.record
            batch = rec.batch_size
            one_hot = F.one_hot(rec.expert, router.num_experts).to(torch.float32)  # (T, K)
            one_hot = one_hot * rec.valid.to(torch.float32)[:, None]
            per_layer.append(one_hot.reshape(batch, -1, router.num_experts).sum(1))  # (B, K)
        return torch.stack(per_layer) if per_layer else None  # (L, B, K)

    def _should_log_routing(self) -> bool:
        every = self.routing_log_every_n_steps
        if every is None:
            every = self.trainer.log_every_n_steps if self._trainer is not None else 1
        return every > 0 and self.global_step % every == 0

    # ------------------------------------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        """LM loss + weighted MoLE aux loss; skips (returns ``None``) on a non-finite loss."""
        out = self(batch)
        total = out.loss + out.aux_loss
        batch_size = batch["input_ids"].shape[0]
        if not self._loss_is_finite(total):
            self.nonfinite_in_a_row += 1
            self.nonfinite_total += 1
            self.log("train/nonfinite_steps", float(self.nonfinite_total), on_step=True, batch_size=batch_size)
            if self.nonfinite_in_a_row >= self.max_nonfinite_in_a_row:
                raise RuntimeError(
                    f"the training loss was NaN/inf for {self.nonfinite_in_a_row} steps in a row (step "
                    f"{self.global_step}, batch {batch_idx}; {self.nonfinite_total} non-finite steps in total); "
                    "stopping. Lower the learning rate, use bf16 instead of fp16, or check the data."
                )
            self.print(f"warning: non-finite loss at step {self.global_step}, skipping it ({self.nonfinite_in_a_row})")
            return None
        self.nonfinite_in_a_row = 0

        self.log("train/loss", out.loss.detach(), on_step=True, prog_bar=True, batch_size=batch_size)
        self.log("train/aux_loss", out.aux_loss.detach(), on_step=True, batch_size=batch_size)
        self.log("train/balance_loss", out.balance_loss.detach(), on_step=True, batch_size=batch_size)
        self.log("train/z_loss", out.z_loss.detach(), on_step=True, batch_size=batch_size)
        self.log("train/total_loss", total.detach(), on_step=True, batch_size=batch_size)
        self._log_throughput(batch)
        self._log_learning_rates()
        self._log_skipped_samples()
        if self._should_log_routing() or self.routing_snapshot_requested:
            self.routing_snapshot_requested = False
            self._log_training_routing(batch.get("source"))
        return total

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Keep the frozen vocabulary rows frozen when new token rows train (needed under FSDP2, whose sharded
        gradients bypass the model's gradient hooks); runs before gradient clipping."""
        zero_rows = getattr(self.model, "zero_frozen_token_row_grads", None)
        if zero_rows is not None:
            zero_rows()

    def _loss_is_finite(self, loss: torch.Tensor) -> bool:
        finite = torch.isfinite(loss.detach()).to(torch.float32)
        if self._trainer is not None and self.trainer.world_size > 1:
            finite = self.trainer.strategy.reduce(finite, reduce_op="min")  # every rank skips together
        return bool(finite > 0)

    def _log_throughput(self, batch: dict[str, Any]) -> None:
        tokens = (
            batch["attention_mask"].sum() if batch.get("attention_mask") is not None else batch["input_ids"].numel()
        )
        tokens = torch.as_tensor(tokens, dtype=torch.float64)
        self._tokens_since_log = (
            tokens
            if self._tokens_since_log is None
            else self._tokens_since_log + tokens.to(self._tokens_since_log.device)
        )
        now = time.perf_counter()
        if self._time_of_last_log is None:
            self._time_of_last_log = now
            self._tokens_since_log = None  # the first step includes start-up; measure from here
            return
        if self.global_step % max(1, self.trainer.log_every_n_steps) == 0 or self.global_step < 5:
            elapsed = max(now - self._time_of_last_log, 1e-9)
            rate = float(self._tokens_since_log) / elapsed
            self.log("train/tokens_per_s", rate, on_step=True, prog_bar=True, batch_size=1)
            self._tokens_since_log, self._time_of_last_log = None, now

    def _log_skipped_samples(self) -> None:
        """``skipped/<kind>/<source>``: bad samples and unreadable shards the DataModule skipped so far."""
        if self._trainer is None or self.global_step % max(1, self.trainer.log_every_n_steps) != 0:
            return
        counts = getattr(self.trainer.datamodule, "skipped_counts", None) if self.trainer.datamodule else None
        if callable(counts):
            values = {f"skipped/{kind}": float(count) for kind, count in counts().items()}
            if values:
                self.log_dict(values, on_step=True, batch_size=1)

    def _log_learning_rates(self) -> None:
        if self._trainer is None or not self.trainer.optimizers:
            return
        for index, group in enumerate(self.trainer.optimizers[0].param_groups):
            name = group.get("name", f"group{index}")
            self.log(f"lr/{name}", float(group["lr"]), on_step=True, batch_size=1)

    def _log_training_routing(self, sources: list[str] | None) -> None:
        counts = self.sample_expert_counts()  # (L, B, K)
        if counts is None:
            return
        layer_load = counts.sum(1)  # (L, K)
        layer_load = layer_load / layer_load.sum(-1, keepdim=True).clamp_min(1.0)
        self.last_expert_load = layer_load.detach().cpu()
        self.last_routing_step = self.global_step
        metrics = {}
        for layer, row in enumerate(self.last_expert_load):
            for expert, value in enumerate(row.tolist()):
                metrics[f"routing/layer{layer:02d}/expert{expert}"] = value
        if sources:
            per_sample = counts.sum(0).cpu()  # (B, K) over layers
            self.last_source_routing = {}
            for source in sorted(set(sources)):
                rows = [i for i, s in enumerate(sources) if s == source]
                total = per_sample[rows].sum(0)
                fractions = total / total.sum().clamp_min(1.0)
                self.last_source_routing[source] = fractions
                for expert, value in enumerate(fractions.tolist()):
                    metrics[f"routing_source/{source}/expert{expert}"] = value
        self.log_dict(metrics, on_step=True, batch_size=1)

    # ---------------------------------------------------------------------------------------------- validation
    def _val_source_names(self) -> list[str]:
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        names = getattr(datamodule, "val_source_names", None)
        return list(names) if names else []

    def on_validation_epoch_start(self) -> None:
        """Reset the per-source sums (every rank holds every configured source, in the same order)."""
        self._val_sums = {}
        for name in self._val_source_names():
            self._new_val_source(name)

    def _new_val_source(self, name: str) -> dict[str, torch.Tensor]:
        config = self.resolved_mole_config()
        num_experts = config.num_experts if config is not None else 1
        sums = {
            "loss": torch.zeros((), dtype=torch.float64, device=self.device),
            "tokens": torch.zeros((), dtype=torch.float64, device=self.device),
            "routing": torch.zeros(num_experts, dtype=torch.float64, device=self.device),
        }
        self._val_sums[name] = sums
        return sums

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        """Accumulate the token-weighted CE and the expert counts of the batch's source."""
        names = self._val_source_names()
        source = names[dataloader_idx] if dataloader_idx < len(names) else batch.get("source", [None])[0]
        source = str(source) if source is not None else f"dataloader{dataloader_idx}"
        sums = self._val_sums.get(source) or self._new_val_source(source)
        labels = batch.get("labels")
        if labels is None:
            return
        num_targets = (labels[:, 1:] != IGNORE_INDEX).sum()
        if int(num_targets) == 0:
            return
        out = self(batch)
        sums["loss"] += out.loss.detach().double() * num_targets
        sums["tokens"] += num_targets
        counts = self.sample_expert_counts()
        if counts is not None:
            sums["routing"] += counts.sum((0, 1)).double()

    def on_validation_epoch_end(self) -> None:
        """Log ``val/<source>/loss`` (token-weighted over all ranks), ``val/loss`` and per-source routing."""
        self.val_losses, self.val_routing = self._log_source_metrics("val")

    def on_test_epoch_start(self) -> None:
        """Reset the per-source sums (test loaders follow ``val_source_names`` when the DataModule has them)."""
        self.on_validation_epoch_start()

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        """Same as :meth:`validation_step`, for ``mole-train test`` (needs a DataModule with test loaders)."""
        self.validation_step(batch, batch_idx, dataloader_idx)

    def on_test_epoch_end(self) -> None:
        """Log ``test/<source>/loss``, ``test/loss`` and per-source routing."""
        self.test_losses, self.test_routing = self._log_source_metrics("test")

    def _log_source_metrics(self, prefix: str) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        """Reduce the per-source sums over ranks and log them under ``prefix``; returns (losses, routing shares)."""
        losses: dict[str, float] = {}
        routing_shares: dict[str, torch.Tensor] = {}
        if not self._val_sums:
            return losses, routing_shares
        names = list(self._val_sums)
        stacked = torch.stack(
            [torch.cat([s["loss"][None], s["tokens"][None], s["routing"]]) for s in self._val_sums.values()]
        )
        if self.trainer.world_size > 1:
            stacked = self.trainer.strategy.reduce(stacked, reduce_op="sum")
        metrics: dict[str, float] = {}
        total_loss, total_tokens = 0.0, 0.0
        for name, row in zip(names, stacked.cpu()):
            loss_sum, tokens, routing = float(row[0]), float(row[1]), row[2:]
            if tokens == 0:
                continue
            loss = loss_sum / tokens
            losses[name] = loss
            metrics[f"{prefix}/{name}/loss"] = loss
            metrics[f"{prefix}/{name}/ppl"] = math.exp(min(loss, 50.0))
            total_loss += loss_sum
            total_tokens += tokens
            if routing.sum() > 0:
                fractions = (routing / routing.sum()).float()
                routing_shares[name] = fractions
                for expert, value in enumerate(fractions.tolist()):
                    metrics[f"{prefix}/{name}/expert{expert}"] = value
        if total_tokens > 0:
            metrics[f"{prefix}/loss"] = total_loss / total_tokens
        self.log_dict(metrics, prog_bar=False, sync_dist=False, add_dataloader_idx=False)
        if f"{prefix}/loss" in metrics:
            self.log(f"{prefix}_loss", metrics[f"{prefix}/loss"], prog_bar=True, add_dataloader_idx=False)
        return losses, routing_shares

    # ------------------------------------------------------------------------------------------------- predict
    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        """Greedy generation on a prompt-only (left-padded) batch.

        Returns:
            One ``{"id", "source", "question", "answer", "answers", "prediction"}`` dict per sample; ``answer`` is
            the first reference answer.
        """
        model = self._require_model()
        tokenizer = model.tokenizer
        prompt_length = batch["input_ids"].shape[1]
        generated = model.generate(
            batch.get("pixel_values"),
            batch["input_ids"],
            batch.get("attention_mask"),
            has_image=batch.get("has_image"),
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        texts = tokenizer.batch_decode(generated[:, prompt_length:], skip_special_tokens=True)
        size = len(texts)
        answers = batch.get("answers") or [[] for _ in range(size)]
        questions = batch.get("question") or [""] * size
        return [
            {
                "id": batch.get("id", [str(i) for i in range(size)])[i],
                "source": batch.get("source", [""] * size)[i],
                "question": questions[i],
                "answer": answers[i][0] if answers[i] else "",
                "answers": list(answers[i]),
                "prediction": texts[i].strip(),
            }
            for i in range(size)
        ]

    # ---------------------------------------------------------------------------------------------- optimizers
    def optimizer_parameter_groups(self) -> list[dict[str, Any]]:
        """Parameter groups of the trainable parameters only.

        Roles from ``LlavaMoLE.parameter_groups()`` (adapters, routers, projector, embeddings, other), each split
        into a decayed part and a ``weight_decay=0`` part (biases, norms, 1-D tensors; embeddings never decay).
        The projector group gets ``projector_lr`` and the router group ``router_lr`` when set. Empty groups are
        dropped; every group has a ``name`` (used in the ``lr/<name>`` logs).
        """
        model = self._require_model()
        role_of = {id(p): role for role, params in model.parameter_groups().items() for p in params}
        lrs = {"projector": self.projector_lr, "routers": self.router_lr}
        buckets: dict[tuple[str, bool], list[nn.Parameter]] = {}
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            role = role_of.get(id(param), "other")
            no_decay = role == "embeddings" or is_no_decay(clean_parameter_name(name), param)
            buckets.setdefault((role, no_decay), []).append(param)
        groups = []
        for (role, no_decay), params in buckets.items():
            group: dict[str, Any] = {"params": params, "name": f"{role}_no_decay" if no_decay else role}
            if no_decay:
                group["weight_decay"] = 0.0
            if lrs.get(role) is not None:
                group["lr"] = lrs[role]
            groups.append(group)
        return groups

    def configure_optimizers(self) -> Any:
        """The injected optimizer over :meth:`optimizer_parameter_groups`, and the scheduler stepped per step."""
        optimizer = self.optimizer_factory(self.optimizer_parameter_groups())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        if hasattr(scheduler, "set_total_steps"):
            scheduler.set_total_steps(int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    # --------------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only trainable tensors in ``state_dict``; record the non-finite step counters."""
        keep = set(self.trainable_parameter_names())
        state = checkpoint.get("state_dict")
        if state:
            checkpoint["state_dict"] = {k: v for k, v in state.items() if clean_parameter_name(k) in keep}
        checkpoint["mole_training"] = {"nonfinite_total": self.nonfinite_total}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check that the checkpoint holds every trainable tensor (``strict_loading`` is off for frozen weights).

        Raises:
            KeyError: naming the trainable tensors the checkpoint lacks.
        """
        self.nonfinite_total = int(checkpoint.get("mole_training", {}).get("nonfinite_total", 0))
        state = checkpoint.get("state_dict")
        if not state or self.model is None:
            return
        present = {clean_parameter_name(k) for k in state}
        missing = [n for n in self.trainable_parameter_names() if n not in present]
        if missing:
            raise KeyError(
                f"the checkpoint lacks {len(missing)} trainable tensor(s), e.g. {missing[:4]}; was it written with "
                "the same architecture and MoLE config?"
            )

    @classmethod
    def from_hparams(cls, hparams: dict[str, Any]) -> MoLELightningModule:
        """Rebuild a module (not yet configured) from a checkpoint's ``hyper_parameters`` (plain dicts)."""
        values = dict(hparams)
        values["architecture"] = ModelSpec(**values["architecture"]) if values.get("architecture") else None
        values["mole"] = MoLEConfig.from_dict(values["mole"]) if values.get("mole") else None
        known = {"architecture", "mole", "tokenizer", "projector_lr", "router_lr", "gradient_checkpointing"}
        known |= {"model_seed", "max_new_tokens", "adapter_path"}
        return cls(**{k: v for k, v in values.items() if k in known})
