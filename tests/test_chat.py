"""``mole-chat`` against independent references: ``predict_step``'s answers for the same samples, a teacher-forced
forward pass for the routing shown, transformers' own llava-hf generation, and the script's exit codes and console
conversation through a subprocess."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from mole_lightning import chat
from mole_lightning.data.collate import collate
from mole_lightning.data.pipeline import SkipCounter, read_shard
from mole_lightning.data.templates import encode_conversation
from mole_lightning.inference import load_from_config
from mole_lightning.peft import iter_routers
from tests.conftest import MAX_NEW_TOKENS, MOLE, make_datamodule, tiny_checkpoint, write_recipe


@pytest.fixture(scope="module")
def setup(tmp_path_factory, demo):
    """Demo data, a recipe, a checkpoint of a module with fixed random trained tensors, and per-source samples
    (image file, question, ``predict_step`` answer)."""
    root = tmp_path_factory.mktemp("chat")
    recipe = write_recipe(root / "recipe.yaml", demo)
    torch.set_num_threads(1)
    checkpoint = root / "last.ckpt"
    module = tiny_checkpoint(checkpoint, demo.tokenizer)

    data = make_datamodule(demo, module, val_batch_size=1)
    data.setup("predict")
    samples = []
    for name, loader in zip(data.val_source_names, data.predict_dataloader()):
        shard = read_shard(demo.val[name], name, SkipCounter())
        raws = {str(json.loads(raw["json"]).get("id", raw["__key__"])): raw for raw in shard}
        for batch in loader:
            raw = raws[batch["id"][0]]
            turns = json.loads(raw["json"])["conversations"]
            image = next((raw[k] for k in ("jpg", "png") if k in raw), None)
            if len(turns) != 2 or image is None:
                continue  # one question about one image
            with torch.no_grad():
                prediction = module.predict_step(batch, 0)[0]["prediction"]
            path = root / f"{name}.{'png' if 'png' in raw else 'jpg'}"
            path.write_bytes(image)
            samples.append({"image": path, "question": batch["question"][0], "answer": prediction, "batch": batch})
            break
    assert len(samples) == 3, samples
    return {
        "root": root,
        "demo": demo,
        "recipe": recipe,
        "checkpoint": checkpoint,
        "module": module,
        "samples": samples,
    }


def chat_args(setup, *extra: str) -> list[str]:
    return ["--config", str(setup["recipe"]), "--checkpoint", str(setup["checkpoint"]), "--device", "cpu", *extra]


def test_answers_equal_predict_step(setup, capsys):
    assert any(s["answer"] for s in setup["samples"]), "the reference answers are all empty"
    assistant = load_from_config(setup["recipe"], checkpoint=setup["checkpoint"], device="cpu")
    for sample in setup["samples"]:
        image = sample["image"].read_bytes()
        batch = assistant.encode([([{"from": "human", "value": sample["question"]}], image)])
        assert torch.equal(batch["input_ids"], sample["batch"]["input_ids"])  # same prompt as predict
        assert torch.allclose(batch["pixel_values"], sample["batch"]["pixel_values"])
        code = chat.main(
            chat_args(setup, "--image", str(sample["image"]), "--question", sample["question"])
            + ["--max-new-tokens", str(MAX_NEW_TOKENS)]
        )
        assert code == 0
        assert capsys.readouterr().out.strip() == sample["answer"]


def test_routing_shares_equal_router_records(setup, capsys):
    sample = setup["samples"][0]
    module = setup["module"]
    layer = 1
    args = ["--image", str(sample["image"]), "--question", sample["question"], "--show-routing", str(layer)]
    assert chat.main(chat_args(setup, *args, "--max-new-tokens", str(MAX_NEW_TOKENS))) == 0
    streamed, summary = capsys.readouterr().out.strip().rsplit("\n", 1)
    match = re.fullmatch(r"routing (\S+): (\d+) answer tokens,((?: expert\d+ [0-9.]+)+)", summary)
    assert match, summary
    printed = [float(v) for v in re.findall(r"expert\d+ ([0-9.]+)", match.group(3))]

    # reference: the generated ids, then one teacher-forced forward over prompt + answer (no KV cache); the step
    # that generated token t is position prompt_length - 1 + t
    batch = sample["batch"]
    tokenizer = module.model.tokenizer
    with torch.no_grad():
        ids = module.model.generate(
            batch["pixel_values"],
            batch["input_ids"],
            batch["attention_mask"],
            max_new_tokens=MAX_NEW_TOKENS,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        prompt_length = batch["input_ids"].shape[1]
        new = ids[0, prompt_length:]
        module.model(input_ids=ids[:, :-1], pixel_values=batch["pixel_values"])
    name, router = list(iter_routers(module.model.language_model))[layer]
    assert match.group(1).endswith(name)
    experts = router.record.expert.reshape(-1)[prompt_length - 1 :]
    keep = torch.tensor([int(t) not in tokenizer.all_special_ids for t in new])
    counts = torch.bincount(experts[keep], minlength=MOLE["num_experts"]).double()
    assert int(match.group(2)) == int(keep.sum()) > 0
    assert printed == pytest.approx((counts / counts.sum()).tolist(), abs=1e-4)
    assert tokenizer.decode(new, skip_special_tokens=True).strip() == streamed.strip() == sample["answer"]


def test_bad_inputs_exit_2(setup, tmp_path, capsys):
    sample = setup["samples"][0]
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("not an image")
    code = chat.main(chat_args(setup, "--image", str(not_an_image), "--question", "What is it?"))
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cannot read image" in err and "notes.jpg" in err

    other = write_recipe(tmp_path / "two_experts.yaml", setup["demo"], num_experts=2)
    args = ["--config", str(other), "--checkpoint", str(setup["checkpoint"]), "--device", "cpu"]
    code = chat.main(args + ["--image", str(sample["image"]), "--question", "What is it?"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "does not match the config" in err

    code = chat.main(chat_args(setup)[:2] + ["--checkpoint", str(tmp_path / "none.ckpt"), "--question", "Hi"])
    assert code == 2
    assert "checkpoint not found" in capsys.readouterr().err

    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"not a checkpoint")
    code = chat.main(chat_args(setup)[:2] + ["--checkpoint", str(corrupt), "--question", "Hi"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cannot read checkpoint" in err


def chat_command() -> list[str]:
    """The installed ``mole-chat`` next to this interpreter, else the module."""
    script = Path(sys.executable).parent / "mole-chat"
    return [str(script)] if script.exists() else [sys.executable, "-m", "mole_lightning.chat"]


def run_chat(args: list[str], stdin: str = "") -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(chat_command() + args, input=stdin, capture_output=True, text=True, env=env, timeout=300)


def test_script_one_shot_and_missing_image(setup):
    sample = setup["samples"][1]
    args = ["--image", str(sample["image"]), "--question", sample["question"], "--max-new-tokens", str(MAX_NEW_TOKENS)]
    done = run_chat(chat_args(setup, *args))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == sample["answer"]

    done = run_chat(chat_args(setup, "--image", str(setup["root"] / "missing.png"), "--question", "Hi"))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"mole-chat: error: image not found: {setup['root'] / 'missing.png'}"]


def two_turn_reference(setup, question: str, reply: str, follow_up: str, image: bytes) -> str:
    """``predict_step``'s answer to a two-turn conversation, encoded by the data pipeline's generation encoder."""
    module = setup["module"]
    conversation = [
        {"from": "human", "value": "<image>\n" + question},
        {"from": "gpt", "value": reply},
        {"from": "human", "value": follow_up},
    ]
    encoder = make_datamodule(setup["demo"], module).make_encoder("generate")
    example = encoder({"__key__": "0", "json": json.dumps({"conversations": conversation}), "png": image}, "chat")
    batch = collate([example], pad_token_id=module.model.tokenizer.pad_token_id, padding_side="left")
    with torch.no_grad():
        return module.predict_step(batch, 0)[0]["prediction"]


def test_script_conversation(setup):
    """Two turns, /reset, the first question again, /image with a missing file (reported, session goes on)."""
    first = setup["samples"][0]
    follow_up = "What color is it?"
    second = two_turn_reference(setup, first["question"], first["answer"], follow_up, first["image"].read_bytes())
    stdin = f"{first['question']}\n{follow_up}\n/reset\n{first['question']}\n/image nowhere.png\n/quit\nignored\n"
    args = ["--image", str(first["image"]), "--max-new-tokens", str(MAX_NEW_TOKENS)]
    done = run_chat(chat_args(setup, *args), stdin)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n") >= 3  # one line per answer
    expected = "\n".join([first["answer"], second, first["answer"]])
    assert done.stdout.split() == expected.split()  # the three answers, in order ("ignored" after /quit is not)
    assert "image not found: nowhere.png" in done.stderr


def test_llava_hf_folder_matches_transformers(real_folders, tmp_path, capsys):
    """``--llava-hf``: the answer equals transformers' LlavaForConditionalGeneration + LlavaProcessor greedy output."""
    folder = real_folders["llava_hf"]
    image_path = tmp_path / "square.png"
    pixels = torch.Generator().manual_seed(0)
    Image.fromarray(torch.randint(0, 256, (336, 336, 3), generator=pixels, dtype=torch.uint8).numpy()).save(image_path)
    question = "What is in the image?"
    processor = AutoProcessor.from_pretrained(folder)
    hf = LlavaForConditionalGeneration.from_pretrained(folder).eval()
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
        add_generation_prompt=True,
    )
    inputs = processor(images=Image.open(image_path), text=prompt, return_tensors="pt")
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
    expected = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()

    args = ["--llava-hf", str(folder), "--image", str(image_path), "--question", question, "--max-new-tokens", "6"]
    assert chat.main(args + ["--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip() == expected


def test_loglikelihood_equals_training_loss(setup):
    """``Assistant.loglikelihood`` (lmms-eval's loglikelihood) is minus the training loss summed over the reply."""
    module = setup["module"]
    sample = setup["samples"][1]
    reply = "a red circle"
    assistant = load_from_config(setup["recipe"], checkpoint=setup["checkpoint"], device="cpu")
    conversation = [{"from": "human", "value": sample["question"]}, {"from": "gpt", "value": reply}]
    [(log_prob, _)] = assistant.loglikelihood([(conversation, sample["image"].read_bytes())])

    conversation[0]["value"] = "<image>\n" + sample["question"]
    encoded = encode_conversation(
        conversation, module.model.tokenizer, "vicuna_v1", num_image_tokens=module.num_image_tokens
    )
    with torch.no_grad():
        out = module.model(
            input_ids=encoded["input_ids"][None],
            pixel_values=sample["batch"]["pixel_values"],
            labels=encoded["labels"][None],
        )
    targets = int((encoded["labels"][1:] != -100).sum())
    assert targets >= 2
    assert log_prob == pytest.approx(-float(out.loss) * targets, rel=1e-4)


def test_llava_hf_folder_whose_template_cannot_render_exits_2_with_one_line(real_folders, tmp_path):
    """A llava-hf folder shipping a text-only template (``'...' + message['content']``): llava-hf content lists make
    it fail inside Jinja; the installed script says so in one line and exits 2."""
    folder = tmp_path / "text-only-template"
    shutil.copytree(real_folders["llava_hf"], folder)
    (folder / "chat_template.jinja").write_text(
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    done = run_chat(["--llava-hf", str(folder), "--question", "Hi", "--device", "cpu", "--max-new-tokens", "2"])
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.strip().splitlines() if not line.startswith("Loading weights")]  # progress
    assert len(lines) == 1 and lines[0].startswith("mole-chat: error: the chat template of"), done.stderr
    assert "cannot render this conversation (TypeError" in lines[0]


@pytest.mark.parametrize("given", [None, "plain"], ids=["recorded", "argument"])
def test_prompts_follow_the_runs_data_settings_over_the_recipe(setup, given):
    """A checkpoint recording other data settings than the recipe's (``datamodule_hyper_parameters``, as Lightning
    saves them; e.g. a run started with ``--data.template chatml``) is prompted with them; ``template=`` wins over
    both. The prompt equals the one an independent encoder with those settings writes."""
    recorded = {"template": "chatml", "system_prompt": "Answer briefly.", "max_length": 300, "image_aspect": "crop"}
    path = setup["root"] / f"recorded_{given}.ckpt"
    torch.save({**torch.load(setup["checkpoint"], weights_only=True), "datamodule_hyper_parameters": recorded}, path)
    assistant = load_from_config(setup["recipe"], checkpoint=path, device="cpu", template=given)
    expected = {**recorded, "template": given or recorded["template"]}
    reference = make_datamodule(setup["demo"], setup["module"], val_batch_size=1, **expected).make_encoder("generate")
    sample = setup["samples"][0]
    image = sample["image"].read_bytes()
    turns = [{"from": "human", "value": sample["question"]}]
    batch = assistant.encode([(turns, image)])
    expected_sample = reference({"__key__": "0", "json": {"conversations": turns}, "image": image}, source="chat")
    assert batch["input_ids"][0].tolist() == expected_sample["input_ids"].tolist()
    assert torch.equal(batch["pixel_values"][0].cpu(), expected_sample["pixel_values"])
