"""LLaVA-1.5 evaluation prompts, applied by task.

LLaVA-1.5 (``docs/Evaluation.md``, ``model_vqa_loader.py``, ``model_vqa_mmbench.py``) asks benchmark questions as
``<image>\\n`` + question + a task suffix:

* short answer (VQAv2, GQA, TextVQA, POPE, MME, PathVQA closed, ...): ``"Answer the question using a single word or
  phrase."`` -- tasks ``vqa`` and ``yesno``;
* multiple choice (MMBench, SEED, ScienceQA): the options as ``"A. ...\\nB. ..."`` lines, then ``"Answer with the
  option's letter from the given choices directly."`` -- task ``mc``;
* open-ended questions (``open``) are asked as they are.

Suffixes and option lines already present in the question are not added twice.
"""

from __future__ import annotations

from collections.abc import Sequence

SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."
MULTIPLE_CHOICE_PROMPT = "Answer with the option's letter from the given choices directly."
UNANSWERABLE_PROMPT = "When the provided information is insufficient, respond with 'Unanswerable'."
"""VizWiz's extra instruction, on its own line before :data:`SHORT_ANSWER_PROMPT` (pass ``unanswerable=True``).

LLaVA-1.5's VizWiz questions end with ``"\\nWhen the provided information is insufficient, respond with
'Unanswerable'.\\nAnswer the question using a single word or phrase."``.
"""

OPTION_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def format_options(options: Sequence[str]) -> str:
    """``"A. first\\nB. second..."`` (MMBench / ScienceQA option layout of LLaVA-1.5)."""
    if len(options) > len(OPTION_LETTERS):
        raise ValueError(f"at most {len(OPTION_LETTERS)} options, got {len(options)}")
    return "\n".join(f"{letter}. {option}" for letter, option in zip(OPTION_LETTERS, options))


def _has_options(question: str, options: Sequence[str]) -> bool:
    lines = {line.strip() for line in question.splitlines()}
    return all(f"{letter}. {option}".strip() in lines for letter, option in zip(OPTION_LETTERS, options))


def apply_eval_prompt(
    question: str, task: str | None, options: Sequence[str] | None = None, *, unanswerable: bool = False
) -> str:
    """The question as LLaVA-1.5 asks it for ``task``.

    Args:
        question: Question text (without the ``<image>`` placeholder).
        task: A registered task (``vqa``, ``yesno``, ``mc``, ``open``...; its ``TaskSpec.prompt``) or ``None``
            (unchanged).
        options: Option texts of a multiple-choice question; added as lettered lines unless already there.
        unanswerable: Add VizWiz's "respond with 'Unanswerable'" instruction (short-answer tasks).

    Returns:
        The prompt text, e.g. ``"What color is it?\\nAnswer the question using a single word or phrase."``.

    Raises:
        ValueError: For an unknown task.
    """
    from mole_lightning.eval.metrics import task_spec  # the task registry imports this module's prompt strings

    spec = task_spec(task) if task is not None else None
    suffix = spec.prompt if spec is not None else None
    text = question.rstrip()
    if spec is not None and spec.takes_options and options and not _has_options(text, options):
        text = f"{text}\n{format_options(options)}"
    if suffix is None or text.endswith(suffix):
        return text
    if unanswerable and suffix == SHORT_ANSWER_PROMPT and UNANSWERABLE_PROMPT not in text:
        suffix = f"{UNANSWERABLE_PROMPT}\n{suffix}"
    return f"{text}\n{suffix}"
