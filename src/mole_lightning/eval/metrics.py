"""Benchmark metrics for generated answers, as ``torchmetrics`` Metrics (their sums are synchronized across ranks).

The generic metrics, one per task type of the data (``task`` field of a sample); the paper's benchmark scorers are
in :mod:`mole_lightning.eval.paper_metrics`:

============  ============================  =====================================================================
task          metric                        values (``compute()`` returns a dict of floats)
============  ============================  =====================================================================
``vqa``       :class:`ShortAnswerAccuracy`  ``exact_match``, ``vqa_accuracy`` (VQAv2 soft accuracy), ``count``
``mc``        :class:`MultipleChoiceAccuracy`  ``accuracy``, ``unparsed`` (no letter found), ``count``
``yesno``     :class:`YesNoMetrics`         ``accuracy``, ``precision``, ``recall``, ``f1``, ``yes_ratio``, ``count``
``open``      :class:`OpenEndedF1`          ``f1``, ``precision``, ``recall`` (token level), ``exact_match``, ``count``
============  ============================  =====================================================================

Which task uses which metric, and its primary value (the sample score: ``vqa_accuracy``, ``accuracy``, ``accuracy``
and ``f1`` here), is the task registry's (:mod:`mole_lightning.eval.tasks`), which also keeps the metrics per source
(:class:`~mole_lightning.eval.tasks.SourceTaskMetrics`).

Short answers are compared after :func:`~mole_lightning.eval.normalize.normalize_answer`; yes/no answers use POPE's
mapping; multiple choice extracts the option letter (:func:`~mole_lightning.eval.normalize.extract_choice`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from torchmetrics import Metric

from mole_lightning.eval.normalize import (
    answer_tokens,
    extract_choice,
    normalize_answer,
    pope_yes_no,
    reference_choice,
    reference_yes_no,
)

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
    """Mean of per-sample scores (:func:`~mole_lightning.eval.tasks.sample_score`), summed over ranks.

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
