"""lmms-eval's own evaluator (its CLI) runs ``mole_llava`` on a local task; its score equals our metric's on the same
predictions, and the predictions equal ours. Needs lmms-eval (``make test-lmms``); skipped without it."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("lmms_eval")

from mole_lightning.data.pipeline import SkipCounter, read_shard  # noqa: E402
from mole_lightning.eval import ShortAnswerAccuracy  # noqa: E402
from mole_lightning.inference import load_from_config  # noqa: E402
from mole_lightning.integrations.lmms_eval import cut_at_stops  # noqa: E402
from tests.conftest import tiny_checkpoint, write_recipe  # noqa: E402

TASK_DIR = Path(__file__).parent / "lmms_task"
TASK = "mole_demo_vqa"


def demo_questions(demo, out: Path) -> list[dict]:
    """Single-question samples with an image from the demo validation shards, images saved as RGB PNG files."""
    records = []
    for source, spec in demo.val.items():
        taken = 0
        for raw in read_shard(spec, source, SkipCounter()):
            turns = json.loads(raw["json"])["conversations"]
            data = raw.get("jpg") or raw.get("png")
            if len(turns) != 2 or data is None or taken == 2:
                continue
            path = out / f"{source}-{taken}.png"
            with Image.open(io.BytesIO(data)) as image:
                image.convert("RGB").save(path)
            records.append({"question": turns[0]["value"].replace("<image>", "").strip(), "image": str(path)})
            taken += 1
    return records


def test_lmms_eval_cli_scores_like_our_metric(demo, tmp_path):
    recipe = write_recipe(tmp_path / "recipe.yaml", demo)
    checkpoint = tmp_path / "last.ckpt"
    tiny_checkpoint(checkpoint, demo.tokenizer)
    records = demo_questions(demo, tmp_path)
    assert len(records) >= 4

    # our predictions; half the samples get their prediction as reference (with other case and a period), half not
    assistant = load_from_config(recipe, checkpoint=checkpoint, device="cpu")
    for index, record in enumerate(records):
        image = Path(record["image"]).read_bytes()
        batch = assistant.encode([([{"from": "human", "value": record["question"]}], image)])
        record["ours"] = cut_at_stops(assistant.generate(batch, max_new_tokens=10)[0], ["\n\n"])
        record["answers"] = [record["ours"].upper() + "." if index % 2 == 0 else "zebra"]
    with open(tmp_path / f"{TASK}.jsonl", "w") as handle:
        for record in records:
            handle.write(json.dumps({k: record[k] for k in ("question", "image", "answers")}) + "\n")

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    command = [sys.executable, "-m", "lmms_eval", "--model", "mole_llava"]
    command += ["--model_args", f"config={recipe},checkpoint={checkpoint},device=cpu"]
    command += ["--tasks", TASK, "--include_path", str(TASK_DIR), "--batch_size", "3"]
    command += ["--output_path", str(tmp_path / "out"), "--log_samples"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    written = list((tmp_path / "out").rglob("*results.json"))  # lmms-eval logs evaluation errors and exits with 0
    assert written, done.stderr[-3000:]

    results = json.loads(written[0].read_text())
    score = results["results"][TASK]["exact_match,none"]
    logged = [json.loads(line) for line in next((tmp_path / "out").rglob(f"*samples_{TASK}.jsonl")).open()]
    logged.sort(key=lambda sample: sample["doc_id"])
    responses = [sample["filtered_resps"] for sample in logged]  # one answer per doc, or a list of one
    predictions = [r if isinstance(r, str) else r[0] for r in responses]
    assert predictions == [record["ours"] for record in records]

    metric = ShortAnswerAccuracy()
    metric.update(predictions, [record["answers"] for record in records])
    assert score == pytest.approx(metric.compute()["exact_match"])
    assert 0 < score < 1
