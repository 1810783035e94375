"""Evaluation prompt texts and their layout (which task gets which text is the task registry's:
:func:`~mole_lightning.eval.tasks.apply_eval_prompt`).

LLaVA-1.5 (``docs/Evaluation.md``, ``model_vqa_loader.py``, ``model_vqa_mmbench.py``) asks benchmark questions as
``<image>\\n`` + question + a task suffix:

* short answer (VQAv2, GQA, TextVQA, POPE, MME, PathVQA closed, ...): ``"Answer the question using a single word or
  phrase."`` -- tasks ``vqa`` and ``yesno``;
* multiple choice (MMBench, SEED, ScienceQA): the options as ``"A. ...\\nB. ..."`` lines, then ``"Answer with the
  option's letter from the given choices directly."`` -- task ``mc``;
* open-ended questions (``open``) are asked as they are.

Tiny LVLM-eHub (task ``lvlm_ehub``) puts :data:`LVLM_EHUB_PREFIX` before the question instead. Prefixes, suffixes and
option lines already present in the question are not added twice.
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

LVLM_EHUB_PREFIX = "Analyze the image and provide brief and accurate answer to the question in Engligh. "
"""The instruction LLaVA-MoLE's Tiny LVLM-eHub tester puts before every question (``llava_mole_infer.py``; the
spelling "Engligh" is the source's and is kept, since the prompt is part of the benchmark protocol)."""

OPTION_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def format_options(options: Sequence[str]) -> str:
    """``"A. first\\nB. second..."`` (MMBench / ScienceQA option layout of LLaVA-1.5)."""
    if len(options) > len(OPTION_LETTERS):
        raise ValueError(f"at most {len(OPTION_LETTERS)} options, got {len(options)}")
    return "\n".join(f"{letter}. {option}" for letter, option in zip(OPTION_LETTERS, options))


def _has_options(question: str, options: Sequence[str]) -> bool:
    lines = {line.strip() for line in question.splitlines()}
    return all(f"{letter}. {option}".strip() in lines for letter, option in zip(OPTION_LETTERS, options))


def compose_prompt(
    question: str,
    *,
    suffix: str | None = None,
    prefix: str | None = None,
    options: Sequence[str] | None = None,
    unanswerable: bool = False,
) -> str:
    """``prefix`` + question (+ option lines) + ``"\\n"`` + ``suffix``, each part added only when not already there.

    The task registry (:func:`~mole_lightning.eval.tasks.apply_eval_prompt`) chooses the parts of a task; this
    function only lays them out.

    Args:
        question: Question text (without the ``<image>`` placeholder); trailing whitespace is dropped.
        suffix: Instruction on its own last line (``None``: none).
        prefix: Text put before the question (``None``: none), e.g. Tiny LVLM-eHub's instruction.
        options: Option texts of a multiple-choice question, added as ``"A. ..."`` lines unless already there.
        unanswerable: Put VizWiz's :data:`UNANSWERABLE_PROMPT` on its own line before :data:`SHORT_ANSWER_PROMPT`.

    Returns:
        The prompt text, e.g. ``"What color is it?\\nAnswer the question using a single word or phrase."``.
    """
    text = question.rstrip()
    if options and not _has_options(text, options):
        text = f"{text}\n{format_options(options)}"
    if prefix and not text.startswith(prefix):
        text = f"{prefix}{text}"
    if suffix is None or text.endswith(suffix):
        return text
    if unanswerable and suffix == SHORT_ANSWER_PROMPT and UNANSWERABLE_PROMPT not in text:
        suffix = f"{UNANSWERABLE_PROMPT}\n{suffix}"
    return f"{text}\n{suffix}"
