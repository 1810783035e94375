"""Answer normalization and answer extraction for generated text.

* :func:`normalize_answer` follows the standard VQA evaluation (VQAv2 ``vqaEval.py``, also used by LLaVA-1.5's
  TextVQA/VQAv2 scoring through the EvalAI answer processor): lower case, newlines/tabs to spaces, punctuation
  removed (or turned into a space between letters), periods removed unless part of a number, number words
  ``zero``..``ten`` (and ``none``) to digits, articles ``a``/``an``/``the`` dropped, contractions written without an
  apostrophe restored (``dont`` -> ``don't``), whitespace collapsed.
* :func:`pope_yes_no` is POPE's mapping as in LLaVA-1.5's ``eval_pope.py``: keep the first sentence, drop commas,
  split on spaces; ``no`` when a word is ``No``/``no``/``not``, else ``yes`` (an empty answer therefore counts as
  ``yes``).
* :func:`extract_choice` finds the option letter in a multiple-choice answer (``"A"``, ``"(A)"``, ``"A."``,
  ``"The answer is A"``, ``"Answer: (B)"``, or the text of an option).
* :func:`llava_med_normalize` is LLaVA-Med's variant of :func:`normalize_answer` (PathVQA scoring).
* :func:`answer_tokens` gives the normalized tokens used by the open-ended token F1.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

CONTRACTIONS: dict[str, str] = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "Id've": "I'd've",
    "I'dve": "I'd've",
    "Im": "I'm",
    "Ive": "I've",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "let's": "let's",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "she's": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}
"""Contractions written without their apostrophe, as in the VQA evaluation (applied after lower-casing)."""

NUMBER_WORDS: dict[str, str] = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_PERIOD_STRIP_COUNT = int(re.UNICODE)
"""The VQA evaluation passes ``re.UNICODE`` (32) as ``periodStrip.sub``'s *count*: at most 32 periods are removed.
LLaVA-Med's ``normalize_word`` and Multi-Modality-Arena's ``VQAEval`` copy that call, so the limit is kept."""
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def _process_punctuation(text: str) -> str:
    """VQA punctuation rule: a mark next to a space (or any text with a digit-comma-digit) is deleted, otherwise it
    becomes a space (``"black/white"`` -> ``"black white"``); periods go unless followed by a digit (the first 32)."""
    out = text
    delete = _COMMA_STRIP.search(text) is not None
    for mark in PUNCTUATION:
        if delete or f"{mark} " in text or f" {mark}" in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def _process_digits_articles(text: str) -> str:
    words = []
    for word in text.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word not in ARTICLES:
            words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


def normalize_answer(text: str | None) -> str:
    """Normalizes a short answer as the standard VQA evaluation does.

    Examples: ``"Two dogs."`` -> ``"2 dogs"``, ``"The Red Circle!"`` -> ``"red circle"``, ``"dont know"`` ->
    ``"don't know"``, ``"3.5"`` -> ``"3.5"``, ``"1,000"`` -> ``"1000"``.

    Args:
        text: Generated or reference answer (``None`` counts as empty).

    Returns:
        The normalized answer (possibly empty).
    """
    if not text:
        return ""
    text = text.replace("\n", " ").replace("\t", " ").strip().lower()
    return _process_digits_articles(_process_punctuation(text))


def llava_med_normalize(text: str | None) -> str:
    """LLaVA-Med's answer normalization (``llava/eval/eval_metrics/glossary.py: normalize_word``, applied after
    ``.lower()`` in ``run_eval.py``): the VQA punctuation, number-word, article and contraction rules of
    :func:`normalize_answer`, then every comma removed. Unlike :func:`normalize_answer`, newlines and tabs are not
    turned into spaces before the punctuation rule (they still separate words).

    Example: ``"Yes, it is."`` -> ``"yes it is"``; ``"1,000 cells"`` -> ``"1000 cells"``.
    """
    if not text:
        return ""
    return _process_digits_articles(_process_punctuation(text.lower())).replace(",", "")


def answer_tokens(text: str | None) -> list[str]:
    """Tokens of :func:`normalize_answer` with every remaining punctuation character removed (for token F1)."""
    normalized = normalize_answer(text)
    table = str.maketrans("", "", string.punctuation.replace("'", ""))
    return normalized.translate(table).split()


def pope_yes_no(text: str | None) -> str:
    """POPE's mapping of a free-form answer to ``"yes"``/``"no"`` (LLaVA-1.5 ``eval_pope.py``).

    The first sentence is kept (text before the first ``.``), commas are removed and the text is split on spaces;
    the answer is ``"no"`` when one of the words is ``No``, ``no`` or ``not``, otherwise ``"yes"``. Case matters as in
    the original: ``"NO"`` counts as ``"yes"``. An empty answer is ``"yes"``.

    Args:
        text: Generated answer.

    Returns:
        ``"yes"`` or ``"no"``.
    """
    text = text or ""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if any(w in ("No", "not", "no") for w in words) else "yes"


def reference_yes_no(text: str | None) -> str | None:
    """A yes/no reference label: ``"yes"``/``"no"`` after normalization, else POPE's mapping of the raw text."""
    normalized = normalize_answer(text)
    if normalized in ("yes", "no"):
        return normalized
    if not normalized:
        return None
    return pope_yes_no(text)


LETTERS = string.ascii_uppercase
_SINGLE_LETTER = re.compile(r"^[\s(\[]*([A-Za-z])[\s)\]]*[.:,;)]?\s*$")
_LEADING_LETTER = re.compile(r"^\s*(?:\(([A-Z])\)|\[([A-Z])\]|([A-Z])\s*[.:)\]])")
_ANSWER_IS = re.compile(r"(?i:answer|option|choice)\s*(?i:is)?\s*:?\s*(?i:option\s+)?[(\[]?([A-Z])(?![A-Za-z])")


def extract_choice(text: str | None, options: Sequence[str] | None = None) -> str | None:
    """The option letter chosen in a multiple-choice answer, or ``None`` when none can be found.

    Tried in order: the whole answer is one letter, possibly in parentheses/brackets or followed by ``.``/``:``/``)``
    (``"b"`` counts only when the whole answer is that letter); the answer starts with ``"(A)"``, ``"[A]"``, ``"A."``,
    ``"A:"`` or ``"A)"``; a phrase such as ``"The answer is A"``, ``"Answer: (B)"``, ``"option C"``; finally, with
    ``options``, an answer equal (after :func:`normalize_answer`) to one option's text, or starting with
    ``"<letter>. <option text>"``. ``"A red circle"`` yields no letter (``A`` is an article there) unless it is
    an option's text. Letters beyond the number of ``options`` are rejected.

    Args:
        text: Generated answer.
        options: Option texts in letter order (``options[0]`` is ``A``), if known.

    Returns:
        An upper-case letter, or ``None``.
    """
    if not text:
        return None
    valid = LETTERS[: len(options)] if options else LETTERS

    def check(letter: str | None) -> str | None:
        return letter.upper() if letter and letter.upper() in valid else None

    match = _SINGLE_LETTER.match(text)
    if match and (match.group(1).isupper() or text.strip() == match.group(1)) and check(match.group(1)):
        return check(match.group(1))
    match = _LEADING_LETTER.match(text)
    if match and check(next(g for g in match.groups() if g)):
        return check(next(g for g in match.groups() if g))
    for match in _ANSWER_IS.finditer(text):
        if check(match.group(1)):
            return check(match.group(1))
    if options:
        normalized = normalize_answer(text)
        for letter, option in zip(LETTERS, options):
            if normalized and normalized == normalize_answer(option):
                return letter
    return None


def reference_choice(answer: str, options: Sequence[str] | None = None) -> str | None:
    """The letter of a multiple-choice reference: a letter (``"B"``, ``"(B)"``), or the option whose text it is."""
    letter = extract_choice(answer, options)
    if letter is not None:
        return letter
    if options:
        normalized = normalize_answer(answer)
        for candidate, option in zip(LETTERS, options):
            if normalized == normalize_answer(option):
                return candidate
    return None
