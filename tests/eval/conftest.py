"""Helpers of the evaluation tests: a stand-in model answering a constant, a LightningModule driving the callbacks,
and the DataModule settings they use (the demo data set comes from ``tests/conftest.py``)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from mole_lightning.data import DemoData, MixedInstructionDataModule
from tests.conftest import make_datamodule


def make_eval_datamodule(demo: DemoData, batch_size: int = 4) -> MixedInstructionDataModule:
    """The shared DataModule factory with the evaluation tests' settings (256 tokens, 8 samples per epoch, no
    shuffling)."""
    return make_datamodule(
        demo, batch_size=batch_size, val_batch_size=None, max_length=256, samples_per_epoch=8, shuffle_buffer=0
    )


class ConstantAnswerModel(nn.Module):
    """Stands in for LlavaMoLE: ``generate`` appends the same answer to every prompt."""

    def __init__(self, tokenizer: Any, answer: str) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.answer_ids = torch.tensor(tokenizer(answer, add_special_tokens=False)["input_ids"])
        self.dummy = nn.Parameter(torch.zeros(1))

    def generate(self, pixel_values: Any, input_ids: torch.Tensor, attention_mask: Any = None, **kwargs: Any):
        new = self.answer_ids.to(input_ids.device).expand(input_ids.shape[0], -1)
        return torch.cat([input_ids, new], dim=1)


class EvalModule(pl.LightningModule):
    """Minimal LightningModule with a ``model`` attribute (training loss, validation loss, predict)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def _loss(self, batch: dict[str, Any]) -> torch.Tensor:
        if not hasattr(self.model, "language_model"):
            return self.model.dummy.sum() * 0.0
        out = self.model(
            batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["labels"], batch["has_image"]
        )
        return out.total_loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._loss(batch)

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        return None

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        out = self.model.generate(batch.get("pixel_values"), batch["input_ids"], batch.get("attention_mask"))
        texts = self.model.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        return [
            {
                "id": batch["id"][i],
                "source": batch["source"][i],
                "question": batch["question"][i],
                "answer": batch["answers"][i],
                "prediction": texts[i].strip(),
            }
            for i in range(len(texts))
        ]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=1e-3)
