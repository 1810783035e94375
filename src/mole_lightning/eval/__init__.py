"""Evaluation: answer normalization, benchmark metrics, LLaVA-1.5 eval prompts, a generation-eval callback, a JSONL
prediction writer, a converter for LLaVA-1.5 question files, and routing analysis.

Public API:

* :class:`ShortAnswerAccuracy`, :class:`MultipleChoiceAccuracy`, :class:`YesNoMetrics`, :class:`OpenEndedF1` --
  ``torchmetrics`` metrics per task type (``vqa``, ``mc``, ``yesno``, ``open``); :class:`SourceTaskMetrics` keeps
  them per source and task; :class:`TaskSpec` / :func:`register_task` -- the task registry (metric, primary value,
  sample score, prompt suffix, inference from a record).
* :func:`normalize_answer`, :func:`pope_yes_no`, :func:`extract_choice` -- answer processing.
* :func:`apply_eval_prompt` -- LLaVA-1.5 prompt suffix by task.
* :class:`GenerationEvalCallback` -- greedy generation on validation samples per source, logged metrics.
* :class:`JsonlPredictionWriter` -- ``trainer.predict`` outputs as JSONL.
* :func:`convert_question_file` -- LLaVA-1.5 question JSONL → webdataset shards.
* :class:`RoutingAccumulator`, :class:`RoutingCounts`, :func:`mutual_information` -- routing analysis.
"""

from mole_lightning.eval.callback import GenerationEvalCallback, examples_table, generate_answers, metric_table
from mole_lightning.eval.metrics import (
    TASK_SPECS,
    MultipleChoiceAccuracy,
    OpenEndedF1,
    ScoreMean,
    ShortAnswerAccuracy,
    SourceTaskMetrics,
    TaskSpec,
    YesNoMetrics,
    infer_task,
    open_ended_scores,
    register_task,
    sample_score,
    short_answer_scores,
    task_names,
    task_spec,
    token_f1,
)
from mole_lightning.eval.normalize import extract_choice, normalize_answer, pope_yes_no
from mole_lightning.eval.prompts import MULTIPLE_CHOICE_PROMPT, SHORT_ANSWER_PROMPT, apply_eval_prompt
from mole_lightning.eval.questions import convert_question_file, question_records
from mole_lightning.eval.routing_analysis import (
    RoutingAccumulator,
    RoutingCounts,
    log_routing_to_tensorboard,
    mutual_information,
    plot_routing_heatmaps,
)
from mole_lightning.eval.writer import JsonlPredictionWriter, score_jsonl

__all__ = [
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
