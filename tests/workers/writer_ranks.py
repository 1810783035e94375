"""One rank of the prediction-writer check (two ranks started by ``tests/eval/test_writer_ranks.py``): Lightning's
DDP on CPU (gloo) runs ``Trainer.predict`` over samples 0..5 with ``JsonlPredictionWriter(--out)``.

Sample ``i`` is a yes/no question with reference "yes"; the model answers "yes" for even ``i``, "no" for odd ``i``,
and each row records the rank that predicted it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mole_lightning.eval import JsonlPredictionWriter  # noqa: E402
from tests.workers import end_process_group  # noqa: E402

NUM_SAMPLES = 6


class AnswerModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def predict_step(self, batch: torch.Tensor, batch_idx: int, dataloader_idx: int = 0) -> list[dict]:
        return [
            {
                "id": f"s{i}",
                "source": "med",
                "question": f"Is sample {i} abnormal?",
                "answer": "yes",
                "prediction": "yes" if i % 2 == 0 else "no",
                "task": "yesno",
                "rank": self.global_rank,
            }
            for i in batch.tolist()
        ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        callbacks=[JsonlPredictionWriter(args.out)],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loader = DataLoader(torch.arange(NUM_SAMPLES), batch_size=2, shuffle=False)
    trainer.predict(AnswerModule(), dataloaders=loader, return_predictions=False)
    end_process_group()


if __name__ == "__main__":
    main()
