"""Hooks of the local ``mole_demo_vqa`` task: lmms-eval's own VQA answer normalization scores the answers."""

from lmms_eval.tasks._task_utils.vqa_eval_metric import EvalAIAnswerProcessor
from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc):
    return doc["question"]


def doc_to_target(doc):
    return doc["answers"][0]


def process_results(doc, results):
    normalize = EvalAIAnswerProcessor()
    prediction = normalize(results[0])
    return {"exact_match": float(any(prediction == normalize(answer) for answer in doc["answers"]))}
