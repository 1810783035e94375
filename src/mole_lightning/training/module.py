"""`MoLELightningModule`: instruction-finetuning of a LLaVA-style model with a sparse Mixture of LoRA Experts.

What a step does::

    batch ── LlavaMoLE ──> CE loss (labels != -100) + weighted MoLE aux (balance, z, source routing) = returned loss

With ``mole.source_routing_coef > 0`` each sample's ``source`` (from the batch) is mapped to its target expert
(:meth:`MoLEConfig.source_experts` over the DataModule's declared training ``sources``) and handed to the routers
with :func:`~mole_lightning.peft.source_supervision`; the term is logged as ``train/source_routing_loss``.

Lightning divides the returned loss by ``accumulate_grad_batches``, so the LM and the aux loss are scaled alike.
The network is built in :meth:`MoLELightningModule.configure_model` (idempotent; sharded with FSDP2 when the
strategy gives a device mesh). Checkpoints keep only the trainable state (:mod:`mole_lightning.models.trainable`)
plus optimizer, scheduler and loop state, so ``strict_loading`` is off and a key check replaces it.
Routing, learning rates, throughput and skipped samples are logged by callbacks (:mod:`.callbacks`).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from mole_lightning.constants import IGNORE_INDEX
from mole_lightning.eval.tasks import task_generation_kwargs
from mole_lightning.generation import generate_answers, prediction_records
from mole_lightning.models import ModelSpec, load_adapters, missing_trainable, select_trainable, trainable_names
from mole_lightning.models.vision import VisionGeometry
from mole_lightning.peft import MoLEConfig, expert_counts_per_sample, source_supervision
from mole_lightning.training.nonfinite import NonFiniteSteps
from mole_lightning.training.optim import parameter_groups
from mole_lightning.training.sharded_loading import shard_and_load
from mole_lightning.training.source_metrics import SourceLossMetric
from mole_lightning.training.strategies import refuse_sharded_4bit
from mole_lightning.training.throughput import parameter_counts, training_flops

DATA_FROM_MODEL = ("num_image_tokens", "image_size", "image_mean", "image_std")
"""DataModule settings taken from the module's vision tower (after instantiation)."""


def link_model_and_data(parser: Any, model_key: str = "model", data_key: str = "data") -> None:
    """The links between a :class:`MoLELightningModule` and a ``MixedInstructionDataModule`` in a
    ``LightningArgumentParser`` (``mole-train`` and recipe loading alike): the tokenizer is set once, under
    ``data.tokenizer``; the image token count, size, mean and std follow the model's tower."""
    parser.link_arguments(f"{data_key}.tokenizer", f"{model_key}.tokenizer")
    for name in DATA_FROM_MODEL:
        parser.link_arguments(f"{model_key}.{name}", f"{data_key}.{name}", apply_on="instantiate")


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
        max_nonfinite_in_a_row: Consecutive non-finite losses tolerated (each one skips its step; every rank skips
            together) before the run stops with an error.
        max_new_tokens: Tokens generated per prompt in :meth:`predict_step` (128, LLaVA's eval default).
        adapter_path: Directory of an adapter export (``tools/export_adapter.py``) loaded onto the built model, e.g.
            to ``validate``/``test``/``predict`` an export, or to start training from one. Its MoLE config must
            match ``mole``.
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
        self.mole_config = mole
        # plain types only, so checkpoints load with torch.load(weights_only=True)
        self.save_hyperparameters(ignore=["architecture", "mole", "optimizer", "scheduler"])
        self.hparams.update(architecture=dataclasses.asdict(self.architecture), mole=mole and mole.to_dict())
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.strict_loading = False  # checkpoints hold trainable tensors only; on_load_checkpoint checks the keys
        self.model: nn.Module | None = None
        self.nonfinite = NonFiniteSteps(max_nonfinite_in_a_row)
        self.flops_per_batch: int | None = None  # read by Lightning's ThroughputMonitor
        self.eval_metric: SourceLossMetric | None = None
        self._source_experts: dict[str, int] | None = None

    @classmethod
    def from_hparams(cls, hparams: dict[str, Any]) -> MoLELightningModule:
        """Rebuild a module (not yet configured) from a checkpoint's ``hyper_parameters`` (plain dicts)."""
        names = inspect.signature(cls.__init__).parameters
        return cls(**{k: v for k, v in hparams.items() if k in names})

    # ------------------------------------------------------------------------------------------------ building
    @property
    def vision_geometry(self) -> VisionGeometry:
        """Visual tokens per image, image size and normalisation of the configured tower (nothing is built)."""
        return self.architecture.vision_geometry()

    num_image_tokens = property(lambda self: self.vision_geometry.num_image_tokens, doc="Linked to data.")
    image_size = property(lambda self: self.vision_geometry.image_size, doc="Linked to data.")
    image_mean = property(lambda self: self.vision_geometry.image_mean, doc="Linked to data.")
    image_std = property(lambda self: self.vision_geometry.image_std, doc="Linked to data.")

    def resolved_mole_config(self) -> MoLEConfig | None:
        """The MoLE configuration used: the ``mole`` argument, else the preset's, else ``None``."""
        return self.architecture.resolve_mole(self.mole_config)

    def build_model(self, frozen_on_meta: bool = False) -> nn.Module:
        """Build the :class:`LlavaMoLE` of the spec with ``model_seed`` (``frozen_on_meta``: ``ModelSpec.build``)."""
        kwargs = {"seed": self.hparams.model_seed, "frozen_on_meta": frozen_on_meta}
        return self.architecture.build(self.mole_config, self.hparams.tokenizer, **kwargs)

    def configure_model(self) -> None:
        """Build the model once (later calls do nothing). With a device mesh, frozen weights from folders are built on
        the meta device and each rank reads only its own shards of their files (``shard_and_load``). A 4-bit base
        under FSDP/FSDP2 is refused (``ValueError``) before anything is built."""
        if self.model is not None:
            return
        mesh, trainer = self.device_mesh, self.attached_trainer()
        refuse_sharded_4bit(self.architecture.quantize, mesh, trainer and trainer.strategy)
        model = self.build_model(frozen_on_meta=mesh is not None)
        if self.hparams.adapter_path is not None:
            load_adapters(model, self.hparams.adapter_path)
        if self.hparams.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        counts, image_tokens = parameter_counts(model), model.num_image_tokens
        self.step_flops = functools.partial(training_flops, counts, image_tokens=image_tokens)
        if mesh is not None:
            options = getattr(trainer.strategy, "fsdp2_options", dict)() if trainer is not None else {}
            shard_and_load(model, mesh, **options)
        self.model = model

    tokenizer = property(lambda self: self.require_model().tokenizer, doc="The model's tokenizer (once built).")

    def attached_trainer(self) -> Any:
        """The Trainer this module is attached to, or ``None`` (the module also runs alone, e.g. in inference)."""
        try:
            return self.trainer
        except RuntimeError:  # Lightning: "... is not attached to a `Trainer`"
            return None

    def require_model(self) -> nn.Module:
        """The built model (raises before :meth:`configure_model`)."""
        if self.model is None:
            raise RuntimeError("the model is not built yet; call configure_model() first")
        return self.model

    def forward(self, batch: dict[str, Any]) -> Any:
        """Run the model on a batch dict (``input_ids``, ``attention_mask``, ``pixel_values``, ``labels``, ...)."""
        keys = ("input_ids", "attention_mask", "pixel_values", "labels", "has_image")
        return self.require_model()(**{k: batch.get(k) for k in keys}, return_routing_stats=False)

    # ------------------------------------------------------------------------------------------------ training
    def source_experts(self) -> dict[str, int] | None:
        """``{source: expert}`` targets of the source-supervised routing loss; ``None`` when it is off.

        One expert per source of ``trainer.datamodule.sources`` in declared order, or ``mole.source_expert_map``.

        Raises:
            ValueError: the loss is on, there is no map and the DataModule declares no training sources, or K is
                smaller than their number.
        """
        config = self.resolved_mole_config()
        if config is None or not config.source_routing_coef:
            return None
        if self._source_experts is None:
            trainer = self.attached_trainer()
            datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
            declared = list(getattr(datamodule, "sources", None) or [])
            if config.source_expert_map is None and not declared:
                raise ValueError(
                    "mole.source_routing_coef > 0 needs the DataModule's training sources (data.sources) or "
                    "mole.source_expert_map"
                )
            self._source_experts = config.source_experts(declared)
        return self._source_experts

    def source_expert_ids(self, batch: dict[str, Any]) -> torch.Tensor | None:
        """(B,) int64 target expert of each sample's ``source`` (-1: unknown or missing); ``None`` when off."""
        table = self.source_experts()
        if table is None:
            return None
        sources = batch.get("source") or [""] * batch["input_ids"].shape[0]
        return torch.tensor([table.get(str(s), -1) for s in sources], dtype=torch.long, device=self.device)

    def on_fit_start(self) -> None:
        """Resolve the source-to-expert targets once per fit (a bad source setup fails before the first step)."""
        self._source_experts = None
        self.source_experts()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        """LM loss + weighted MoLE aux loss; skips (returns ``None``) on a non-finite loss (all ranks together)."""
        targets = self.source_expert_ids(batch)
        if targets is None:
            out = self(batch)
        else:
            with source_supervision(self.require_model().language_model, targets):
                out = self(batch)
        total = out.loss + out.aux_loss
        size = batch["input_ids"].shape[0]
        images = int(batch["pixel_values"].shape[0]) if batch.get("pixel_values") is not None else 0
        self.flops_per_batch = self.step_flops(tokens=int(batch["attention_mask"].sum()), images=images)
        finite = torch.isfinite(total.detach()).float()
        trainer = self.attached_trainer()
        if trainer is not None and trainer.world_size > 1:
            finite = self.trainer.strategy.reduce(finite, reduce_op="min")  # every rank skips together
        if not self.nonfinite.observe(bool(finite > 0), f"step {self.global_step}, batch {batch_idx}"):
            self.log("train/nonfinite_steps", float(self.nonfinite.total), on_step=True, batch_size=size)
            self.print(f"warning: non-finite loss at step {self.global_step}, skipping it ({self.nonfinite.in_a_row})")
            return None
        self.log("train/loss", out.loss.detach(), on_step=True, prog_bar=True, batch_size=size)
        parts = {"aux_loss": out.aux_loss, "balance_loss": out.balance_loss, "z_loss": out.z_loss, "total_loss": total}
        if targets is not None:
            parts["source_routing_loss"] = out.source_routing_loss
        self.log_dict({f"train/{k}": v.detach() for k, v in parts.items()}, on_step=True, batch_size=size)
        return total

    # ----------------------------------------------------------------------------------------- validation, test
    def on_validation_epoch_start(self) -> None:
        """Fresh per-source sums; every rank declares every loader's source, in the same order."""
        loaders = self.trainer.test_dataloaders if self.trainer.testing else self.trainer.val_dataloaders
        count = len(loaders) if isinstance(loaders, (list, tuple, dict)) else 1
        names = list(getattr(self.trainer.datamodule, "val_source_names", None) or [])
        names = names if len(names) >= count else [f"dataloader{i}" for i in range(count)]
        experts = getattr(self.resolved_mole_config(), "num_experts", 1)
        self.eval_metric = SourceLossMetric(names, experts).to(self.device)

    on_test_epoch_start = on_validation_epoch_start

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        """Add the batch's token-weighted CE and expert counts to its source (loader ``dataloader_idx``)."""
        targets = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
        if int(targets) == 0:
            return
        out = self(batch)
        counts = expert_counts_per_sample(self.require_model().language_model)  # (L, B, K)
        source = self.eval_metric.sources[dataloader_idx]
        self.eval_metric.update(source, out.loss, targets, None if counts is None else counts.sum((0, 1)))

    test_step = validation_step

    def on_validation_epoch_end(self) -> None:
        """Log ``<stage>/<source>/{loss,ppl,expert<k>}``, ``<stage>/loss`` (token-weighted over ranks) and
        ``<stage>_loss`` (progress bar)."""
        prefix = "test" if self.trainer.testing else "val"
        values = {f"{prefix}/{k}": v for k, v in self.eval_metric.compute().items()}
        self.log_dict(values, sync_dist=False, add_dataloader_idx=False)
        if f"{prefix}/loss" in values:
            self.log(f"{prefix}_loss", values[f"{prefix}/loss"], prog_bar=True, add_dataloader_idx=False)

    on_test_epoch_end = on_validation_epoch_end

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        """Greedy answers of a prompt-only (left-padded) batch, one record per sample (``prediction_records``).

        A task with its own decoding protocol (:attr:`~mole_lightning.eval.tasks.TaskSpec.generation`, e.g.
        ``lvlm_ehub``: repetition penalty 10, 256 new tokens) decodes with it; ``max_new_tokens`` otherwise."""
        model = self.require_model()
        kwargs = task_generation_kwargs(batch.get("task") or ())
        max_new_tokens = kwargs.pop("max_new_tokens", self.hparams.max_new_tokens)
        texts = generate_answers(model, batch, model.tokenizer, max_new_tokens, **kwargs)
        return prediction_records(batch, texts)

    # ---------------------------------------------------------------------------------------------- optimizers
    def configure_optimizers(self) -> Any:
        """The injected optimizer over the trainable parameter groups, and the scheduler stepped per step."""
        lrs = {"projector": self.hparams.projector_lr, "routers": self.hparams.router_lr}
        optimizer = self.optimizer_factory(parameter_groups(self.require_model(), lrs))
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        if hasattr(scheduler, "set_total_steps"):
            scheduler.set_total_steps(int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    # --------------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only the trainable state in ``state_dict``; record the non-finite step counter."""
        if checkpoint.get("state_dict"):
            checkpoint["state_dict"] = select_trainable(checkpoint["state_dict"], trainable_names(self))
        checkpoint["mole_training"] = {"nonfinite_total": self.nonfinite.total}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check that the checkpoint holds every trainable tensor (``strict_loading`` is off for frozen weights): a
        ``KeyError`` names those it lacks."""
        self.nonfinite.total = int(checkpoint.get("mole_training", {}).get("nonfinite_total", 0))
        state = checkpoint.get("state_dict")
        missing = missing_trainable(state, trainable_names(self)) if state and self.model is not None else []
        if missing:
            raise KeyError(
                f"the checkpoint lacks {len(missing)} trainable tensor(s), e.g. {missing[:4]}; was it written with "
                "the same architecture and MoLE config?"
            )
