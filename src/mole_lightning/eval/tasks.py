"""The eval task registry: which metric, primary value, sample score, prompt and decoding each ``task`` gets, and
the metrics kept per source and task (:class:`SourceTaskMetrics`).

Built-in tasks (:data:`TASK_SPECS`; a new one is one :func:`register_task` call):

===================  ===============================  ====================================  ======================
task                 benchmarks                       metric: primary value                 lmms-eval task instead
===================  ===============================  ====================================  ======================
``vqa``              VQAv2, GQA, TextVQA              ``ShortAnswerAccuracy``:              ``vqav2_val``, ``gqa``,
                                                      ``vqa_accuracy``                      ``textvqa_val``
``mc``               MMBench, ScienceQA, SEED         ``MultipleChoiceAccuracy``:           ``mmbench_en_dev``,
                                                      ``accuracy``                          ``scienceqa_img``
``yesno``            POPE, MME                        ``YesNoMetrics``: ``accuracy``        ``pope``, ``mme``
``open``             free-form answers                ``OpenEndedF1``: ``f1``               --
``relaxed``          ChartQA                          ``RelaxedAccuracy``:                  ``chartqa``
                                                      ``relaxed_accuracy``                  (``relaxed_overall``)
``anls``             DocVQA, InfographicVQA           ``ANLS``: ``anls``                    ``docvqa_val`` (``anls``)
``pathvqa_closed``   PathVQA yes/no (LLaVA-Med)       ``LlavaMedClosed``: ``accuracy``      none
``pathvqa_open``     PathVQA open (LLaVA-Med)         ``LlavaMedOpen``: ``recall``          none
``lvlm_ehub``        Tiny LVLM-eHub                   ``WordMatchAccuracy``: ``accuracy``   none
===================  ===============================  ====================================  ======================

The paper's tasks (the last five, :mod:`mole_lightning.eval.paper_metrics`) are never inferred: give samples their
``task``. ``relaxed`` and ``anls`` are asked with LLaVA-1.5's short-answer suffix (as LLaVA-1.5 and lmms-eval ask
ChartQA and DocVQA); PathVQA questions as they are (LLaVA-Med's ``model_vqa.py``); ``lvlm_ehub`` with the Tiny
LVLM-eHub prefix of LLaVA-MoLE's tester and its decoding (greedy, ``repetition_penalty=10``, 256 new tokens,
:attr:`TaskSpec.generation`), which :class:`~mole_lightning.eval.GenerationEvalCallback` applies per batch.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torchmetrics import Metric

from mole_lightning.eval.metrics import (
    MultipleChoiceAccuracy,
    OpenEndedF1,
    Refs,
    ScoreMean,
    ShortAnswerAccuracy,
    YesNoMetrics,
    _as_list,
    open_ended_scores,
    short_answer_scores,
)
from mole_lightning.eval.normalize import (
    extract_choice,
    normalize_answer,
    pope_yes_no,
    reference_choice,
    reference_yes_no,
)
from mole_lightning.eval.paper_metrics import (
    ANLS,
    LlavaMedClosed,
    LlavaMedOpen,
    RelaxedAccuracy,
    WordMatchAccuracy,
    anls_score,
    llava_med_closed,
    llava_med_open,
    relaxed_accuracy,
    word_match,
)
from mole_lightning.eval.prompts import LVLM_EHUB_PREFIX, MULTIPLE_CHOICE_PROMPT, SHORT_ANSWER_PROMPT, compose_prompt

LVLM_EHUB_GENERATION: dict[str, Any] = {
    "do_sample": False,
    "num_beams": 1,
    "repetition_penalty": 10.0,
    "max_new_tokens": 256,
}
"""Tiny LVLM-eHub decoding of LLaVA-MoLE's tester (``llava_mole_infer.py``): greedy, repetition penalty 10, 256 new
tokens."""


@dataclass(frozen=True)
class TaskSpec:
    """An eval task: everything the package needs to score it, in one place (the built-in tasks, and the lmms-eval
    task to run instead of each, are in the table of :mod:`mole_lightning.eval.tasks`).

    Attributes:
        name: The ``task`` value of samples (``"vqa"``...).
        metric: ``metric(sync_on_compute, leave_one_out) -> Metric`` whose ``update(preds, refs[, options])``
            takes a batch and whose ``compute()`` returns a dict with ``primary`` and ``count``.
        primary: The metric value used as the sample score and in the per-source score.
        score: ``score(prediction, references, options, leave_one_out) -> float``, one sample's primary value.
        prompt: LLaVA-1.5's instruction appended to the question (``None``: the question as it is).
        question_prefix: Text put before the question (``None``: none), e.g. Tiny LVLM-eHub's instruction.
        generation: Hugging Face ``generate`` options of the task's protocol (``max_new_tokens``,
            ``repetition_penalty``...), applied over the evaluation's own options for batches of this task
            (:func:`task_generation_kwargs`); empty: the evaluation's options.
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
    question_prefix: str | None = None
    generation: Mapping[str, Any] = field(default_factory=dict)


TASK_SPECS: dict[str, TaskSpec] = {}
"""The task registry, in inference order (built-ins: ``mc``, ``yesno``, ``vqa``, the paper's tasks, ``open``); add
one with :func:`register_task`."""


def register_task(spec: TaskSpec) -> TaskSpec:
    """Register (or replace) an eval task; it is then scored by the callback, the writer and ``score_jsonl``,
    prompted by :func:`apply_eval_prompt` and inferred by :func:`infer_task`, where a
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
        "lvlm_ehub",
        lambda sync, _: WordMatchAccuracy(sync_on_compute=sync),
        "accuracy",
        lambda prediction, refs, options, _: float(word_match(prediction, refs)),
        question_prefix=LVLM_EHUB_PREFIX,
        generation=LVLM_EHUB_GENERATION,
    )
)
register_task(
    TaskSpec(
        "pathvqa_open",
        lambda sync, _: LlavaMedOpen(sync_on_compute=sync),
        "recall",
        lambda prediction, refs, options, _: llava_med_open(prediction, refs)["recall"],
    )
)
register_task(
    TaskSpec(
        "pathvqa_closed",
        lambda sync, _: LlavaMedClosed(sync_on_compute=sync),
        "accuracy",
        lambda prediction, refs, options, _: float(llava_med_closed(prediction, refs)[0]),
    )
)
register_task(
    TaskSpec(
        "anls",
        lambda sync, _: ANLS(sync_on_compute=sync),
        "anls",
        lambda prediction, refs, options, _: anls_score(prediction, refs),
        prompt=SHORT_ANSWER_PROMPT,
    )
)
register_task(
    TaskSpec(
        "relaxed",
        lambda sync, _: RelaxedAccuracy(sync_on_compute=sync),
        "relaxed_accuracy",
        lambda prediction, refs, options, _: relaxed_accuracy(prediction, refs),
        prompt=SHORT_ANSWER_PROMPT,
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


def apply_eval_prompt(
    question: str, task: str | None, options: Sequence[str] | None = None, *, unanswerable: bool = False
) -> str:
    """The question as ``task`` asks it: its :attr:`TaskSpec.question_prefix`, option lines (multiple choice) and
    :attr:`TaskSpec.prompt` suffix (:func:`~mole_lightning.eval.prompts.compose_prompt`).

    Args:
        question: Question text (without the ``<image>`` placeholder).
        task: A registered task (``vqa``, ``yesno``, ``mc``, ``open``, ``lvlm_ehub``...) or ``None`` (unchanged).
        options: Option texts of a multiple-choice question; added as lettered lines unless already there.
        unanswerable: Add VizWiz's "respond with 'Unanswerable'" instruction (short-answer tasks).

    Returns:
        The prompt text, e.g. ``"What color is it?\\nAnswer the question using a single word or phrase."``.

    Raises:
        ValueError: For an unknown task.
    """
    if task is None:
        return compose_prompt(question)
    spec = task_spec(task)
    return compose_prompt(
        question,
        suffix=spec.prompt,
        prefix=spec.question_prefix,
        options=options if spec.takes_options else None,
        unanswerable=unanswerable,
    )


def task_generation_kwargs(tasks: Iterable[str | None]) -> dict[str, Any]:
    """The ``generate`` options that the tasks of one batch ask for (:attr:`TaskSpec.generation`; ``None`` and
    unregistered tasks ask for none).

    Raises:
        ValueError: Two tasks of the batch ask for different options (one ``generate`` call cannot follow both).
    """
    chosen: tuple[str, dict[str, Any]] | None = None
    for task in dict.fromkeys(t for t in tasks if t is not None and t in TASK_SPECS):
        generation = dict(TASK_SPECS[task].generation)
        if chosen is None:
            chosen = (task, generation)
        elif generation != chosen[1]:
            raise ValueError(
                f"tasks {chosen[0]!r} and {task!r} in one batch ask for different generation options "
                f"({chosen[1]} vs {generation}): keep them in separate sources"
            )
    return dict(chosen[1]) if chosen is not None else {}


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
