"""``MixedInstructionDataModule``: weighted multi-source instruction data from webdataset shards.

Works with any model: batches are plain dicts (see :mod:`mole_lightning.data.collate`), so the module can be used in
a Lightning ``Trainer``, with ``LightningCLI`` (every constructor argument is a plain YAML type) or standalone::

    dm = MixedInstructionDataModule(sources={"general": {"urls": "shards/general-{000000..000009}.tar",
                                                         "weight": 2.0}}, tokenizer="path/to/tokenizer")
    dm.setup("fit")
    for batch in dm.train_dataloader():
        ...
    print(dm.skipped_counts())
"""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
import torch

from mole_lightning.data.collate import Collator, pad_token_id_of
from mole_lightning.data.images import ASPECTS, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from mole_lightning.data.pipeline import (
    CountingLoader,
    MixedTrainingStream,
    SkipTally,
    SourceEvalStream,
    batches_per_worker,
)
from mole_lightning.data.samples import SampleEncoder, load_tokenizer
from mole_lightning.data.sources import count_samples, resolve_sources
from mole_lightning.data.templates import TEMPLATES, image_token_id


def distributed_position() -> tuple[int, int]:
    """``(rank, world_size)`` from ``torch.distributed`` if initialized, else from ``RANK``/``WORLD_SIZE``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class MixedInstructionDataModule(pl.LightningDataModule):
    """Weighted mixture of instruction-data sources (webdataset shards) with per-source validation.

    Training: every sample's source is drawn with probability ∝ its weight from resampled per-source shard
    streams (a source's ``frequency`` λ_m, the paper's per-dataset sampling frequency, gives the weight
    λ_m N_m / Σ_k λ_k N_k with N_m from ``sizes.json``: see :mod:`mole_lightning.data.sources`); every rank yields
    the same number of batches per epoch. With ``group_by_modality_length`` each batch holds samples of one
    modality (image or text-only) and similar length, taken from a bounded per-worker buffer (see
    :class:`~mole_lightning.data.pipeline.ModalityLengthGrouper`), which cuts the padding; the mixture, the batch
    count and the seeding stay the same. Validation: one finite, in-order pipeline per source, so metrics can be
    reported per source (``val_source_names`` gives the order of ``val_dataloader()``'s list). Skipped samples are
    counted per ``kind/source`` in the workers, carried inside each batch under ``"skipped"`` and accumulated by
    the loaders in the main process: read them with
    :meth:`skipped_counts`.

    Args:
        sources: Training sources, ``{name: {"urls": str | list[str], "weight": float}}`` (per-sample mixing
            probability ∝ weight) or ``{name: {"urls": ..., "frequency": float}}`` for every source (D_mix =
            Σ_m λ_m D_m: weight_m ∝ λ_m N_m); urls may be brace patterns, ``::``-joined lists, directories, globs,
            ``http(s)://`` URLs or ``pipe:`` commands.
        val_sources: Validation sources in the same format (``weight`` ignored); ``None`` for no validation.
        tokenizer: Path (or hub name) of a Hugging Face fast tokenizer with an ``<image>`` special token.
        template: Conversation template: ``vicuna_v1``, ``llama3``, ``chatml``, ``plain`` or ``tokenizer``.
        system_prompt: Overrides the template's default system prompt.
        num_image_tokens: Visual tokens per image (576 for ViT-L/14 at 336 px).
        image_size: Vision tower input size.
        image_mean: Vision tower normalization mean (also the ``pad`` fill colour).
        image_std: Vision tower normalization std.
        image_aspect: ``pad`` (LLaVA-1.5), ``resize`` (SigLIP's processor) or ``crop`` (CLIP's processor).
        image_jpeg_draft: Decode large JPEGs at reduced scale (faster, not LLaVA's pixels; off by default).
        batch_size: Training samples per batch and rank.
        val_batch_size: Validation samples per batch (default: ``batch_size``).
        num_workers: DataLoader worker processes per loader.
        max_length: Maximum tokens per sample after image expansion (``None``: no limit).
        shuffle_buffer: Raw samples in each worker's shuffle buffer (0 or 1: no shuffling).
        samples_per_epoch: Training samples per epoch over all ranks; ``None`` uses the total of the training
            shards' ``sizes.json`` files (local shards only), with frequencies the size of D_mix, Σ_m λ_m N_m.
        seed: Seed for shard resampling, mixing and shuffling.
        pin_memory: Pin batch memory in the loaders.
        persistent_workers: Keep training workers alive between epochs.
        group_by_modality_length: Training batches within one modality and of similar lengths (LLaVA's option of
            the same name), sorted inside a buffer of ``batch_size · group_batches`` encoded samples per worker.
        group_batches: Batches per buffer for ``group_by_modality_length`` (≥ 1; larger pads less and holds more
            samples in each worker: up to ``batch_size · group_batches``).
    """

    def __init__(
        self,
        sources: dict[str, dict[str, Any]],
        val_sources: dict[str, dict[str, Any]] | None = None,
        *,
        tokenizer: str,
        template: str = "vicuna_v1",
        system_prompt: str | None = None,
        num_image_tokens: int = 576,
        image_size: int = 336,
        image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN,
        image_std: tuple[float, float, float] = OPENAI_CLIP_STD,
        image_aspect: str = "pad",
        image_jpeg_draft: bool = False,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        max_length: int | None = 2048,
        shuffle_buffer: int = 1000,
        samples_per_epoch: int | None = None,
        seed: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        group_by_modality_length: bool = False,
        group_batches: int = 32,
    ) -> None:
        super().__init__()
        if template not in TEMPLATES:
            raise ValueError(f"unknown template {template!r}; known: {sorted(TEMPLATES)}")
        if image_aspect not in ASPECTS:
            raise ValueError(f"image_aspect must be one of {ASPECTS}, got {image_aspect!r}")
        if not sources:
            raise ValueError("at least one training source is needed")
        if group_batches < 1:
            raise ValueError(f"group_batches must be at least 1, got {group_batches}")
        self.save_hyperparameters()
        self.sources = sources
        self.val_sources = val_sources or {}
        self.tokenizer_path = tokenizer
        self.template = template
        self.system_prompt = system_prompt
        self.num_image_tokens = num_image_tokens
        self.image_size = image_size
        self.image_mean = tuple(image_mean)
        self.image_std = tuple(image_std)
        self.image_aspect = image_aspect
        self.image_jpeg_draft = image_jpeg_draft
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.max_length = max_length
        self.shuffle_buffer = shuffle_buffer
        self.samples_per_epoch = samples_per_epoch
        self.seed = seed
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.group_by_modality_length = group_by_modality_length
        self.group_batches = group_batches
        self.tally = SkipTally()
        self.rank: int | None = None
        self.world_size: int | None = None
        self._train_sources: dict[str, dict[str, Any]] | None = None
        self._val_sources: dict[str, dict[str, Any]] | None = None

    # ----------------------------------------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        """The tokenizer (loaded once per process)."""
        return load_tokenizer(self.tokenizer_path)

    @property
    def pad_token_id(self) -> int:
        """Id used to pad ``input_ids``."""
        return pad_token_id_of(self.tokenizer)

    @property
    def val_source_names(self) -> list[str]:
        """Names of the validation sources, in the order of :meth:`val_dataloader`'s list."""
        return list(self._resolved_val_sources())

    def skipped_counts(self) -> dict[str, int]:
        """Skipped samples and unreadable shards seen so far by all loaders, ``{"kind/source": count}``."""
        return self.tally.as_dict()

    def make_encoder(self, mode: str = "train") -> SampleEncoder:
        """The per-sample encoder used in the workers (``mode``: ``"train"`` or ``"generate"``)."""
        return SampleEncoder(
            tokenizer=self.tokenizer_path,
            template=self.template,
            num_image_tokens=self.num_image_tokens,
            image_size=self.image_size,
            image_mean=self.image_mean,
            image_std=self.image_std,
            image_aspect=self.image_aspect,
            image_jpeg_draft=self.image_jpeg_draft,
            max_length=self.max_length,
            mode=mode,
            system_prompt=self.system_prompt,
        )

    # ----------------------------------------------------------------------------------------------------------------
    def _position(self) -> tuple[int, int]:
        if self.rank is not None and self.world_size is not None:
            return self.rank, self.world_size
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        return distributed_position()

    def _resolved_train_sources(self) -> dict[str, dict[str, Any]]:
        if self._train_sources is None:
            self._train_sources = resolve_sources(self.sources, "training")
        return self._train_sources

    def _resolved_val_sources(self) -> dict[str, dict[str, Any]]:
        if self._val_sources is None:
            self._val_sources = resolve_sources(self.val_sources, "validation") if self.val_sources else {}
        return self._val_sources

    def setup(self, stage: str | None = None) -> None:
        """Resolves shard lists, checks the tokenizer and fixes this process's rank and world size.

        Args:
            stage: Lightning stage (``fit``, ``validate``, ...); unused.
        """
        image_token_id(self.tokenizer)  # fails early with a clear message if <image> is missing
        self.rank, self.world_size = self._position()
        if stage in (None, "fit"):
            self._resolved_train_sources()
        self._resolved_val_sources()

    def epoch_samples(self) -> int:
        """Training samples per epoch over all ranks: ``samples_per_epoch``, else Σ_m λ_m N_m with frequencies, else
        the ``sizes.json`` total."""
        if self.samples_per_epoch is not None:
            return int(self.samples_per_epoch)
        resolved = self._resolved_train_sources()
        if all("mix_samples" in config for config in resolved.values()):
            return round(sum(config["mix_samples"] for config in resolved.values()))
        urls = [u for config in resolved.values() for u in config["urls"]]
        total = count_samples(urls)
        if total is None:
            raise ValueError("samples_per_epoch is required when the training shards have no sizes.json beside them")
        return total

    def train_dataset(self) -> MixedTrainingStream:
        """The training stream for this rank."""
        rank, world_size = self._position()
        return MixedTrainingStream(
            sources=self._resolved_train_sources(),
            encoder=self.make_encoder("train"),
            collate_fn=Collator(self.pad_token_id, "right"),
            batch_size=self.batch_size,
            batches_per_worker=batches_per_worker(self.epoch_samples(), self.batch_size, world_size, self.num_workers),
            num_workers=self.num_workers,
            shuffle_buffer=self.shuffle_buffer,
            seed=self.seed,
            rank=rank,
            world_size=world_size,
            group_by_modality_length=self.group_by_modality_length,
            group_batches=self.group_batches,
        )

    def _loader(self, dataset: Any, persistent: bool = False) -> CountingLoader:
        return CountingLoader(
            dataset,
            self.tally,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=persistent and self.num_workers > 0,
        )

    def train_dataloader(self) -> CountingLoader:
        """Loader over the weighted mixture; ``len()`` = batches per epoch on this rank."""
        return self._loader(self.train_dataset(), persistent=self.persistent_workers)

    def source_loader(self, name: str, mode: str = "train") -> CountingLoader:
        """A finite loader over one validation source.

        Args:
            name: Validation source name.
            mode: ``"train"`` (full conversations, right padding) or ``"generate"`` (prompts, left padding).
        """
        rank, world_size = self._position()
        config = self._resolved_val_sources()[name]
        dataset = SourceEvalStream(
            source=name,
            urls=config["urls"],
            encoder=self.make_encoder(mode),
            collate_fn=Collator(self.pad_token_id, "left" if mode == "generate" else "right"),
            batch_size=self.val_batch_size,
            rank=rank,
            world_size=world_size,
        )
        return self._loader(dataset)

    def val_dataloader(self) -> list[CountingLoader]:
        """One finite loader per validation source, in the order of :attr:`val_source_names` (full conversations
        with labels; generation batches come from :meth:`generation_dataloaders`)."""
        return [self.source_loader(name, "train") for name in self.val_source_names]

    def test_dataloader(self) -> list[CountingLoader]:
        """Same as :meth:`val_dataloader` (``Trainer.test`` on the validation sources, one loader per source)."""
        return self.val_dataloader()

    def generation_dataloaders(self) -> dict[str, CountingLoader]:
        """``{source: loader}`` of prompt-only, left-padded batches with ``answers`` over the validation sources."""
        return {name: self.source_loader(name, "generate") for name in self.val_source_names}

    def predict_dataloader(self) -> list[CountingLoader]:
        """Generation loaders over the validation sources (for ``Trainer.predict``)."""
        return list(self.generation_dataloaders().values())

    def state_dict(self) -> dict[str, Any]:
        """Saves the skip counts with the checkpoint."""
        return {"skipped": self.skipped_counts()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores the skip counts."""
        self.tally.counts.clear()  # the loaders already created hold this tally object
        self.tally.update(state_dict.get("skipped", {}))
