"""Benchmark metrics for generated answers, as ``torchmetrics`` Metrics (their sums are synchronized across ranks).

One metric per task type of the data (``task`` field of a sample):

============  ============================  =====================================================================
task          metric                        values (``compute()`` returns a dict of floats)
============  ============================  =====================================================================
``vqa``       :class:`ShortAnswerAccuracy`  ``exact_match``, ``vqa_accuracy`` (VQAv2 soft accuracy), ``count``
``mc``        :class:`MultipleChoiceAccuracy`  ``accuracy``, ``unparsed`` (no letter found), ``count``
``yesno``     :class:`YesNoMetrics`         ``accuracy``, ``precision``, ``recall``, ``f1``, ``yes_ratio``, ``count``
``open``      :class:`OpenEndedF1`          ``f1``, ``precision``, ``recall`` (token level), ``exact_match``, ``count``
============  ============================  =====================================================================

The *score* of a sample is its task's primary value: ``vqa_accuracy``, ``accuracy``, ``accuracy`` and ``f1``. Tasks
are registered :class:`TaskSpec` objects (:data:`TASK_SPECS`, :func:`register_task`): metric, primary value, sample
score, prompt suffix and inference from a record, in one place. :class:`SourceTaskMetrics` keeps one metric per
(source, task) plus all-source ones and returns flat ``"<source>/<task>/<name>"`` keys, a per-source
``"<source>/score"`` (mean sample score) and ``"overall/score"`` (mean of the source scores).

Short answers are compared after :func:`~mole_lightning.eval.normalize.normalize_answer`; yes/no answers use POPE's
mapping; multiple choice extracts the option letter (:func:`~mole_lightning.eval.normalize.extract_choice`).
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchmetrics import Metric

from mole_lightning.eval.normalize import (
    answer_tokens,
    extract_choice,
    normalize_answer,
    pope_yes_no,
    reference_choice,
    reference_yes_no,
)
from mole_lightning.eval.prompts import MULTIPLE_CHOICE_PROMPT, SHORT_ANSWER_PROMPT

Refs = Sequence[str] | str


def _as_list(refs: Refs | None) -> list[str]:
    if refs is None:
        return []
    return [refs] if isinstance(refs, str) else [str(r) for r in refs]


# ------------------------------------------------------------------------------------------------ per-sample scores
def short_answer_scores(
    prediction: str,
    references: Refs,
    *,
    min_matches: int = 3,
    scale_to_references: bool = True,
    leave_one_out: bool = False,
) -> tuple[float, float]:
    """Exact match and VQA soft accuracy of one short answer.

    Exact match is 1 when the normalized prediction equals a normalized reference. Soft accuracy is
    ``min(#references equal to the prediction / min_matches, 1)`` (VQAv2: 3 of the 10 annotators). With
    ``scale_to_references``, a sample with fewer than ``min_matches`` references divides by its number of references
    instead, so a single-reference sample scores like exact match.

    With ``leave_one_out`` (the official VQAv2 evaluation), the soft accuracy is the mean over the N subsets of N-1
    references that leave one reference out: with 10 annotator answers, 3 matches score 0.9 and 2 score 0.6 (1.0 and
    0.67 without it). A sample with one reference keeps the plain formula.

    Args:
        prediction: Generated answer.
        references: Accepted answers (duplicates count, as annotator answers do).
        min_matches: Matches needed for full credit.
        scale_to_references: Divide by the number of references (of the subset, with ``leave_one_out``) when it is
            smaller than ``min_matches``.
        leave_one_out: Average over the leave-one-reference-out subsets, as the official VQAv2 evaluation does.

    Returns:
        ``(exact_match, soft_accuracy)``, each in [0, 1]; ``(0, 0)`` without references.
    """
    refs = [normalize_answer(r) for r in _as_list(references)]
    if not refs:
        return 0.0, 0.0
    pred = normalize_answer(prediction)
    hits = [r == pred for r in refs]
    matches = sum(hits)

    def soft(count: int, num_refs: int) -> float:
        denominator = min(min_matches, num_refs) if scale_to_references else min_matches
        return min(count / max(denominator, 1), 1.0)

    if leave_one_out and len(refs) > 1:
        # subset without reference i: matches - hits[i] matching references out of len(refs) - 1
        accuracy = sum(soft(matches - int(hit), len(refs) - 1) for hit in hits) / len(refs)
    else:
        accuracy = soft(matches, len(refs))
    return float(matches > 0), accuracy


def token_f1(prediction: str, reference: str) -> tuple[float, float, float]:
    """Token precision, recall and F1 of one prediction against one reference (SQuAD-style bag of tokens).

    Tokens come from :func:`~mole_lightning.eval.normalize.answer_tokens`. When either side has no token, all three
    are 1 if both are empty, else 0.
    """
    pred, ref = answer_tokens(prediction), answer_tokens(reference)
    if not pred or not ref:
        same = float(pred == ref)
        return same, same, same
    overlap = sum((Counter(pred) & Counter(ref)).values())
    if overlap == 0:
        return 0.0, 0.0, 0.0
    precision, recall = overlap / len(pred), overlap / len(ref)
    return precision, recall, 2 * precision * recall / (precision + recall)


def open_ended_scores(prediction: str, references: Refs) -> dict[str, float]:
    """Best token ``f1``, ``precision``, ``recall`` and ``exact_match`` over the references (each maximized
    separately, as SQuAD does)."""
    refs = _as_list(references)
    if not refs:
        return {"f1": 0.0, "precision": 0.0, "recall": 0.0, "exact_match": 0.0}
    scores = [token_f1(prediction, r) for r in refs]
    pred = normalize_answer(prediction)
    return {
        "precision": max(s[0] for s in scores),
        "recall": max(s[1] for s in scores),
        "f1": max(s[2] for s in scores),
        "exact_match": float(any(normalize_answer(r) == pred for r in refs)),
    }


# ------------------------------------------------------------------------------------------------------ metrics
class _SumMetric(Metric):
    """Base: float sums plus a sample count, all summed over ranks."""

    full_state_update = False
    higher_is_better = True
    sums: tuple[str, ...] = ()

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name in self.sums:
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _add(self, values: dict[str, float], count: int) -> None:
        for name, value in values.items():
            state = getattr(self, name)
            state += torch.tensor(value, dtype=state.dtype, device=state.device)
        self.total += count

    def _mean(self, name: str) -> float:
        total = int(self.total)
        return float(getattr(self, name)) / total if total else float("nan")


class ShortAnswerAccuracy(_SumMetric):
    """Short-answer VQA: normalized exact match and VQAv2 soft accuracy ``min(#matching references / 3, 1)``.

    Args:
        min_matches: Matching references needed for full soft credit (3 in VQAv2).
        scale_to_references: For samples with fewer references than ``min_matches``, divide by the number of
            references (a single-reference sample then scores like exact match).
        leave_one_out: Average the soft accuracy over the leave-one-reference-out subsets (official VQAv2).
        **kwargs: ``torchmetrics.Metric`` options (``dist_sync_on_step``, ``process_group``, ...).
    """

    sums = ("exact", "soft")

    def __init__(
        self, min_matches: int = 3, scale_to_references: bool = True, leave_one_out: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.min_matches = min_matches
        self.scale_to_references = scale_to_references
        self.leave_one_out = leave_one_out

    def update(self, preds: Sequence[str], targets: Sequence[Refs]) -> None:
        """Adds a batch of generated answers and their reference lists."""
        exact = soft = 0.0
        for pred, refs in zip(preds, targets, strict=True):
            em, acc = short_answer_scores(
                pred,
                refs,
                min_matches=self.min_matches,
                scale_to_references=self.scale_to_references,
                leave_one_out=self.leave_one_out,
            )
            exact, soft = exact + em, soft + acc
        self._add({"exact": exact, "soft": soft}, len(preds))

    def compute(self) -> dict[str, float]:
        """``exact_match``, ``vqa_accuracy`` (means in [0, 1]) and ``count``."""
        return {"exact_match": self._mean("exact"), "vqa_accuracy": self._mean("soft"), "count": float(self.total)}


class MultipleChoiceAccuracy(_SumMetric):
    """Multiple choice (MMBench / ScienceQA style): accuracy of the option letter extracted from the answer.

    A reference is a letter (``"B"``, ``"(B)"``) or, with options, an option's text. An answer without a letter
    counts as wrong and as ``unparsed``.

    Args:
        **kwargs: ``torchmetrics.Metric`` options.
    """

    sums = ("correct", "failed")

    def update(
        self,
        preds: Sequence[str],
        targets: Sequence[Refs],
        options: Sequence[Sequence[str] | None] | None = None,
    ) -> None:
        """Adds a batch; ``options[i]`` are sample i's option texts in letter order (or ``None``)."""
        option_lists = list(options) if options is not None else [None] * len(preds)
        correct = failed = 0
        for pred, refs, opts in zip(preds, targets, option_lists, strict=True):
            letter = extract_choice(pred, opts)
            target = next((reference_choice(r, opts) for r in _as_list(refs)), None)
            failed += letter is None
            correct += letter is not None and letter == target
        self._add({"correct": float(correct), "failed": float(failed)}, len(preds))

    def compute(self) -> dict[str, float]:
        """``accuracy``, ``unparsed`` (fraction without an extracted letter) and ``count``."""
        return {"accuracy": self._mean("correct"), "unparsed": self._mean("failed"), "count": float(self.total)}


class YesNoMetrics(_SumMetric):
    """Yes/no questions (POPE, PathVQA closed): accuracy, precision, recall, F1 (``yes`` is the positive class) and
    the ratio of ``yes`` answers, with POPE's mapping of generated text to yes/no.

    Samples whose reference is neither yes nor no (after normalization, then POPE's mapping) are not counted.
    Precision and recall are 0 when undefined.

    Args:
        **kwargs: ``torchmetrics.Metric`` options.
    """

    sums = ("tp", "fp", "tn", "fn")

    def update(self, preds: Sequence[str], targets: Sequence[Refs]) -> None:
        """Adds a batch of generated answers and references (the first reference of each sample is used)."""
        counts = dict.fromkeys(self.sums, 0.0)
        used = 0
        for pred, refs in zip(preds, targets, strict=True):
            target = next((reference_yes_no(r) for r in _as_list(refs)), None)
            if target is None:
                continue
            used += 1
            said_yes = pope_yes_no(pred) == "yes"
            key = ("tp" if target == "yes" else "fp") if said_yes else ("fn" if target == "yes" else "tn")
            counts[key] += 1
        self._add(counts, used)

    def compute(self) -> dict[str, float]:
        """``accuracy``, ``precision``, ``recall``, ``f1``, ``yes_ratio`` and ``count``."""
        tp, fp, tn, fn = (float(getattr(self, n)) for n in self.sums)
        total = tp + fp + tn + fn
        if not total:
            nan = float("nan")
            return {"accuracy": nan, "precision": nan, "recall": nan, "f1": nan, "yes_ratio": nan, "count": 0.0}
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return {
            "accuracy": (tp + tn) / total,
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "yes_ratio": (tp + fp) / total,
            "count": total,
        }


class OpenEndedF1(_SumMetric):
    """Open-ended answers (PathVQA open): token F1, precision and recall against the best reference, plus
    normalized exact match; means over samples.

    Args:
        **kwargs: ``torchmetrics.Metric`` options.
    """

    sums = ("f1", "precision", "recall", "exact")

    def update(self, preds: Sequence[str], targets: Sequence[Refs]) -> None:
        """Adds a batch of generated answers and their reference lists."""
        sums = dict.fromkeys(self.sums, 0.0)
        for pred, refs in zip(preds, targets, strict=True):
            scores = open_ended_scores(pred, refs)
            for name in ("f1", "precision", "recall"):
                sums[name] += scores[name]
            sums["exact"] += scores["exact_match"]
        self._add(sums, len(preds))

    def compute(self) -> dict[str, float]:
        """``f1``, ``precision``, ``recall``, ``exact_match`` and ``count``."""
        return {
            "f1": self._mean("f1"),
            "precision": self._mean("precision"),
            "recall": self._mean("recall"),
            "exact_match": self._mean("exact"),
            "count": float(self.total),
        }


class ScoreMean(_SumMetric):
    """Mean of per-sample scores (:func:`sample_score`), summed over ranks.

    Args:
        **kwargs: ``torchmetrics.Metric`` options.
    """

    sums = ("score",)

    def update(self, scores: Sequence[float]) -> None:
        """Adds per-sample scores."""
        self._add({"score": float(sum(scores))}, len(scores))

    def compute(self) -> dict[str, float]:
        """``score`` and ``count``."""
        return {"score": self._mean("score"), "count": float(self.total)}


# ------------------------------------------------------------------------------------------------ task registry
@dataclass(frozen=True)
class TaskSpec:
    """An eval task: everything the package needs to score it, in one place.

    Attributes:
        name: The ``task`` value of samples (``"vqa"``...).
        metric: ``metric(sync_on_compute, leave_one_out) -> Metric`` whose ``update(preds, refs[, options])``
            takes a batch and whose ``compute()`` returns a dict with ``primary`` and ``count``.
        primary: The metric value used as the sample score and in the per-source score.
        score: ``score(prediction, references, options, leave_one_out) -> float``, one sample's primary value.
        prompt: LLaVA-1.5's instruction appended to the question (``None``: the question as it is).
        recognize: ``recognize(normalized_references, options, question_text) -> bool``: whether a record without a
            ``task`` field is of this task (``None``: never recognized; see :func:`infer_task`).
        takes_options: The metric's ``update`` also takes each sample's option texts (multiple choice).
    """

    name: str
    metric: Callable[[bool, bool], Metric]
    primary: str
    score: Callable[[str, Refs, Sequence[str] | None, bool], float]
    prompt: str | None = None
    recognize: Callable[[list[str], Sequence[str] | None, str], bool] | None = None
    takes_options: bool = False


TASK_SPECS: dict[str, TaskSpec] = {}
"""The task registry, in inference order (built-ins: ``mc``, ``yesno``, ``vqa``, ``open``); add one with
:func:`register_task`."""


def register_task(spec: TaskSpec) -> TaskSpec:
    """Register (or replace) an eval task; it is then scored by the callback, the writer and ``score_jsonl``,
    prompted by :func:`~mole_lightning.eval.prompts.apply_eval_prompt` and inferred by :func:`infer_task`, where a
    task registered later is tried first (``open``, registered first, takes what no other task recognizes)."""
    others = {name: existing for name, existing in TASK_SPECS.items() if name != spec.name}
    TASK_SPECS.clear()
    TASK_SPECS.update({spec.name: spec, **others})
    return spec


def task_names() -> tuple[str, ...]:
    """The registered tasks, in inference order."""
    return tuple(TASK_SPECS)


def task_spec(task: str) -> TaskSpec:
    """The :class:`TaskSpec` of ``task``.

    Raises:
        ValueError: an unknown task (the message lists the known ones).
    """
    try:
        return TASK_SPECS[task]
    except KeyError:
        raise ValueError(f"unknown task {task!r}; expected one of {task_names()}") from None


def infer_task(references: Refs, options: Sequence[str] | None = None, text: str = "") -> str:
    """Task of a sample without a ``task`` field: the first registered task that recognizes it (built-ins: ``mc``
    with options or LLaVA's multiple-choice instruction in the question, ``yesno`` when every reference is yes/no,
    ``vqa`` when the longest normalized reference has at most 3 words, else ``open``)."""
    refs = [normalize_answer(r) for r in _as_list(references)]
    names = task_names()
    for spec in TASK_SPECS.values():
        if spec.recognize is not None and spec.recognize(refs, options, text):
            return spec.name
    return names[-1]


def sample_score(
    task: str,
    prediction: str,
    references: Refs,
    options: Sequence[str] | None = None,
    *,
    vqa_leave_one_out: bool = False,
) -> float:
    """The primary value of one sample of ``task`` (``vqa_leave_one_out``: see :func:`short_answer_scores`)."""
    return task_spec(task).score(prediction, references, options, vqa_leave_one_out)


def make_task_metric(task: str, *, sync_on_compute: bool = True, leave_one_out: bool = False) -> Metric:
    """A fresh metric of ``task``."""
    return task_spec(task).metric(sync_on_compute, leave_one_out)


def _choice_score(prediction: str, references: Refs, options: Sequence[str] | None, _: bool) -> float:
    target = next((reference_choice(r, options) for r in _as_list(references)), None)
    return float(target is not None and extract_choice(prediction, options) == target)


def _yes_no_score(prediction: str, references: Refs, options: Sequence[str] | None, _: bool) -> float:
    target = next((reference_yes_no(r) for r in _as_list(references)), None)
    return float(target is not None and pope_yes_no(prediction) == target)


register_task(
    TaskSpec(
        "open",
        lambda sync, _: OpenEndedF1(sync_on_compute=sync),
        "f1",
        lambda prediction, refs, options, _: open_ended_scores(prediction, refs)["f1"],
    )
)


register_task(
    TaskSpec(
        "vqa",
        lambda sync, leave_one_out: ShortAnswerAccuracy(leave_one_out=leave_one_out, sync_on_compute=sync),
        "vqa_accuracy",
        lambda prediction, refs, options, loo: short_answer_scores(prediction, refs, leave_one_out=loo)[1],
        prompt=SHORT_ANSWER_PROMPT,
        recognize=lambda refs, options, text: max((len(r.split()) for r in refs), default=0) <= 3,
    )
)
register_task(
    TaskSpec(
        "yesno",
        lambda sync, _: YesNoMetrics(sync_on_compute=sync),
        "accuracy",
        _yes_no_score,
        prompt=SHORT_ANSWER_PROMPT,
        recognize=lambda refs, options, text: bool(refs) and all(r in ("yes", "no") for r in refs),
    )
)
register_task(
    TaskSpec(
        "mc",
        lambda sync, _: MultipleChoiceAccuracy(sync_on_compute=sync),
        "accuracy",
        _choice_score,
        prompt=MULTIPLE_CHOICE_PROMPT,
        recognize=lambda refs, options, text: bool(options) or MULTIPLE_CHOICE_PROMPT in text,
        takes_options=True,
    )
)


class SourceTaskMetrics(nn.Module):
    """Metrics per source and task, per task over all sources, and a score per source and overall.

    Each sample goes to the metric of its task (``None`` or unknown tasks: :func:`infer_task`) for its source and to
    the all-source metric of that task; its :func:`sample_score` goes to its source's :class:`ScoreMean` and the
    all-source one. :meth:`compute` returns a flat dict:

    * ``"<source>/<task>/<name>"`` for every value of the task's metric (``count`` included),
    * ``"<source>/score"``: mean sample score of the source; ``"<source>/count"``: its samples,
    * ``"overall/<task>/<name>"``: the task's metric over all sources,
    * ``"overall/score"``: mean of the source scores (each source weighs the same); ``"overall/sample_score"``: mean
      over all samples; ``"overall/count"``.

    Only metrics that received samples (on any rank) appear. Under DDP, every rank must hold the same metrics in the
    same order for the synchronization: pass all ``sources`` up front (sources added later are created on the fly,
    which is only safe in a single process).

    Args:
        sources: Source names known in advance.
        tasks: Tasks to prepare metrics for (``None``: every registered task).
        sync: Synchronize across ranks in :meth:`compute` (``False`` when only one process scores, e.g. rank 0
            reading a merged predictions file).
        vqa_leave_one_out: Score short answers with the official VQAv2 leave-one-out average (for data with the
            10 annotator answers per question).
    """

    def __init__(
        self,
        sources: Iterable[str] = (),
        tasks: Iterable[str] | None = None,
        sync: bool = True,
        vqa_leave_one_out: bool = False,
    ) -> None:
        super().__init__()
        self.sync = sync
        self.vqa_leave_one_out = vqa_leave_one_out
        self.tasks = tuple(tasks) if tasks is not None else task_names()
        self.sources: list[str] = []
        self.task_metrics = nn.ModuleDict()
        self.score_metrics = nn.ModuleDict()
        self._add_source("__overall__")
        for source in sources:
            self._add_source(source)

    @staticmethod
    def _key(source: str) -> str:
        return source.replace(".", "_")

    def _add_source(self, source: str) -> None:
        key = self._key(source)
        if key in self.score_metrics:
            return
        if source != "__overall__":
            if torch.distributed.is_available() and torch.distributed.is_initialized() and self.sources:
                warnings.warn(
                    f"source {source!r} was not declared up front: metrics may fail to synchronize across ranks",
                    stacklevel=3,
                )
            self.sources.append(source)
        device = self.score_metrics["__overall__"].device if "__overall__" in self.score_metrics else None
        score = ScoreMean(sync_on_compute=self.sync)
        self.score_metrics[key] = score.to(device) if device is not None else score
        for task in self.tasks:
            metric = make_task_metric(task, sync_on_compute=self.sync, leave_one_out=self.vqa_leave_one_out)
            self.task_metrics[f"{key}__{task}"] = metric.to(device) if device is not None else metric

    def update(
        self,
        sources: Sequence[str],
        tasks: Sequence[str | None],
        predictions: Sequence[str],
        answers: Sequence[Refs],
        options: Sequence[Sequence[str] | None] | None = None,
    ) -> list[float]:
        """Adds a batch of samples.

        Args:
            sources: Source of each sample.
            tasks: Task of each sample (``None`` to infer it).
            predictions: Generated answers.
            answers: Reference answers of each sample.
            options: Option texts of each multiple-choice sample (or ``None``).

        Returns:
            The per-sample scores, in input order.
        """
        count = len(predictions)
        if not (len(sources) == len(tasks) == len(answers) == count):
            raise ValueError("sources, tasks, predictions and answers must have the same length")
        option_lists = list(options) if options is not None else [None] * count
        groups: dict[tuple[str, str], list[int]] = {}
        resolved = []
        for i in range(count):
            task = tasks[i] if tasks[i] in self.tasks else infer_task(answers[i], option_lists[i])
            if task not in self.tasks:
                raise ValueError(f"task {task!r} has no metric here (tasks: {self.tasks})")
            resolved.append(task)
            groups.setdefault((sources[i], task), []).append(i)
        scores = [
            sample_score(
                resolved[i], predictions[i], answers[i], option_lists[i], vqa_leave_one_out=self.vqa_leave_one_out
            )
            for i in range(count)
        ]
        for (source, task), index in groups.items():
            self._add_source(source)
            preds = [predictions[i] for i in index]
            refs = [answers[i] for i in index]
            opts = [option_lists[i] for i in index]
            with_options = (opts,) if task_spec(task).takes_options else ()
            for key in (self._key(source), "__overall__"):
                self.task_metrics[f"{key}__{task}"].update(preds, refs, *with_options)
                self.score_metrics[key].update([scores[i] for i in index])
        return scores

    def compute(self) -> dict[str, float]:
        """The flat metric dict described in the class docstring (synchronized across ranks)."""
        results: dict[str, float] = {}
        source_scores = []
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*compute.*before.*update.*")
            for source in ["__overall__", *self.sources]:
                key = self._key(source)
                name = "overall" if source == "__overall__" else source
                for task in self.tasks:
                    values = self.task_metrics[f"{key}__{task}"].compute()
                    if values["count"] > 0:
                        results.update({f"{name}/{task}/{k}": float(v) for k, v in values.items()})
                score = self.score_metrics[key].compute()
                if score["count"] > 0:
                    if source == "__overall__":
                        results["overall/sample_score"] = score["score"]
                        results["overall/count"] = score["count"]
                    else:
                        results[f"{name}/score"] = score["score"]
                        results[f"{name}/count"] = score["count"]
                        source_scores.append(score["score"])
        if source_scores:
            results["overall/score"] = sum(source_scores) / len(source_scores)
        return results

    def reset(self) -> None:
        """Clears every metric (the sources stay)."""
        for metric in [*self.task_metrics.values(), *self.score_metrics.values()]:
            metric.reset()
