"""Metric values on hand-made predictions and references (expected values worked out by hand)."""

from __future__ import annotations

import math
import random

import pytest

from mole_lightning.eval import (
    MultipleChoiceAccuracy,
    OpenEndedF1,
    ShortAnswerAccuracy,
    SourceTaskMetrics,
    YesNoMetrics,
    extract_choice,
    normalize_answer,
    pope_yes_no,
    short_answer_scores,
    token_f1,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Two dogs.", "2 dogs"),
        ("The Red Circle!", "red circle"),
        ("Yes.", "yes"),
        ("dont know", "don't know"),
        ("1,000", "1000"),
        ("3.5", "3.5"),
        ("black/white", "black white"),
        ("  an\tapple\n", "apple"),
        ("", ""),
        (None, ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes.", "yes"),
        ("yes", "yes"),
        ("No, there is not.", "no"),
        ("There is no dog", "no"),
        ("It is not red. No wait", "no"),
        ("Yes. No.", "yes"),  # only the first sentence counts
        ("NO", "yes"),  # POPE matches No/no/not exactly
        ("", "yes"),
    ],
)
def test_pope_mapping(text, expected):
    assert pope_yes_no(text) == expected


@pytest.mark.parametrize(
    ("text", "options", "expected"),
    [
        ("A", None, "A"),
        ("(B)", None, "B"),
        ("C.", None, "C"),
        ("[D]", None, "D"),
        ("A) square", None, "A"),
        ("The answer is D", None, "D"),
        ("Answer: (B)", None, "B"),
        ("I pick option C.", None, "C"),
        ("b", None, "B"),
        ("a red circle", None, None),
        ("the answer is a red circle", None, None),
        ("", None, None),
        ("square", ["circle", "square", "triangle"], "B"),
        ("D", ["circle", "square", "triangle"], None),
    ],
)
def test_extract_choice(text, options, expected):
    assert extract_choice(text, options) == expected


def test_short_answer_accuracy():
    metric = ShortAnswerAccuracy()
    preds = ["Yes.", "two", "", "a red circle, I think", "navy"]
    refs = [["yes"], ["2", "2", "2", "3"], ["cat"], ["red circle"], ["blue"] * 9 + ["navy"]]
    metric.update(preds, refs)
    out = metric.compute()
    # exact: 1, 1, 0 (empty), 0 (extra words), 1  -> 3/5
    # soft: 1 (1 ref: 1/1), 1 (3 of 4 refs), 0, 0, 1/3 (1 of 10 refs)  -> (7/3)/5
    assert out["exact_match"] == pytest.approx(0.6)
    assert out["vqa_accuracy"] == pytest.approx(7 / 15)
    assert out["count"] == 5

    strict = ShortAnswerAccuracy(scale_to_references=False)
    strict.update(preds, refs)
    # soft without scaling: 1/3, 1, 0, 0, 1/3 -> (5/3)/5
    assert strict.compute()["vqa_accuracy"] == pytest.approx(1 / 3)


def test_short_answer_scores_few_references():
    assert short_answer_scores("cat", ["cat", "dog"]) == (1.0, 0.5)
    assert short_answer_scores("cat", ["cat", "dog"], scale_to_references=False) == (1.0, pytest.approx(1 / 3))
    assert short_answer_scores("The cat.", ["cat", "cat", "cat", "dog"]) == (1.0, 1.0)
    assert short_answer_scores("cat", []) == (0.0, 0.0)


def _official_vqa_accuracy(prediction: str, annotator_answers: list[str]) -> float:
    """Literal transcription of the official VQAv2 loop: for each annotator, min(1, #others equal / 3); mean."""
    accuracies = []
    for i in range(len(annotator_answers)):
        others = annotator_answers[:i] + annotator_answers[i + 1 :]
        accuracies.append(min(1.0, sum(a == prediction for a in others) / 3))
    return sum(accuracies) / len(accuracies)


@pytest.mark.parametrize(("matches", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_leave_one_out_by_hand(matches, expected):
    # 10 annotators, `matches` of them say "cat": the subsets without a matching annotator have matches - 1 hits
    refs = ["cat"] * matches + ["dog"] * (10 - matches)
    _, soft = short_answer_scores("Cat.", refs, leave_one_out=True)
    assert soft == pytest.approx(expected)
    assert short_answer_scores("cat", refs)[1] == pytest.approx(min(matches / 3, 1.0))  # plain formula unchanged


def test_vqa_leave_one_out_matches_official_loop():
    rng = random.Random(0)
    vocab = ["cat", "dog", "2", "red", "yes"]
    for _ in range(200):
        refs = [rng.choice(vocab) for _ in range(10)]
        pred = rng.choice(vocab)
        expected = _official_vqa_accuracy(pred, refs)
        # 10 references: the subsets hold 9 >= 3, so scaling never applies
        assert short_answer_scores(pred, refs, leave_one_out=True)[1] == pytest.approx(expected)
    # a single reference keeps the plain formula; two references divide each subset by its one reference
    assert short_answer_scores("cat", ["cat"], leave_one_out=True) == (1.0, 1.0)
    assert short_answer_scores("cat", ["cat", "dog"], leave_one_out=True)[1] == pytest.approx(0.5)


def test_vqa_leave_one_out_through_metrics():
    preds = ["cat", "dog"]
    refs = [["cat"] * 3 + ["dog"] * 7, ["cat"] * 8 + ["dog"] * 2]  # 0.9 and 0.6 with leave-one-out
    metric = ShortAnswerAccuracy(leave_one_out=True)
    metric.update(preds, refs)
    assert metric.compute()["vqa_accuracy"] == pytest.approx(0.75)
    sources = SourceTaskMetrics(sources=["vqav2"], sync=False, vqa_leave_one_out=True)
    scores = sources.update(["vqav2", "vqav2"], ["vqa", "vqa"], preds, refs)
    assert scores == [pytest.approx(0.9), pytest.approx(0.6)]
    out = sources.compute()
    assert out["vqav2/vqa/vqa_accuracy"] == pytest.approx(0.75)
    assert out["vqav2/score"] == pytest.approx(0.75)
    plain = SourceTaskMetrics(sources=["vqav2"], sync=False)
    assert plain.update(["vqav2", "vqav2"], ["vqa", "vqa"], preds, refs) == [1.0, pytest.approx(2 / 3)]


def test_multiple_choice_accuracy():
    metric = MultipleChoiceAccuracy()
    preds = ["A", "(B)", "C.", "The answer is D", "", "a red circle", "B"]
    refs = ["A", "B", "A", "D", "C", "A", "(B)"]
    metric.update(preds, refs)
    out = metric.compute()
    # right: A, (B), answer is D, B vs (B) -> 4/7; no letter: "" and "a red circle" -> 2/7
    assert out["accuracy"] == pytest.approx(4 / 7)
    assert out["unparsed"] == pytest.approx(2 / 7)

    with_options = MultipleChoiceAccuracy()
    options = ["circle", "square", "triangle"]
    with_options.update(["square", "D", "A"], [["B"], ["C"], ["circle"]], [options, options, options])
    # "square" -> B (right), "D" is not an option (unparsed), reference "circle" is option A (right)
    out = with_options.compute()
    assert out["accuracy"] == pytest.approx(2 / 3)
    assert out["unparsed"] == pytest.approx(1 / 3)


def test_yes_no_metrics():
    metric = YesNoMetrics()
    preds = ["Yes.", "yes", "No, there is not.", "There is a dog.", "", "Not sure.", "no"]
    refs = ["yes", "no", "no", "yes", "no", "no", "Yes"]
    metric.update(preds, [[r] for r in refs])
    out = metric.compute()
    # mapped: yes yes no yes yes yes no ; refs: yes no no yes no no yes
    # TP = 2 (#0, #3), FP = 3 (#1, #4, #5), TN = 1 (#2), FN = 1 (#6)
    assert out["accuracy"] == pytest.approx(3 / 7)
    assert out["precision"] == pytest.approx(2 / 5)
    assert out["recall"] == pytest.approx(2 / 3)
    assert out["f1"] == pytest.approx(0.5)
    assert out["yes_ratio"] == pytest.approx(5 / 7)
    assert out["count"] == 7


def test_yes_no_without_positive_predictions():
    metric = YesNoMetrics()
    metric.update(["no", "no"], ["yes", "no"])
    out = metric.compute()
    assert out["precision"] == 0.0 and out["recall"] == 0.0 and out["f1"] == 0.0
    assert out["accuracy"] == pytest.approx(0.5)
    assert out["yes_ratio"] == 0.0


def test_token_f1():
    assert token_f1("abnormal tissue", "normal tissue") == pytest.approx((0.5, 0.5, 0.5))
    # "the" is dropped: [tissue, is, normal] vs [normal, tissue]: 2 shared tokens
    assert token_f1("The tissue is normal.", "normal tissue") == pytest.approx((2 / 3, 1.0, 0.8))
    assert token_f1("", "normal tissue") == (0.0, 0.0, 0.0)
    assert token_f1("", "") == (1.0, 1.0, 1.0)


def test_open_ended_f1():
    metric = OpenEndedF1()
    preds = ["abnormal tissue", "The tissue is normal.", "", "Normal tissue"]
    refs = [["normal tissue"], ["normal tissue"], ["normal tissue"], ["abnormal tissue", "normal tissue"]]
    metric.update(preds, refs)
    out = metric.compute()
    assert out["f1"] == pytest.approx((0.5 + 0.8 + 0.0 + 1.0) / 4)
    assert out["recall"] == pytest.approx((0.5 + 1.0 + 0.0 + 1.0) / 4)
    assert out["precision"] == pytest.approx((0.5 + 2 / 3 + 0.0 + 1.0) / 4)
    assert out["exact_match"] == pytest.approx(0.25)


def test_empty_metric_is_nan():
    out = ShortAnswerAccuracy().compute()
    assert math.isnan(out["exact_match"]) and out["count"] == 0


def test_source_task_metrics():
    metrics = SourceTaskMetrics(sources=["general", "med", "doc"])
    scores = metrics.update(
        sources=["general", "general", "med", "med", "med", "med"],
        tasks=["vqa", "mc", "yesno", "yesno", "open", None],
        predictions=["Blue.", "(A)", "Yes.", "no", "tissue", "No"],
        answers=[["blue"], ["B"], ["yes"], ["yes"], ["abnormal tissue"], ["no"]],
    )
    # open: [tissue] vs [abnormal, tissue]: P 1, R 1/2, F1 2/3; the task-less sample with reference "no" is yes/no
    assert scores == pytest.approx([1.0, 0.0, 1.0, 0.0, 2 / 3, 1.0])
    out = metrics.compute()
    assert out["general/score"] == pytest.approx(0.5)
    assert out["med/score"] == pytest.approx((1 + 0 + 2 / 3 + 1) / 4)
    assert out["overall/score"] == pytest.approx((0.5 + (8 / 3) / 4) / 2)
    assert out["overall/sample_score"] == pytest.approx((1 + 0 + 1 + 0 + 2 / 3 + 1) / 6)
    assert out["med/yesno/accuracy"] == pytest.approx(2 / 3)
    assert out["med/yesno/count"] == 3
    assert out["overall/yesno/count"] == 3
    assert out["general/mc/accuracy"] == 0.0
    assert out["overall/count"] == 6
    assert not any(key.startswith("doc/") for key in out)  # declared but without samples
    assert "general/yesno/accuracy" not in out

    metrics.reset()
    assert metrics.compute() == {}
