"""The paper's benchmark scorers against their official evaluators' rules, written out here from the sources:

* ChartQA: pix2struct ``metrics.relaxed_correctness`` (called by UReader/DocOwl with stripped texts, max over
  references);
* DocVQA: ANLS as the DUE evaluator (UReader) computes it, ``textdistance``'s normalized similarity with a recursive
  Levenshtein distance written here;
* PathVQA: LLaVA-Med ``run_eval.py`` with ``eval_metrics/glossary.py: normalize_word`` and
  ``evaluate_metrics.py: calculate_f1score / calculate_exactmatch``;
* Tiny LVLM-eHub: Multi-Modality-Arena ``tiny_lvlm_evaluation/utils/tools.py: VQAEval.evaluate`` with ``has_word``.

Also: the task registry sits above metrics and prompts (import graph read with ``ast``), the Tiny LVLM-eHub prompt
and decoding, and the paper's tasks end to end through ``SourceTaskMetrics``, ``score_jsonl`` and the callback.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import json
import random
import re
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import mole_lightning.eval as eval_package
from mole_lightning.eval import (
    ANLS,
    LVLM_EHUB_PREFIX,
    GenerationEvalCallback,
    LlavaMedClosed,
    LlavaMedOpen,
    RelaxedAccuracy,
    SourceTaskMetrics,
    WordMatchAccuracy,
    anls_score,
    apply_eval_prompt,
    levenshtein,
    llava_med_closed,
    llava_med_open_scores,
    relaxed_accuracy,
    relaxed_correctness,
    sample_score,
    score_jsonl,
    task_generation_kwargs,
    task_spec,
    word_match,
)
from mole_lightning.models import tiny_tokenizer
from tests.eval.conftest import ConstantAnswerModel

# Means of N per-sample values in [0, 1] summed in float64 in another order: rounding stays below N * 2^-52.
MEAN_TOL = 1e-12


# ============================================================================ reference: pix2struct / UReader
def ref_relaxed_correctness(target: str, prediction: str, max_relative_change: float = 0.05) -> bool:
    def _to_float(text):
        try:
            if text.endswith("%"):
                return float(text.rstrip("%")) / 100.0
            else:
                return float(text)
        except ValueError:
            return None

    prediction_float = _to_float(prediction)
    target_float = _to_float(target)
    if prediction_float is not None and target_float:
        relative_change = abs(prediction_float - target_float) / abs(target_float)
        return relative_change <= max_relative_change
    else:
        return prediction.lower() == target.lower()


def ref_chartqa(prediction: str, targets: list[str]) -> float:
    return float(max([ref_relaxed_correctness(t.strip(), prediction.strip()) for t in targets] or [False]))


# =================================================================================== reference: ANLS (DUE)
@functools.cache
def ref_levenshtein(a: str, b: str) -> int:
    if not a:
        return len(b)
    if not b:
        return len(a)
    return min(
        ref_levenshtein(a[1:], b) + 1, ref_levenshtein(a, b[1:]) + 1, ref_levenshtein(a[1:], b[1:]) + (a[0] != b[0])
    )


def ref_anls(prediction: str, targets: list[str], threshold: float = 0.5) -> float:
    def similarity(a: str, b: str) -> float:  # textdistance.levenshtein.normalized_similarity
        a, b = " ".join(a.strip().lower().split()), " ".join(b.strip().lower().split())
        longest = max(len(a), len(b))
        return 1.0 if longest == 0 else 1.0 - ref_levenshtein(a, b) / longest

    if not targets:
        return 0.0
    best = max(similarity(prediction, t) for t in targets)
    if 1 - threshold >= best:
        best = 0.0
    return best


# ======================================================== reference: VQA normalization (LLaVA-Med, Tiny eHub)
REF_CONTRACTIONS = {"dont": "don't", "isnt": "isn't", "cant": "can't", "whats": "what's"}  # those the cases use
REF_MANUAL_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                  "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}  # fmt: skip
REF_ARTICLES = ["a", "an", "the"]
REF_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
REF_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
REF_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
             "!"]  # fmt: skip


def ref_process_punctuation(in_text: str) -> str:
    out_text = in_text
    for p in REF_PUNCT:
        if (p + " " in in_text or " " + p in in_text) or (re.search(REF_COMMA_STRIP, in_text) is not None):
            out_text = out_text.replace(p, "")
        else:
            out_text = out_text.replace(p, " ")
    out_text = REF_PERIOD_STRIP.sub("", out_text, re.UNICODE)
    return out_text


def ref_process_digit_article(in_text: str) -> str:
    out_text = []
    for word in in_text.lower().split():
        word = REF_MANUAL_MAP.get(word, word)
        if word not in REF_ARTICLES:
            out_text.append(word)
    for word_id, word in enumerate(out_text):
        if word in REF_CONTRACTIONS:
            out_text[word_id] = REF_CONTRACTIONS[word]
    return " ".join(out_text)


# ========================================================================== reference: Tiny LVLM-eHub VQAEval
def ref_has_word(sentence: str, word: str) -> bool:
    pattern = r"\b" + re.escape(word) + r"\b"
    return re.search(pattern, sentence) is not None


def ref_tiny_evaluate(answer: str, gt_answers) -> int:
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    answer = ref_process_digit_article(ref_process_punctuation(answer))
    for gt in gt_answers if isinstance(gt_answers, list) else [gt_answers]:
        gt = gt.replace("\n", " ").replace("\t", " ").strip()
        gt = ref_process_digit_article(ref_process_punctuation(gt))
        if ref_has_word(answer, gt):
            return 1
    return 0


# ================================================================================= reference: LLaVA-Med
def ref_normalize_word(token: str) -> str:
    return ref_process_digit_article(ref_process_punctuation(token)).replace(",", "")


def ref_split_sentence(sentence: str) -> dict[str, int]:
    words: dict[str, int] = defaultdict(int)
    for word in sentence.lower().strip().split():
        words[word] += 1
    return words


def ref_calculate_exactmatch(candidate: str, reference: str) -> float:
    candidate_words = ref_split_sentence(ref_normalize_word(candidate))
    reference_words = ref_split_sentence(ref_normalize_word(reference))
    count = sum(1 for word in reference_words if word in candidate_words)
    total = sum(candidate_words.values())
    return 0 if total == 0 else count / total


def ref_calculate_f1score(candidate: str, reference: str) -> tuple[float, float, float]:
    candidate_words = ref_split_sentence(ref_normalize_word(candidate))
    reference_words = ref_split_sentence(ref_normalize_word(reference))
    tp = fp = fn = 0
    for word in set(candidate_words) | set(reference_words):
        if word in candidate_words and word in reference_words:
            tp += candidate_words[word]
        elif word in candidate_words and word not in reference_words:
            fp += candidate_words[word]
        elif word not in candidate_words and word in reference_words:
            fn += reference_words[word]
    if len(candidate_words) == 0 or len(reference_words) == 0:
        return 0, 0, 0
    precision = tp / (tp + fp)
    recall = tp / (tp + fn)
    if tp == 0:
        return 0, 0, 0
    return 2 * precision * recall / (precision + recall), precision, recall


def ref_run_eval(items: list[tuple[str, str, str]]) -> dict[str, float]:
    """``run_eval.py: evaluate`` over ``(ground truth, prediction, answer_type)``: the released closed rule, the
    all-samples containment rule (``gt_value in pred_value`` with every sample appended), and the open values."""
    released, closed, opened = [], [], defaultdict(list)
    for gt, pred, answer_type in items:
        gt_value = ref_normalize_word(gt.lower())
        pred_value = ref_normalize_word(pred.lower())
        if answer_type == "OPEN":
            opened["exact_match"].append(ref_calculate_exactmatch(pred_value, gt_value))
            f1, precision, recall = ref_calculate_f1score(pred_value, gt_value)
            opened["f1"].append(f1)
            opened["precision"].append(precision)
            opened["recall"].append(recall)
            opened["contains"].append(1 if gt_value in pred_value else 0)
        elif answer_type == "CLOSED":
            if "yes" in pred_value or "no" in pred_value:
                if gt_value in pred_value:
                    released.append(1)
            else:
                released.append(0)
            closed.append(1 if gt_value in pred_value else 0)
    out = {name: sum(values) / len(values) for name, values in opened.items()}
    if closed:
        out["accuracy"] = sum(closed) / len(closed)
        out["released_accuracy"] = sum(released) / len(released) if released else float("nan")
    return out


# ==================================================================================================== cases
CHART_REFERENCES = ["45", "0.45", "45%", "1,000", "1000", "3.5 kg", "3.5", "0", "0.0", "", "Yes", " 12 ", "-4",
                    "1e3", "100", "2019"]  # fmt: skip
CHART_PREDICTIONS = ["45", "44", "47.25", "47.3", "42.75", "42.7", "45%", "44%", "0.45", "1,000", "1000", "1050",
                     "1051", "950", "949", "3.5 kg", "3.5", "3.5kg", "0", "0.0", "", "YES", "yes ", "12", "-4.1",
                     "-4.3", "1000.0", "nan", "inf", "95", "105", "105.1", "2020", "The answer is 45"]  # fmt: skip

DOC_REFERENCES = ["Smith", "John Smith", "1,000", "", "  New   York ", "abc", "abcd", "$ 12.50", "12/05/1998"]
DOC_PREDICTIONS = ["smith", "SMITH ", "Smyth", "J. Smith", "John  Smith", "", "1000", "new york", "NEW YORK CITY",
                   "ab", "abxy", "xyzw", "abcde", "$12.50", "12/5/1998", "1,000."]  # fmt: skip

CLOSED_REFERENCES = ["yes", "no", "Yes", "No."]
CLOSED_PREDICTIONS = ["yes", "Yes, it is.", "no", "No", "not sure", "There is no tumor.", "yes and no", "",
                      "The answer is positive", "nodular", "YES!", "eyes", "It is not."]  # fmt: skip
OPEN_REFERENCES = ["tumor cells", "adenocarcinoma", "the liver", "two nuclei", "1,000 cells", "Kupffer cells",
                   "squamous-cell carcinoma", "dont know"]  # fmt: skip
OPEN_PREDICTIONS = ["tumor", "Tumor cells are seen.", "cells cells tumor", "", "adenocarcinoma of the colon",
                    "liver", "2 nuclei", "1000 cells", "kupffer-cells", "none", "Squamous cell carcinoma.",
                    "don't know", "I dont know", "The Liver!"]  # fmt: skip

TINY_REFERENCES = ["yes", "no", "cat", "two", "red car", "3", "New York", "a dog", "3.5", "T-shirt"]
TINY_PREDICTIONS = ["Yes, it is.", "yesterday", "The cat sat.", "category", "There are two.", "2", "A red car.",
                    "red", "3.5", "35", "new york city", "dog", "It is not.", "", "no\nmaybe", "t shirt",
                    "a T-shirt."]  # fmt: skip


def _multi(references: list[str]) -> list[list[str]]:
    """Single references, pairs, and an empty reference list."""
    return [[r] for r in references] + [references[i : i + 2] for i in range(0, len(references) - 1, 2)] + [[]]


# ============================================================================================ ChartQA tests
def test_relaxed_accuracy_follows_pix2struct_on_numbers_percentages_units_and_text():
    cases = [(p, refs) for p in CHART_PREDICTIONS for refs in _multi(CHART_REFERENCES)]
    for prediction, refs in cases:
        assert relaxed_accuracy(prediction, refs) == ref_chartqa(prediction, refs), (prediction, refs)
    metric = RelaxedAccuracy()
    metric.update([p for p, _ in cases], [r for _, r in cases])
    values = metric.compute()
    expected = sum(ref_chartqa(p, r) for p, r in cases) / len(cases)
    assert values["relaxed_accuracy"] == pytest.approx(expected, abs=MEAN_TOL) and values["count"] == len(cases)


def test_relaxed_accuracy_documented_consequences():
    # a trailing % divides by 100: "45%" is 0.45, not 45
    assert relaxed_correctness("45%", "0.45") and not relaxed_correctness("45%", "45")
    # 5 % of the reference, inclusive: 45 * 1.05 = 47.25
    assert relaxed_correctness("47.25", "45") and not relaxed_correctness("47.3", "45")
    # thousands separators and units are strings; a zero reference is a string too
    assert not relaxed_correctness("1,000", "1000") and relaxed_correctness("1,000", "1,000")
    assert not relaxed_correctness("3.5 kg", "3.5") and not relaxed_correctness("0.0", "0")
    assert relaxed_correctness("", "") and not relaxed_correctness("", "45") and relaxed_accuracy("45", []) == 0.0


# ============================================================================================= DocVQA tests
def test_levenshtein_hand_computed_and_against_the_recursive_definition():
    assert levenshtein("kitten", "sitting") == 3  # k->s, e->i, +g
    assert levenshtein("flaw", "lawn") == 2  # -f, +n
    assert levenshtein("", "abc") == levenshtein("abc", "") == 3 and levenshtein("same", "same") == 0
    rng = random.Random(0)
    for _ in range(300):
        a = "".join(rng.choice("ab c") for _ in range(rng.randrange(9)))
        b = "".join(rng.choice("ab c") for _ in range(rng.randrange(9)))
        assert levenshtein(a, b) == ref_levenshtein(a, b), (a, b)


def test_anls_follows_the_due_evaluator_with_threshold_edge_cases():
    rng = random.Random(1)
    random_pairs = [
        ("".join(rng.choice("ab ") for _ in range(rng.randrange(7))), ["".join(rng.choice("abA") for _ in range(4))])
        for _ in range(200)
    ]
    cases = [(p, refs) for p in DOC_PREDICTIONS for refs in _multi(DOC_REFERENCES)] + random_pairs
    for prediction, refs in cases:
        assert anls_score(prediction, refs) == ref_anls(prediction, refs), (prediction, refs)
    metric = ANLS()
    metric.update([p for p, _ in cases], [r for _, r in cases])
    expected = sum(ref_anls(p, r) for p, r in cases) / len(cases)
    assert metric.compute()["anls"] == pytest.approx(expected, abs=MEAN_TOL)
    # NL = 2/4 is at the threshold: 0; NL = 1/4: 0.75; case and whitespace do not count; both empty: 1
    assert anls_score("abxy", ["abcd"]) == 0.0 and anls_score("abxd", ["abcd"]) == 0.75
    assert anls_score(" JOHN   smith ", ["John Smith"]) == 1.0 and anls_score("", [""]) == 1.0
    assert anls_score("", ["abc"]) == 0.0 and anls_score("smith", ["Smyth", "Smith"]) == 1.0


# ============================================================================================ PathVQA tests
def test_llava_med_closed_and_open_follow_run_eval():
    closed = [(g, p, "CLOSED") for g in CLOSED_REFERENCES for p in CLOSED_PREDICTIONS]
    opened = [(g, p, "OPEN") for g in OPEN_REFERENCES for p in OPEN_PREDICTIONS]
    expected = ref_run_eval(closed + opened)

    closed_metric = LlavaMedClosed()
    closed_metric.update([p for _, p, _ in closed], [[g] for g, _, _ in closed])
    got = closed_metric.compute()
    assert got["accuracy"] == pytest.approx(expected["accuracy"], abs=MEAN_TOL)
    assert got["released_accuracy"] == pytest.approx(expected["released_accuracy"], abs=MEAN_TOL)
    assert got["released_accuracy"] > got["accuracy"]  # the released script drops wrong yes/no answers
    for gt, pred, _ in closed:
        ref = ref_normalize_word(gt.lower()) in ref_normalize_word(pred.lower())
        assert llava_med_closed(pred, [gt])[0] == ref, (gt, pred)

    open_metric = LlavaMedOpen()
    open_metric.update([p for _, p, _ in opened], [[g] for g, _, _ in opened])
    got = open_metric.compute()
    for name in ("recall", "precision", "f1", "exact_match", "contains"):
        assert got[name] == pytest.approx(expected[name], abs=MEAN_TOL), name
    for gt, pred, _ in opened:
        g, p = ref_normalize_word(gt.lower()), ref_normalize_word(pred.lower())
        f1, precision, recall = ref_calculate_f1score(p, g)
        scores = llava_med_open_scores(pred, gt)
        assert (scores["f1"], scores["precision"], scores["recall"]) == (f1, precision, recall), (gt, pred)
        assert scores["exact_match"] == ref_calculate_exactmatch(p, g)


def test_llava_med_open_recall_counts_repeated_prediction_words_as_the_original():
    # tp counts the prediction's occurrences of shared words: "cells cells tumor" vs "tumor cells" -> tp 3, fn 0
    scores = llava_med_open_scores("cells cells tumor", "tumor cells")
    assert scores["recall"] == 1.0 and scores["precision"] == 1.0
    # "2 nuclei" vs "two nuclei": number words become digits on both sides
    assert llava_med_open_scores("2 nuclei", "two nuclei")["exact_match"] == 1.0


# ===================================================================================== Tiny LVLM-eHub tests
def test_lvlm_ehub_word_match_follows_vqa_eval_has_word():
    cases = [(p, refs) for p in TINY_PREDICTIONS for refs in _multi(TINY_REFERENCES)]
    for prediction, refs in cases:
        assert word_match(prediction, refs) == bool(ref_tiny_evaluate(prediction, list(refs))), (prediction, refs)
    metric = WordMatchAccuracy()
    metric.update([p for p, _ in cases], [r for _, r in cases])
    expected = sum(ref_tiny_evaluate(p, list(r)) for p, r in cases) / len(cases)
    assert metric.compute()["accuracy"] == pytest.approx(expected, abs=MEAN_TOL)
    assert word_match("Yes, there is.", ["yes"]) and not word_match("yesterday", ["yes"])


def test_lvlm_ehub_prompt_and_decoding():
    prompt = apply_eval_prompt("What is in the image?", "lvlm_ehub")
    assert prompt == "Analyze the image and provide brief and accurate answer to the question in Engligh. " + (
        "What is in the image?"
    )
    assert apply_eval_prompt(prompt, "lvlm_ehub") == prompt  # not prefixed twice
    assert LVLM_EHUB_PREFIX.endswith("in Engligh. ")
    generation = task_generation_kwargs(["lvlm_ehub", "lvlm_ehub", None])
    assert generation == {"do_sample": False, "num_beams": 1, "repetition_penalty": 10.0, "max_new_tokens": 256}
    assert task_generation_kwargs(["vqa", None, "unknown"]) == {}
    with pytest.raises(ValueError, match="different generation options"):
        task_generation_kwargs(["lvlm_ehub", "vqa"])
    # ChartQA / DocVQA get LLaVA-1.5's short-answer suffix, PathVQA questions stay as they are
    assert apply_eval_prompt("Value?", "relaxed").endswith("\nAnswer the question using a single word or phrase.")
    assert apply_eval_prompt("Is it benign? ", "pathvqa_closed") == "Is it benign?"


def test_question_records_of_the_paper_tasks_carry_their_prompts():
    from mole_lightning.eval import question_records

    questions = [
        {"question_id": 1, "image": "a.png", "text": "<image>\nWhat is shown?", "answer": "a cat", "task": "lvlm_ehub"},
        {"question_id": 2, "image": "b.png", "text": "Highest value?", "answer": "45", "task": "relaxed"},
        {"question_id": 3, "image": "c.png", "text": "Is this benign?", "answer": "no", "task": "pathvqa_closed"},
    ]
    records = list(question_records(questions, source="bench"))
    assert [r["task"] for r in records] == ["lvlm_ehub", "relaxed", "pathvqa_closed"]
    prompts = [r["conversations"][0]["value"] for r in records]
    assert prompts[0] == f"<image>\n{LVLM_EHUB_PREFIX}What is shown?"
    assert prompts[1] == "<image>\nHighest value?\nAnswer the question using a single word or phrase."
    assert prompts[2] == "<image>\nIs this benign?"


def test_callback_decodes_each_task_with_its_protocol():
    tokenizer = tiny_tokenizer()

    class RecordingModel(ConstantAnswerModel):
        def __init__(self, *args):
            super().__init__(*args)
            self.calls = []

        def generate(self, pixel_values, input_ids, attention_mask=None, **kwargs):
            self.calls.append(kwargs)
            return super().generate(pixel_values, input_ids, attention_mask, **kwargs)

    def batch(task: str, answer: str) -> dict:
        ids = torch.tensor([[1, 50, 60]])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": None, "has_image": None,
                "answers": [[answer]], "task": [task], "question": ["q"], "id": ["0"]}  # fmt: skip

    loaders = {"ehub": [batch("lvlm_ehub", "cat")], "general": [batch("vqa", "cat")]}
    model = RecordingModel(tokenizer, "a cat")
    trainer = SimpleNamespace(
        world_size=1,
        datamodule=SimpleNamespace(generation_dataloaders=lambda: loaders),
        precision_plugin=SimpleNamespace(predict_step_context=contextlib.nullcontext),
    )
    callback = GenerationEvalCallback(
        max_new_tokens=7, log_routing=False, generation_kwargs={"repetition_penalty": 1.5}
    )
    results = callback.evaluate(trainer, SimpleNamespace(model=model, device=torch.device("cpu")))
    ehub, general = model.calls
    assert (ehub["repetition_penalty"], ehub["max_new_tokens"], ehub["do_sample"]) == (10.0, 256, False)
    assert (general["repetition_penalty"], general["max_new_tokens"]) == (1.5, 7)
    assert results["ehub/lvlm_ehub/accuracy"] == 1.0  # "a cat" contains "cat" as a word


# ========================================================================== end to end and registry layering
def test_paper_tasks_through_source_task_metrics_and_score_jsonl(tmp_path):
    rows = [
        ("chartqa", "relaxed", "47", ["45"]),
        ("chartqa", "relaxed", "45%", ["45"]),
        ("chartqa", "relaxed", "Yes", ["yes"]),
        ("docvqa", "anls", "Jon Smith", ["John Smith", "J. Smith"]),
        ("docvqa", "anls", "", ["1,000"]),
        ("pathvqa", "pathvqa_closed", "No, it is not.", ["no"]),
        ("pathvqa", "pathvqa_closed", "Yes.", ["no"]),
        ("pathvqa", "pathvqa_open", "Tumor cells are seen.", ["tumor cells"]),
        ("pathvqa", "pathvqa_open", "liver", ["the liver"]),
        ("perception", "lvlm_ehub", "There is a red car.", ["red car"]),
        ("perception", "lvlm_ehub", "blue", ["red"]),
    ]
    path = tmp_path / "predictions.jsonl"
    with path.open("w") as handle:
        for i, (source, task, prediction, answers) in enumerate(rows):
            record = {"id": str(i), "source": source, "task": task, "question": "q", "answer": answers[0],
                      "answers": answers, "prediction": prediction}  # fmt: skip
            handle.write(json.dumps(record) + "\n")
    results = score_jsonl(str(path))

    def reference_score(task: str, prediction: str, answers: list[str]) -> float:
        if task == "relaxed":
            return ref_chartqa(prediction, answers)
        if task == "anls":
            return ref_anls(prediction, answers)
        if task == "pathvqa_closed":
            return float(ref_run_eval([(answers[0], prediction, "CLOSED")])["accuracy"])
        if task == "pathvqa_open":
            return ref_run_eval([(answers[0], prediction, "OPEN")])["recall"]
        return float(ref_tiny_evaluate(prediction, answers))

    per_source = defaultdict(list)
    for source, task, prediction, answers in rows:
        score = reference_score(task, prediction, answers)
        assert sample_score(task, prediction, answers) == pytest.approx(score, abs=MEAN_TOL)
        per_source[source].append(score)
    for source, scores in per_source.items():
        assert results[f"{source}/score"] == pytest.approx(sum(scores) / len(scores), abs=MEAN_TOL), source
    assert results["chartqa/relaxed/relaxed_accuracy"] == pytest.approx(2 / 3)  # 47 within 5 % of 45; "45%" is not
    assert results["pathvqa/pathvqa_closed/count"] == 2 and results["pathvqa/pathvqa_open/count"] == 2
    means = [sum(s) / len(s) for s in per_source.values()]
    assert results["overall/score"] == pytest.approx(sum(means) / len(means), abs=MEAN_TOL)

    metrics = SourceTaskMetrics(sources=list(per_source), sync=False)
    metrics.update([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows])
    assert metrics.compute() == pytest.approx(results, nan_ok=True)
    assert task_spec("pathvqa_open").primary == "recall" and task_spec("anls").primary == "anls"


def _eval_imports() -> dict[str, set[str]]:
    """``module -> eval modules it imports`` for every module of ``mole_lightning.eval`` (lazy imports included);
    ``"__init__"`` stands for importing the package itself."""
    folder = Path(eval_package.__file__).parent
    graph = {}
    for path in folder.glob("*.py"):
        if path.stem == "__init__":
            continue
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mole_lightning.eval"):
                rest = node.module[len("mole_lightning.eval") :].lstrip(".")
                if rest:
                    found.add(rest.split(".")[0])
                else:  # from mole_lightning.eval import x: a submodule, or a name of the package
                    found |= {a.name if (folder / f"{a.name}.py").exists() else "__init__" for a in node.names}
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("mole_lightning.eval."):
                        found.add(alias.name.split(".")[2])
        graph[path.stem] = found - {path.stem}
    return graph


def test_task_registry_sits_above_metrics_and_prompts_without_cycles():
    graph = _eval_imports()
    assert {"metrics", "prompts", "paper_metrics"} <= graph["tasks"]
    for low in ("metrics", "prompts", "paper_metrics", "normalize"):
        assert not graph[low] & {"tasks", "callback", "writer", "questions", "__init__"}, (low, graph[low])
    assert "prompts" not in graph["metrics"] and "metrics" not in graph["prompts"]
    assert all("__init__" not in imports for imports in graph.values())

    def cycle_from(node: str, path: tuple[str, ...]) -> tuple[str, ...] | None:
        for nxt in sorted(graph.get(node, ())):
            if nxt in path:
                return (*path, nxt)
            found = cycle_from(nxt, (*path, nxt))
            if found:
                return found
        return None

    cycles = [c for c in (cycle_from(m, (m,)) for m in graph) if c]
    assert not cycles, cycles
