"""The callback and the prediction writer with the project's training LightningModule."""

from __future__ import annotations

import json
from collections import Counter

import lightning.pytorch as pl

from mole_lightning.eval import GenerationEvalCallback, JsonlPredictionWriter
from mole_lightning.training import MoLELightningModule
from tests.conftest import DEMO_VAL
from tests.eval.conftest import make_eval_datamodule


def test_callback_and_writer_with_training_module(tmp_path, demo):
    module = MoLELightningModule(tokenizer=demo.tokenizer, max_new_tokens=3)
    callback = GenerationEvalCallback(every_n_steps=0, max_samples_per_source=3, max_new_tokens=3)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=1,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=make_eval_datamodule(demo))
    assert {k: v for k, v in callback.last_results.items() if k.endswith("/count") and k.count("/") == 1} == {
        "general/count": 3.0,
        "doc/count": 3.0,
        "med/count": 3.0,
        "overall/count": 9.0,
    }

    out = tmp_path / "pred"
    predictor = pl.Trainer(accelerator="cpu", callbacks=[JsonlPredictionWriter(str(out))], logger=False)
    predictor.predict(module, datamodule=make_eval_datamodule(demo), return_predictions=False)
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * DEMO_VAL  # every validation sample of the 3 sources, once
    assert Counter(row["source"] for row in rows) == {"general": DEMO_VAL, "doc": DEMO_VAL, "med": DEMO_VAL}
    assert len({(row["source"], row["id"]) for row in rows}) == 3 * DEMO_VAL
    assert all({"id", "source", "question", "answer", "prediction", "score"} <= set(row) for row in rows)
