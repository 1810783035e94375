"""``JsonlPredictionWriter``: a Lightning prediction writer that writes one JSON line per sample.

``predict_step`` returns a list of dicts ``{id, source, question, answer, prediction}`` (``answer``: the reference
answer(s); an extra ``answers`` list, when present, is written too and used for scoring). Each dict becomes a line
of ``<output_dir>/predictions.jsonl``. With several ranks every rank writes its own file
(``predictions.rank0.jsonl``, ...), and rank 0 merges them into ``predictions.jsonl`` at the end when ``merge`` is
set. With ``score`` set, each line also gets ``task`` (when known) and ``score`` (the sample score of
:mod:`mole_lightning.eval.tasks`), and per-source metrics of the file are written next to it as ``metrics.json``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from mole_lightning.eval.tasks import SourceTaskMetrics, infer_task, sample_score

FIELDS = ("id", "source", "question", "answer", "prediction")


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def _rows(prediction: Any) -> list[dict[str, Any]]:
    """Rows of one ``predict_step`` output: a list of dicts, one dict, or a dict of equal-length lists."""
    if prediction is None:
        return []
    if isinstance(prediction, dict):
        lengths = {len(v) for v in prediction.values() if isinstance(v, (list, tuple))}
        if lengths and len(lengths) == 1 and all(isinstance(v, (list, tuple)) for v in prediction.values()):
            count = lengths.pop()
            return [{k: v[i] for k, v in prediction.items()} for i in range(count)]
        return [prediction]
    return [dict(row) for row in prediction]


class JsonlPredictionWriter(BasePredictionWriter):
    """Writes ``predict_step`` outputs as JSONL, one line per sample, after every batch.

    Args:
        output_dir: Directory of the output file(s) (created).
        filename: Output file name (``predictions.jsonl``); other ranks write ``<stem>.rank<r>.jsonl``.
        merge: With several ranks, rank 0 concatenates the rank files into ``filename`` at the end.
        score: Add ``task`` and ``score`` to each line and write ``metrics.json`` (per-source metrics of this
            process's samples, or of all samples after merging).
        vqa_leave_one_out: Score short answers with the official VQAv2 leave-one-out average (data with the 10
            annotator answers per question).
    """

    def __init__(
        self,
        output_dir: str,
        filename: str = "predictions.jsonl",
        merge: bool = True,
        score: bool = True,
        vqa_leave_one_out: bool = False,
    ) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = output_dir
        self.filename = filename
        self.merge = merge
        self.score = score
        self.vqa_leave_one_out = vqa_leave_one_out
        self.lines_written = 0
        self._handle: Any = None
        self._path: str | None = None

    def _rank_path(self, trainer: pl.Trainer) -> str:
        if trainer.world_size == 1:
            return os.path.join(self.output_dir, self.filename)
        stem, ext = os.path.splitext(self.filename)
        return os.path.join(self.output_dir, f"{stem}.rank{trainer.global_rank}{ext or '.jsonl'}")

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        os.makedirs(self.output_dir, exist_ok=True)
        self._path = self._rank_path(trainer)
        self._handle = open(self._path, "w", encoding="utf-8")  # noqa: SIM115 - closed in on_predict_end
        self.lines_written = 0

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._handle is None:
            self.on_predict_start(trainer, pl_module)
        tasks = batch.get("task") if isinstance(batch, dict) else None
        for index, row in enumerate(_rows(prediction)):
            line = {key: _jsonable(row.get(key)) for key in FIELDS}
            line.update({k: _jsonable(v) for k, v in row.items() if k not in FIELDS})
            if self.score:
                self._add_score(line, tasks[index] if tasks is not None and index < len(tasks) else None)
            self._handle.write(json.dumps(line, ensure_ascii=False) + "\n")
            self.lines_written += 1
        self._handle.flush()

    def _add_score(self, line: dict[str, Any], batch_task: str | None) -> None:
        answers = line.get("answers") if line.get("answers") else line.get("answer")
        if answers is None or line.get("prediction") is None:
            return
        answers = [answers] if isinstance(answers, str) else [str(a) for a in answers]
        task = line.get("task") or batch_task or infer_task(answers, line.get("options"))
        line["task"] = task
        line["score"] = sample_score(
            task, str(line["prediction"]), answers, line.get("options"), vqa_leave_one_out=self.vqa_leave_one_out
        )

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        final = self._path
        if trainer.world_size > 1 and self.merge:
            trainer.strategy.barrier("jsonl_prediction_writer")
            if trainer.is_global_zero:
                final = os.path.join(self.output_dir, self.filename)
                merge_jsonl([self._rank_path_for(trainer, r) for r in range(trainer.world_size)], final)
            else:
                final = None
        if self.score and final is not None:
            write_metrics(final, os.path.join(self.output_dir, "metrics.json"), self.vqa_leave_one_out)

    def _rank_path_for(self, trainer: pl.Trainer, rank: int) -> str:
        stem, ext = os.path.splitext(self.filename)
        return os.path.join(self.output_dir, f"{stem}.rank{rank}{ext or '.jsonl'}")


def merge_jsonl(paths: Sequence[str], out_path: str) -> int:
    """Concatenates JSONL files into ``out_path``; returns the number of lines."""
    count = 0
    with open(out_path, "w", encoding="utf-8") as out:
        for path in paths:
            with open(path, encoding="utf-8") as handle:
                for line in handle:
                    if line.strip():
                        out.write(line if line.endswith("\n") else line + "\n")
                        count += 1
    return count


def score_jsonl(path: str, vqa_leave_one_out: bool = False) -> dict[str, float]:
    """Per-source metrics (:class:`~mole_lightning.eval.tasks.SourceTaskMetrics` keys) of a predictions file;
    ``vqa_leave_one_out`` scores short answers with the official VQAv2 leave-one-out average."""
    metrics = SourceTaskMetrics(sync=False, vqa_leave_one_out=vqa_leave_one_out)
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            row = json.loads(line)
            answers = row.get("answers") or row.get("answer")
            if row.get("prediction") is None or answers is None:
                continue
            answers = [answers] if isinstance(answers, str) else answers
            metrics.update(
                [str(row.get("source") or "unknown")],
                [row.get("task")],
                [str(row["prediction"])],
                [answers],
                [row.get("options")],
            )
    return metrics.compute()


def write_metrics(predictions_path: str, out_path: str, vqa_leave_one_out: bool = False) -> dict[str, float]:
    """Scores a predictions file with :func:`score_jsonl` and writes the result as JSON."""
    results = score_jsonl(predictions_path, vqa_leave_one_out)
    with open(out_path, "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=1, sort_keys=True)
    return results
