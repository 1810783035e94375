"""The LLaVA-MoLE paper's benchmark scorers, each following its official evaluator, as ``torchmetrics`` Metrics.

===================  =====================  =========================================  ==========================
task                 benchmark              rule of                                    metric (values)
===================  =====================  =========================================  ==========================
``relaxed``          ChartQA                pix2struct ``relaxed_correctness``          :class:`RelaxedAccuracy`
                                            (UReader / DocOwl, lmms-eval ``chartqa``)   (``relaxed_accuracy``)
``anls``             DocVQA                 ANLS, Biten et al. 2019 (DUE evaluator      :class:`ANLS` (``anls``)
                                            of UReader, lmms-eval ``docvqa_val``)
``pathvqa_closed``   PathVQA yes/no         LLaVA-Med ``run_eval.py``, CLOSED branch    :class:`LlavaMedClosed`
                                                                                        (``accuracy``,
                                                                                        ``released_accuracy``)
``pathvqa_open``     PathVQA open           LLaVA-Med ``run_eval.py``, OPEN branch      :class:`LlavaMedOpen`
                                                                                        (``recall``, ...)
``lvlm_ehub``        Tiny LVLM-eHub         Multi-Modality-Arena                        :class:`WordMatchAccuracy`
                                            ``tiny_lvlm_evaluation/utils/tools.py``     (``accuracy``)
===================  =====================  =========================================  ==========================

Every metric's ``compute()`` also returns ``count``. A sample without references scores 0 and is counted. The task
registrations (prompt, decoding, primary value) are in :mod:`mole_lightning.eval.tasks`.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

from mole_lightning.eval.metrics import Refs, _as_list, _SumMetric
from mole_lightning.eval.normalize import llava_med_normalize, normalize_answer

RELAXED_TOLERANCE = 0.05
"""ChartQA's relative tolerance for numeric answers (Methani et al. 2020, pix2struct)."""
ANLS_THRESHOLD = 0.5
"""DocVQA's ANLS threshold τ (Biten et al. 2019)."""


# ------------------------------------------------------------------------------------------- ChartQA: relaxed
def _to_number(text: str) -> float | None:
    """pix2struct's ``_to_float``: ``float(text)``; a trailing ``%`` is stripped and divides by 100."""
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_correctness(prediction: str, reference: str, max_relative_change: float = RELAXED_TOLERANCE) -> bool:
    """ChartQA's relaxed correctness of one prediction against one reference (pix2struct ``metrics.py``, the
    function UReader's and DocOwl's evaluators and lmms-eval's ``chartqa`` call).

    Both texts are stripped of surrounding whitespace. When both parse as numbers (Python ``float``) and the
    reference is not 0, the prediction is correct when ``|pred - ref| / |ref| <= max_relative_change``; otherwise
    the texts must be equal after lower-casing. Consequences of that rule, kept on purpose:

    * ``"%"``: a trailing percent sign divides by 100, so ``"45%"`` matches ``"0.45"`` (and ``"44%"``) but **not**
      ``"45"``; ChartQA references are written without ``%``, so a model that adds it is scored wrong, as in the
      official evaluator;
    * thousands separators and units are not parsed: ``"1,000"`` vs ``"1000"`` and ``"3.5 kg"`` vs ``"3.5"`` are
      compared as strings (wrong), ``"1,000"`` vs ``"1,000"`` is right;
    * a reference ``"0"`` is compared as a string (``"0.0"`` is wrong);
    * an empty prediction is right only for an empty reference.
    """
    pred, ref = prediction.strip(), reference.strip()
    pred_number, ref_number = _to_number(pred), _to_number(ref)
    if pred_number is not None and ref_number:
        return abs(pred_number - ref_number) / abs(ref_number) <= max_relative_change
    return pred.lower() == ref.lower()


def relaxed_accuracy(prediction: str, references: Refs, max_relative_change: float = RELAXED_TOLERANCE) -> float:
    """1.0 when :func:`relaxed_correctness` holds for any reference (max over references), else 0.0."""
    return float(any(relaxed_correctness(prediction, r, max_relative_change) for r in _as_list(references)))


# ------------------------------------------------------------------------------------------------ DocVQA: ANLS
def levenshtein(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions, each cost 1); O(len(a)·len(b)) time."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def _anls_text(text: str) -> str:
    return " ".join(text.lower().split())


def anls_score(prediction: str, references: Refs, threshold: float = ANLS_THRESHOLD) -> float:
    """ANLS of one answer: ``max_refs s(pred, ref)`` with ``s = 1 - NL`` if ``NL < threshold`` else 0, where
    ``NL = levenshtein(pred, ref) / max(len(pred), len(ref))`` (0 when both are empty).

    Texts are lower-cased and their whitespace collapsed (DocVQA: answers are not case-sensitive; the official
    script strips and joins on single spaces). ``NL`` exactly at the threshold scores 0, as in the paper's formula
    and the DUE evaluator UReader uses (the RRC script and lmms-eval keep ``1 - NL = 0.5`` there). An empty
    prediction scores 0 against a non-empty reference and 1 against an empty one; no references: 0.
    """
    pred = _anls_text(prediction)
    best = 0.0
    for reference in _as_list(references):
        ref = _anls_text(reference)
        length = max(len(pred), len(ref))
        distance = levenshtein(pred, ref) / length if length else 0.0
        if distance < threshold:
            best = max(best, 1.0 - distance)
    return best


# ------------------------------------------------------------------------------------------- PathVQA: LLaVA-Med
def llava_med_closed(prediction: str, references: Refs) -> tuple[bool, bool]:
    """LLaVA-Med's closed-question (yes/no) rule, ``run_eval.py``: ``(correct, counted_as_released)``.

    Prediction and reference are lower-cased and normalized (:func:`~mole_lightning.eval.normalize.
    llava_med_normalize`); the prediction is correct when a normalized reference is a substring of it (so
    ``"no"`` is found in ``"not sure"``, as in the original). ``correct`` is what this package's ``accuracy`` counts
    over every sample.

    The released script appends a hit only when the prediction contains ``"yes"`` or ``"no"`` (as substrings); a
    wrong prediction that contains one of them is appended nowhere, so it drops out of the denominator. The second
    value says whether the sample enters that released denominator (``released_accuracy``).
    """
    pred = llava_med_normalize(prediction)
    correct = any(llava_med_normalize(r) in pred for r in _as_list(references))
    mentions = "yes" in pred or "no" in pred
    return correct, (correct and mentions) or not mentions


def _llava_med_counts(text: str) -> Counter[str]:
    # calculate_f1score / calculate_exactmatch normalize again what run_eval.py already normalized
    return Counter(llava_med_normalize(text).split())


def llava_med_open_scores(prediction: str, reference: str) -> dict[str, float]:
    """LLaVA-Med's open-question values of one prediction against one reference (``run_eval.py`` with
    ``eval_metrics/evaluate_metrics.py``), after :func:`~mole_lightning.eval.normalize.llava_med_normalize`:

    * ``recall``, ``precision``, ``f1`` (``calculate_f1score``): with word counts ``c`` (prediction) and ``r``
      (reference), ``tp = Σ_{w in c and r} c[w]``, ``fp = Σ_{w in c only} c[w]``, ``fn = Σ_{w in r only} r[w]``;
      ``precision = tp / (tp + fp)``, ``recall = tp / (tp + fn)`` (a repeated shared word counts as often as the
      prediction repeats it, as in the original); all 0 when either side has no word or ``tp = 0``. The paper
      (after LLaVA-Med) reports ``recall`` for open questions.
    * ``exact_match`` (``calculate_exactmatch``): distinct reference words found in the prediction / number of
      prediction words (0 for an empty prediction).
    * ``contains``: 1 when the normalized reference is a substring of the normalized prediction (the containment
      check of ``run_eval.py``'s commented-out open-question rule, which later LLaVA-Med variants report).

    LLaVA-Med's ``open accuracy`` (the closest of a dataset-wide candidate answer list) needs that list and is not
    computed.
    """
    pred, ref = llava_med_normalize(prediction), llava_med_normalize(reference)
    c, r = _llava_med_counts(pred), _llava_med_counts(ref)
    shown = sum(c.values())
    exact = len(set(r) & set(c)) / shown if shown else 0.0
    tp = sum(n for w, n in c.items() if w in r)
    fp = shown - tp
    fn = sum(n for w, n in r.items() if w not in c)
    precision = recall = f1 = 0.0
    if c and r and tp:
        precision, recall = tp / (tp + fp), tp / (tp + fn)
        f1 = 2 * precision * recall / (precision + recall)
    return {"recall": recall, "precision": precision, "f1": f1, "exact_match": exact, "contains": float(ref in pred)}


def llava_med_open(prediction: str, references: Refs) -> dict[str, float]:
    """:func:`llava_med_open_scores` maximized over the references, each value separately (all 0 without one)."""
    scores = [llava_med_open_scores(prediction, r) for r in _as_list(references)]
    names = ("recall", "precision", "f1", "exact_match", "contains")
    return {name: max((s[name] for s in scores), default=0.0) for name in names}


# ------------------------------------------------------------------------------------------ Tiny LVLM-eHub
def word_match(prediction: str, references: Refs) -> bool:
    """Tiny LVLM-eHub's correctness (Multi-Modality-Arena ``tiny_lvlm_evaluation``: ``VQAEval.evaluate`` with
    ``has_word``), used for all five categories by ``updated_eval_tiny.py``.

    Prediction and references are normalized as in the VQA evaluation
    (:func:`~mole_lightning.eval.normalize.normalize_answer`: lower case, punctuation, number words, articles); the
    prediction is correct when some normalized reference occurs in it as whole words (regular expression
    ``\\b<reference>\\b``), e.g. ``"yes"`` in ``"Yes, there is a dog."`` but not in ``"yesterday"``. An empty
    reference matches any prediction that has a word character (as the original pattern ``\\b\\b`` does).
    """
    answer = normalize_answer(prediction)
    return any(re.search(rf"\b{re.escape(normalize_answer(r))}\b", answer) is not None for r in _as_list(references))


# ------------------------------------------------------------------------------------------------------ metrics
class RelaxedAccuracy(_SumMetric):
    """ChartQA relaxed accuracy: mean of :func:`relaxed_accuracy` (5 % numeric tolerance, else exact match).

    Args:
        max_relative_change: Relative tolerance for numeric answers.
        **kwargs: ``torchmetrics.Metric`` options.
    """

    sums = ("correct",)

    def __init__(self, max_relative_change: float = RELAXED_TOLERANCE, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_relative_change = max_relative_change

    def update(self, preds: Sequence[str], targets: Sequence[Refs]) -> None:
        """Adds a batch of generated answers and their reference lists."""
        correct = sum(relaxed_accuracy(p, r, self.max_relative_change) for p, r in zip(preds, targets, strict=True))
        self._add({"correct": float(correct)}, len(preds))

    def compute(self) -> dict[str, float]:
        """``relaxed_accuracy`` (mean in [0, 1]) and ``count``."""
        return {"relaxed_accuracy": self._mean("correct"), "count": float(self.total)}


class ANLS(_SumMetric):
    """DocVQA average normalized Levenshtein similarity: mean of :func:`anls_score`.

    Args:
        threshold: ANLS threshold τ.
        **kwargs: ``torchmetrics.Metric`` options.
    """

    sums = ("anls",)

    def __init__(self, threshold: float = ANLS_THRESHOLD, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.threshold = threshold

    def update(self, preds: Sequence[str], targets: Sequence[Refs]) -> None:
        """Adds a batch of generated answers and their reference lists."""
        total = sum(anls_score(p, r, self.threshold) for p, r in zip(preds, targets, strict=True))
        self._add({"anls": float(total)}, len(preds))

    def compute(self) -> dict[str, float]:
        """``anls`` (mean in [0, 1]) and ``count``."""
        return {"anls": self._mean("anls"), "count": float(self.total)}


class LlavaMedClosed(_SumMetric):
    """PathVQA closed questions with LLaVA-Med's rule (:func:`llava_med_closed`).

    ``accuracy`` is the fraction of samples whose prediction contains the reference; ``released_accuracy`` divides
    the same hits by the samples the released ``run_eval.py`` keeps (it drops wrong answers that mention yes/no,
    so it can only be higher); NaN when it keeps none.

    Args:
        **kwargs: ``torchmetrics.Metric`` options.
    """

    sums = ("correct", "released_total")

    def update(self, preds: Sequence[str], targets: Sequence[Refs]) -> None:
        """Adds a batch of generated answers and their reference lists."""
        correct = released = 0
        for pred, refs in zip(preds, targets, strict=True):
            hit, kept = llava_med_closed(pred, refs)
            correct, released = correct + hit, released + kept
        self._add({"correct": float(correct), "released_total": float(released)}, len(preds))

    def compute(self) -> dict[str, float]:
        """``accuracy``, ``released_accuracy`` and ``count``."""
        kept = float(self.released_total)
        return {
            "accuracy": self._mean("correct"),
            "released_accuracy": float(self.correct) / kept if kept else float("nan"),
            "count": float(self.total),
        }


class LlavaMedOpen(_SumMetric):
    """PathVQA open questions with LLaVA-Med's values (:func:`llava_med_open`), means over samples.

    Args:
        **kwargs: ``torchmetrics.Metric`` options.
    """

    sums = ("recall", "precision", "f1", "exact_match", "contains")

    def update(self, preds: Sequence[str], targets: Sequence[Refs]) -> None:
        """Adds a batch of generated answers and their reference lists."""
        sums = dict.fromkeys(self.sums, 0.0)
        for pred, refs in zip(preds, targets, strict=True):
            for name, value in llava_med_open(pred, refs).items():
                sums[name] += value
        self._add(sums, len(preds))

    def compute(self) -> dict[str, float]:
        """``recall``, ``precision``, ``f1``, ``exact_match``, ``contains`` and ``count``."""
        return {**{name: self._mean(name) for name in self.sums}, "count": float(self.total)}


class WordMatchAccuracy(_SumMetric):
    """Tiny LVLM-eHub accuracy: fraction of predictions that contain a reference as whole words
    (:func:`word_match`). The benchmark's overall score is the sum of its five category accuracies (×100): score each
    category as its own source.

    Args:
        **kwargs: ``torchmetrics.Metric`` options.
    """

    sums = ("correct",)

    def update(self, preds: Sequence[str], targets: Sequence[Refs]) -> None:
        """Adds a batch of generated answers and their reference lists."""
        correct = sum(word_match(p, r) for p, r in zip(preds, targets, strict=True))
        self._add({"correct": float(correct)}, len(preds))

    def compute(self) -> dict[str, float]:
        """``accuracy`` and ``count``."""
        return {"accuracy": self._mean("correct"), "count": float(self.total)}
