"""Evaluation: answer normalization, benchmark metrics, LLaVA-1.5 eval prompts, a generation-eval callback, a JSONL
prediction writer, a converter for LLaVA-1.5 question files, and routing analysis.

Public API:

* :class:`ShortAnswerAccuracy`, :class:`MultipleChoiceAccuracy`, :class:`YesNoMetrics`, :class:`OpenEndedF1` --
  ``torchmetrics`` metrics per task type (``vqa``, ``mc``, ``yesno``, ``open``; ``eval.metrics``).
* :class:`RelaxedAccuracy` (ChartQA), :class:`ANLS` (DocVQA), :class:`LlavaMedClosed` / :class:`LlavaMedOpen`
  (PathVQA), :class:`WordMatchAccuracy` (Tiny LVLM-eHub) -- the paper's benchmark scorers (``eval.paper_metrics``).
* :class:`TaskSpec` / :func:`register_task` -- the task registry (metric, primary value, sample score, prompt,
  decoding, inference from a record); :class:`SourceTaskMetrics` keeps the metrics per source and task
  (``eval.tasks``).
* :func:`normalize_answer`, :func:`pope_yes_no`, :func:`extract_choice` -- answer processing.
* :func:`apply_eval_prompt` -- the question as a task asks it (LLaVA-1.5 suffix, Tiny LVLM-eHub prefix).
* :class:`GenerationEvalCallback` -- greedy generation on validation samples per source, logged metrics.
* :class:`JsonlPredictionWriter` -- ``trainer.predict`` outputs as JSONL.
* :func:`convert_question_file` -- LLaVA-1.5 question JSONL → webdataset shards.
* :class:`RoutingAccumulator`, :class:`RoutingCounts`, :func:`mutual_information` -- routing analysis.
"""

from mole_lightning.eval.callback import GenerationEvalCallback, examples_table, metric_table
from mole_lightning.eval.metrics import (
    MultipleChoiceAccuracy,
    OpenEndedF1,
    ScoreMean,
    ShortAnswerAccuracy,
    YesNoMetrics,
    open_ended_scores,
    short_answer_scores,
    token_f1,
)
from mole_lightning.eval.normalize import extract_choice, llava_med_normalize, normalize_answer, pope_yes_no
from mole_lightning.eval.paper_metrics import (
    ANLS,
    LlavaMedClosed,
    LlavaMedOpen,
    RelaxedAccuracy,
    WordMatchAccuracy,
    anls_score,
    levenshtein,
    llava_med_closed,
    llava_med_open,
    llava_med_open_scores,
    relaxed_accuracy,
    relaxed_correctness,
    word_match,
)
from mole_lightning.eval.prompts import LVLM_EHUB_PREFIX, MULTIPLE_CHOICE_PROMPT, SHORT_ANSWER_PROMPT
from mole_lightning.eval.questions import convert_question_file, question_records
from mole_lightning.eval.routing_analysis import (
    RoutingAccumulator,
    RoutingCounts,
    log_routing_to_tensorboard,
    mutual_information,
    plot_routing_heatmaps,
)
from mole_lightning.eval.tasks import (
    TASK_SPECS,
    SourceTaskMetrics,
    TaskSpec,
    apply_eval_prompt,
    infer_task,
    make_task_metric,
    register_task,
    sample_score,
    task_generation_kwargs,
    task_names,
    task_spec,
)
from mole_lightning.eval.writer import JsonlPredictionWriter, score_jsonl
from mole_lightning.generation import generate_answers  # re-exported: its home is mole_lightning.generation

__all__ = [
    "ANLS",
    "LVLM_EHUB_PREFIX",
    "LlavaMedClosed",
    "LlavaMedOpen",
    "RelaxedAccuracy",
    "WordMatchAccuracy",
    "anls_score",
    "levenshtein",
    "llava_med_closed",
    "llava_med_normalize",
    "llava_med_open",
    "llava_med_open_scores",
    "make_task_metric",
    "relaxed_accuracy",
    "relaxed_correctness",
    "task_generation_kwargs",
    "word_match",
    "MULTIPLE_CHOICE_PROMPT",
    "SHORT_ANSWER_PROMPT",
    "TASK_SPECS",
    "TaskSpec",
    "GenerationEvalCallback",
    "JsonlPredictionWriter",
    "MultipleChoiceAccuracy",
    "OpenEndedF1",
    "RoutingAccumulator",
    "RoutingCounts",
    "ScoreMean",
    "ShortAnswerAccuracy",
    "SourceTaskMetrics",
    "YesNoMetrics",
    "apply_eval_prompt",
    "convert_question_file",
    "examples_table",
    "extract_choice",
    "generate_answers",
    "infer_task",
    "register_task",
    "task_names",
    "task_spec",
    "log_routing_to_tensorboard",
    "metric_table",
    "mutual_information",
    "normalize_answer",
    "open_ended_scores",
    "plot_routing_heatmaps",
    "pope_yes_no",
    "question_records",
    "sample_score",
    "score_jsonl",
    "short_answer_scores",
    "token_f1",
]
