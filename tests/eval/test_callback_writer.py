"""The generation-eval callback on the tiny demo model, the JSONL prediction writer, and the routing report."""

from __future__ import annotations

import csv
import json
import os

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from mole_lightning.data.samples import load_tokenizer
from mole_lightning.eval import GenerationEvalCallback, JsonlPredictionWriter
from tests.conftest import DEMO_VAL
from tests.eval.conftest import ConstantAnswerModel, EvalModule, make_eval_datamodule

SOURCES = ("general", "doc", "med")


def _trainer(tmp_path, callbacks, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=TensorBoardLogger(str(tmp_path), name="tb"),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        **{"limit_val_batches": 0, **kwargs},
    )


def _events(log_dir: str) -> tuple[dict[str, list[tuple[int, float]]], list[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    return scalars, acc.Tags()["tensors"]


def _val_samples(dm, limit: int) -> dict[str, list[tuple[str | None, list[str]]]]:
    """(task, answers) of the first ``limit`` validation samples of each source, read straight from the loaders."""
    dm.setup("validate")
    out = {}
    for name, loader in dm.generation_dataloaders().items():
        rows = []
        for batch in loader:
            rows.extend(zip(batch["task"], batch["answers"]))
        out[name] = rows[:limit]
    return out


def test_callback_logs_per_source_metrics_on_tiny_model(tmp_path, demo):
    from mole_lightning.models import build_preset

    torch.manual_seed(0)
    model = build_preset("tiny", tokenizer=demo.tokenizer)
    callback = GenerationEvalCallback(every_n_steps=2, max_samples_per_source=5, max_new_tokens=3, num_examples=2)
    trainer = _trainer(tmp_path, [callback], max_steps=2)
    trainer.fit(EvalModule(model), datamodule=make_eval_datamodule(demo))

    results = callback.last_results
    for source in SOURCES:
        assert results[f"{source}/count"] == 5
        assert 0.0 <= results[f"{source}/score"] <= 1.0
    assert results["overall/count"] == 15
    assert results["overall/score"] == pytest.approx(sum(results[f"{s}/score"] for s in SOURCES) / 3)
    assert callback.best_step == 2 and callback.best_score == results["overall/score"]
    assert {ex["source"] for ex in callback.last_examples} == set(SOURCES)
    assert len(callback.last_examples) == 6
    routing = callback.last_routing
    assert routing.sources == list(SOURCES) and routing.layers == ["L0", "L1"]
    assert int(routing.select("image").sum()) > 0 and int(routing.select("text").sum()) > 0
    assert all(line.split()[0] in (*SOURCES, "overall", "source") for line in callback.last_table.splitlines())

    scalars, tensors = _events(trainer.logger.log_dir)
    for source in SOURCES:
        assert scalars[f"gen_eval/{source}/score"][0][0] == 2
        assert scalars[f"gen_eval/{source}/count"] == [(2, 5.0)]
    assert "gen_eval/overall/score" in scalars and "gen_eval/best/overall/score" in scalars
    assert "gen_eval/routing/mi_all/L0" in scalars
    assert "gen_eval/examples/text_summary" in tensors
    assert trainer.callback_metrics["gen_eval/overall/score"].item() == pytest.approx(results["overall/score"])


def test_callback_scores_constant_answers_in_validate(tmp_path, demo):
    dm = make_eval_datamodule(demo)
    tokenizer = load_tokenizer(demo.tokenizer)
    module = EvalModule(ConstantAnswerModel(tokenizer, "Yes, it is."))
    table_path = tmp_path / "tables" / "gen_eval.txt"
    callback = GenerationEvalCallback(max_samples_per_source=7, log_routing=False, table_path=str(table_path))
    trainer = _trainer(tmp_path, [callback], limit_val_batches=1)
    logged = trainer.validate(module, datamodule=dm)[0]

    samples = _val_samples(make_eval_datamodule(demo), 7)
    results = callback.last_results
    # "Yes, it is." is "yes" for POPE, no option letter, and matches no short or open reference
    med_yesno = [answers[0] for task, answers in samples["med"] if task == "yesno"]
    assert med_yesno, "the demo's med source has yes/no questions"
    assert results["med/yesno/count"] == len(med_yesno)
    assert results["med/yesno/yes_ratio"] == 1.0
    assert results["med/yesno/accuracy"] == pytest.approx(med_yesno.count("yes") / len(med_yesno))
    assert results["doc/vqa/exact_match"] == 0.0
    assert results["doc/score"] == 0.0
    if any(task == "mc" for task, _ in samples["general"]):
        assert results["general/mc/unparsed"] == 1.0
    assert logged["gen_eval/med/yesno/yes_ratio"] == 1.0
    assert logged["gen_eval/overall/count"] == 21
    table = table_path.read_text().splitlines()
    assert table[0].startswith("generation eval at step")
    med_row = next(line.split() for line in table if line.startswith("med "))
    assert med_row[1] == "7" and float(med_row[2]) == pytest.approx(results["med/score"], abs=1e-3)


def test_prediction_writer_one_line_per_sample(tmp_path, demo):
    dm = make_eval_datamodule(demo, batch_size=3)
    tokenizer = load_tokenizer(demo.tokenizer)
    module = EvalModule(ConstantAnswerModel(tokenizer, "no"))
    out = tmp_path / "pred"
    writer = JsonlPredictionWriter(str(out))
    trainer = _trainer(tmp_path, [writer])
    trainer.predict(module, datamodule=dm, return_predictions=False)

    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 3 * DEMO_VAL  # every validation sample of the 3 sources
    rows = [json.loads(line) for line in lines]
    assert {r["source"] for r in rows} == set(SOURCES)
    assert len({r["id"] for r in rows}) == 3 * DEMO_VAL
    for row in rows:
        assert set(row) >= {"id", "source", "question", "answer", "prediction", "task", "score"}
        assert row["prediction"] == "no"
        if row["task"] == "yesno":
            assert row["score"] == float(row["answer"] == ["no"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["overall/count"] == 3 * DEMO_VAL
    med_yesno = [r for r in rows if r["source"] == "med" and r["task"] == "yesno"]
    assert metrics["med/yesno/yes_ratio"] == 0.0
    assert metrics["med/yesno/accuracy"] == pytest.approx(
        sum(r["answer"] == ["no"] for r in med_yesno) / len(med_yesno)
    )


def test_routing_report_on_tiny_checkpoint(tmp_path, demo):
    from tools.routing_report import main

    from mole_lightning.models import build_preset

    torch.manual_seed(0)
    model = build_preset("tiny", tokenizer=demo.tokenizer)
    with torch.no_grad():  # trained-looking routers: shift the router biases so that routing is uneven
        for name, param in model.named_parameters():
            if name.endswith("router.bias"):
                param.add_(torch.tensor([0.5, 0.0, -0.5]))
    state = {f"model.{n}": p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": {"model_seed": 0}}, ckpt)

    out = tmp_path / "report"
    vals = [f"--val={s}={demo.val[s]}" for s in SOURCES]
    code = main(["--ckpt", str(ckpt), "--tokenizer", demo.tokenizer, *vals, "--max-samples", "4", "--out", str(out)])
    assert code == 0
    pngs = sorted(p for p in os.listdir(out) if p.endswith(".png"))
    assert pngs == ["routing_all_L0-L1.png", "routing_image_L0-L1.png", "routing_text_L0-L1.png"]
    assert all((out / p).stat().st_size > 1000 for p in pngs)
    with open(out / "routing_fractions.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {(r["token_type"], r["source"], r["layer"]) for r in rows} >= {
        (t, s, layer) for t in ("all", "text") for s in SOURCES for layer in ("L0", "L1")
    }
    for row in rows:
        assert sum(float(row[f"expert_{e}"]) for e in range(3)) == pytest.approx(1.0, abs=1e-9)
        assert int(row["tokens"]) > 0
    image_tokens = {r["source"]: int(r["tokens"]) for r in rows if r["token_type"] == "image" and r["layer"] == "L0"}
    assert image_tokens == {s: 4 * 16 for s in SOURCES}  # 4 samples with one image of 16 tokens each
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples"] == {s: 4 for s in SOURCES}
    assert set(summary["mi_bits"]) == {"L0", "L1"}
    with open(out / "specialization.csv") as handle:
        spec = list(csv.DictReader(handle))
    assert len(spec) == 6  # 3 token types x 2 layers
    assert all(0.0 <= float(r["mi_bits"]) <= float(r["source_entropy_bits"]) + 1e-9 for r in spec)


def test_score_jsonl_vqa_leave_one_out(tmp_path):
    from mole_lightning.eval import score_jsonl

    path = tmp_path / "predictions.jsonl"
    rows = [
        {"source": "vqav2", "task": "vqa", "prediction": "cat", "answers": ["cat"] * 3 + ["dog"] * 7},
        {"source": "vqav2", "task": "vqa", "prediction": "two", "answers": ["2"] * 2 + ["3"] * 8},
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    # official VQAv2: 3 matches -> 0.9, 2 matches -> 0.6; the plain formula: 1.0 and 2/3
    assert score_jsonl(str(path), vqa_leave_one_out=True)["vqav2/vqa/vqa_accuracy"] == pytest.approx(0.75)
    assert score_jsonl(str(path))["vqav2/vqa/vqa_accuracy"] == pytest.approx((1 + 2 / 3) / 2)
