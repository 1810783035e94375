"""MixedInstructionDataModule: standalone use, simulated ranks, per-source validation, skip counts, Lightning fit."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from mole_lightning.data import MixedInstructionDataModule
from tests.conftest import DEMO_TRAIN, DEMO_VAL, make_datamodule
from tests.data.conftest import IMAGE_SIZE, NUM_IMAGE_TOKENS, record, write_source


def make(demo, **overrides) -> MixedInstructionDataModule:
    """The shared DataModule factory with the data tests' geometry (4 image tokens, 32 px) and sizes."""
    options = dict(num_image_tokens=NUM_IMAGE_TOKENS, image_size=IMAGE_SIZE, batch_size=8, max_length=256)
    options.update(shuffle_buffer=20, samples_per_epoch=64, val_batch_size=None)
    return make_datamodule(demo, **{**options, **overrides})


@pytest.mark.parametrize("grouped", [False, True], ids=["consecutive", "grouped"])
def test_epoch_length_equal_over_simulated_ranks(demo, grouped):
    lengths = []
    for rank in (0, 1):
        datamodule = make(
            demo, num_workers=2, samples_per_epoch=100, batch_size=4, group_by_modality_length=grouped, group_batches=2
        )
        datamodule.setup("fit")
        datamodule.rank, datamodule.world_size = rank, 2
        loader = datamodule.train_dataloader()
        lengths.append((len(loader), sum(1 for _ in loader)))
    assert lengths == [(14, 14), (14, 14)]


def epoch_ids(loader) -> list[list[str]]:
    """The sample ids of each batch of one pass over a loader."""
    return [batch["id"] for batch in loader]


def test_grouped_training_stream_resumes_exactly_mid_epoch(demo):
    """The resume mechanism (``ResumableTrainLoader``) reseeds the epoch and skips the trained batches; with grouping
    the resumed loader yields exactly the batches an uninterrupted epoch yields after them."""
    from mole_lightning.training.callbacks import _ResumableLoader

    options = dict(num_workers=2, batch_size=4, samples_per_epoch=48, group_by_modality_length=True, group_batches=2)
    uninterrupted = make(demo, **options)
    uninterrupted.setup("fit")
    loader = uninterrupted.train_dataloader()
    first, second = epoch_ids(loader), epoch_ids(loader)
    assert len(first) == len(second) == 12 and first != second

    resumed = make(demo, **options)  # a fresh process: the stream restarts at the first epoch
    resumed.setup("fit")
    wrapped = _ResumableLoader(resumed.train_dataloader(), trainer=None)
    wrapped.load_state_dict({"dataset_epoch": 2, "batches": 5})  # saved after 5 batches of the second epoch
    assert epoch_ids(wrapped) == second[5:]
    assert epoch_ids(wrapped) != second  # the next epoch is a new one


def test_bad_group_batches_is_a_clear_error(demo):
    with pytest.raises(ValueError, match="group_batches must be at least 1, got 0"):
        make(demo, group_by_modality_length=True, group_batches=0)


def test_default_epoch_size_comes_from_sizes_json(demo):
    datamodule = make(demo, samples_per_epoch=None)
    datamodule.setup("fit")
    assert datamodule.epoch_samples() == 3 * DEMO_TRAIN


def test_validation_loaders_per_source_and_generation_batches(demo):
    datamodule = make(demo, val_batch_size=8)
    datamodule.setup("validate")
    assert datamodule.val_source_names == ["general", "doc", "med"]
    for name, loader in zip(datamodule.val_source_names, datamodule.val_dataloader()):
        batches = list(loader)
        assert [len(b["id"]) for b in batches] == [8, DEMO_VAL - 8]  # a full batch, then the rest
        assert {s for b in batches for s in b["source"]} == {name}
    test_loaders = datamodule.test_dataloader()
    assert [{s for b in loader for s in b["source"]} for loader in test_loaders] == [{"general"}, {"doc"}, {"med"}]
    batch = next(iter(datamodule.generation_dataloaders()["med"]))
    assert batch["attention_mask"][:, -1].all()  # left padded
    assert all(a in (["yes"], ["no"], ["normal tissue"], ["abnormal tissue"]) for a in batch["answers"])
    tokenizer = datamodule.tokenizer
    prompt = tokenizer.decode(batch["input_ids"][0][batch["attention_mask"][0].bool()])
    assert prompt.endswith(f"USER: {'<image>' * NUM_IMAGE_TOKENS}\n{batch['question'][0]} ASSISTANT:")


def test_skipped_counts_collected_from_workers(demo, tmp_path):
    samples = [record(i, "Q?", "A") for i in range(12)]
    samples[3]["json"] = b"{broken"
    samples[7]["png"] = b"junk"
    spec = write_source(str(tmp_path), "bad", samples, maxcount=6)
    datamodule = make(demo, val_sources={"bad": {"urls": spec}}, num_workers=2, val_batch_size=2)
    datamodule.setup("validate")
    [loader] = datamodule.val_dataloader()
    assert sum(len(b["id"]) for b in loader) == 10
    assert datamodule.skipped_counts() == {"bad_json/bad": 1, "corrupt_image/bad": 1}
    assert datamodule.state_dict() == {"skipped": {"bad_json/bad": 1, "corrupt_image/bad": 1}}


def test_setup_errors_are_clear(demo, tmp_path):
    with pytest.raises(ValueError, match="unknown template"):
        make(demo, template="alpaca")
    datamodule = make(demo, sources={"gone": {"urls": str(tmp_path / "none-{000000..000001}.tar"), "weight": 1.0}})
    with pytest.warns(UserWarning, match="missing shard"), pytest.raises(FileNotFoundError, match="readable shard"):
        datamodule.setup("fit")


class TinyModel(pl.LightningModule):
    """Bag-of-tokens model that consumes the batch dict like a real multimodal model would."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.embed = torch.nn.EmbeddingBag(vocab, 8)
        self.image = torch.nn.Linear(3, 8)
        self.head = torch.nn.Linear(8, 1)
        self.val_sources: list[str] = []

    def loss(self, batch):
        features = self.embed(batch["input_ids"], per_sample_weights=None, offsets=None)
        if batch["pixel_values"] is not None:
            pooled = self.image(batch["pixel_values"].float().mean(dim=(2, 3)))  # uint8 pixels
            features = features.index_add(0, batch["has_image"].nonzero().flatten(), pooled)
        return self.head(features).pow(2).mean()

    def training_step(self, batch, batch_idx):
        assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
        self.log_dict({f"skipped/{k}": float(v) for k, v in self.trainer.datamodule.skipped_counts().items()})
        return self.loss(batch)

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        self.val_sources.append(batch["source"][0])
        self.log("val_loss", self.loss(batch), batch_size=len(batch["id"]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_fits_in_a_lightning_trainer_with_workers(demo):
    datamodule = make(demo, num_workers=2, val_batch_size=20)
    model = TinyModel(len(datamodule.tokenizer))
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=datamodule)
    assert trainer.global_step == 8  # ceil(64 / 8) batches, 4 per worker
    assert sorted(set(model.val_sources)) == ["doc", "general", "med"]


def test_frequencies_set_the_epoch_to_the_mixture_size_and_the_stream_follows_them(demo):
    frequencies = {"general": 1.0, "doc": 0.5, "med": 2.0}  # every demo source has N = DEMO_TRAIN training samples
    sources = {name: {"urls": spec, "frequency": frequencies[name]} for name, spec in demo.train.items()}
    dm = make(demo, sources=sources, samples_per_epoch=None)
    dm.setup("fit")
    assert dm.epoch_samples() == DEMO_TRAIN * (1.0 + 0.5 + 2.0)  # |D_mix| = Σ λ_m N_m

    dm = make(demo, sources=sources, samples_per_epoch=1400, batch_size=20)
    dm.setup("fit")
    counts = {name: 0 for name in frequencies}
    for batch in dm.train_dataloader():
        for source in batch["source"]:
            counts[source] += 1
    total = sum(counts.values())
    assert total == 1400
    for name, frequency in frequencies.items():
        expected = frequency * DEMO_TRAIN / (DEMO_TRAIN * 3.5)  # λ_m N_m / Σ λ_k N_k
        standard_error = (expected * (1 - expected) / total) ** 0.5  # binomial
        assert abs(counts[name] / total - expected) < 4 * standard_error, counts
