"""LLaVA-MoLE on real pretrained weights through the installed scripts, as a user runs them: SmolLM2-135M-Instruct
(tied input/output embeddings, ChatML template) plus the tiny CLIP tower, ``mole-train fit`` for 20 steps on the demo
shards, then ``mole-chat`` on its checkpoint and the K = 1 export to peft loaded by transformers + peft."""

from __future__ import annotations

import string
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from mole_lightning.data import make_demo_data
from mole_lightning.inference import load_from_config
from mole_lightning.models.trainable import trainable_names
from tests.real.recipes import MOLE_CHAT, MOLE_TRAIN, ROOT, logged, run, write_recipe

pytestmark = pytest.mark.real

STEPS = 20


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Demo shards (general / doc / med), enough for 20 steps of 2 samples; their own tokenizer is not used."""
    return make_demo_data(str(tmp_path_factory.mktemp("demo")), train=16, val=4, seed=0, maxcount=16)


@pytest.fixture(scope="module")
def trained(smollm2_folder, demo, tmp_path_factory):
    """``mole-train validate`` of the model at init, then ``mole-train fit`` for 20 steps (MoLE K = 3)."""
    workdir = tmp_path_factory.mktemp("mole")
    recipe = write_recipe(workdir / "recipe.yaml", smollm2_folder, demo, workdir, max_steps=STEPS)
    init = run([MOLE_TRAIN, "validate", "--config", recipe, "--trainer.logger.init_args.name", "init"], workdir)
    assert init.returncode == 0, init.stdout[-2000:] + init.stderr[-4000:]
    fit = run([MOLE_TRAIN, "fit", "--config", recipe], workdir)
    assert fit.returncode == 0, fit.stdout[-2000:] + fit.stderr[-4000:]
    return workdir, recipe


def test_fit_lowers_the_validation_loss_and_keeps_the_embeddings_tied(smollm2_folder, trained):
    workdir, recipe = trained
    (before,) = logged(workdir, "val/loss", name="init")  # the model at init is the pretrained model
    (after,) = logged(workdir, "val/loss")
    assert len(logged(workdir, "train/loss")) == STEPS
    assert after < before, (before, after)

    checkpoint = workdir / "ckpt" / "last.ckpt"
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert state["global_step"] == STEPS
    assistant = load_from_config(recipe, checkpoint=checkpoint, device="cpu")  # the model as mole-chat builds it
    model, tokenizer = assistant.model, assistant.tokenizer
    lm = model.language_model

    # the checkpoint holds exactly the trained tensors: no frozen weight (LLM, embeddings, tower)
    expected = {f"model.{name}" for name in trainable_names(model)}
    assert set(state["state_dict"]) == expected
    frozen = {f"model.{name}" for name, p in model.named_parameters() if not p.requires_grad}
    assert not frozen & set(state["state_dict"])
    assert not any("embed_tokens" in k or "lm_head" in k or "vision_tower" in k for k in state["state_dict"])

    # tied embeddings stay tied: one matrix, with the <image> row appended, serves as input and output embedding
    base = load_file(str(smollm2_folder / "model.safetensors"))
    vocabulary = base["model.embed_tokens.weight"].shape[0]
    assert lm.config.tie_word_embeddings and "lm_head.weight" not in base  # what the real checkpoint ships
    embedding, head = lm.get_input_embeddings().weight, lm.get_output_embeddings().weight
    assert head is embedding
    assert model.image_token_id == tokenizer.convert_tokens_to_ids("<image>") == vocabulary  # the added row
    assert embedding.shape[0] == len(tokenizer) == vocabulary + 1
    assert torch.equal(embedding[:vocabulary], base["model.embed_tokens.weight"])  # pretrained rows unchanged
    ids = torch.tensor([[tokenizer.convert_tokens_to_ids("<|im_start|>"), model.image_token_id]])
    with torch.no_grad():
        hidden = lm.model(input_ids=ids).last_hidden_state
        logits = lm(input_ids=ids).logits
    torch.testing.assert_close(logits, hidden @ embedding.T, atol=0, rtol=0)  # the head is the embedding, <image> too


def test_mole_chat_answers_a_text_question_in_english(trained):
    workdir, recipe = trained
    checkpoint = workdir / "ckpt" / "last.ckpt"
    question = "What is the capital of France?"
    chat = run([MOLE_CHAT, "--checkpoint", checkpoint, "--config", recipe, "--question", question,
                "--max-new-tokens", "24", "--device", "cpu"], workdir)  # fmt: skip
    assert chat.returncode == 0, chat.stdout[-2000:] + chat.stderr[-4000:]
    answer = chat.stdout.strip()
    assert answer and set(answer) <= set(string.printable), repr(answer)  # ASCII text
    words = answer.split()
    alphabetic = [w for w in words if w.strip(string.punctuation).isalpha()]
    assert alphabetic and len(alphabetic) >= 0.8 * len(words), repr(answer)  # words, not symbols
    assert "Paris" in answer, repr(answer)  # the pretrained knowledge survives 20 steps of finetuning


def test_plain_lora_export_to_peft_loads_with_equal_logits(smollm2_folder, demo, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from peft import PeftModel

    recipe = write_recipe(tmp_path / "recipe.yaml", smollm2_folder, demo, tmp_path, num_experts=1, max_steps=3)
    fit = run([MOLE_TRAIN, "fit", "--config", recipe], tmp_path)
    assert fit.returncode == 0, fit.stdout[-2000:] + fit.stderr[-4000:]
    checkpoint, out = tmp_path / "ckpt" / "last.ckpt", tmp_path / "peft"
    export = run([Path(sys.executable), ROOT / "tools" / "export_adapter.py", checkpoint, "--out", out, "--to", "peft",
                  "--write-base"], ROOT)  # fmt: skip
    assert export.returncode == 0, export.stdout[-2000:] + export.stderr[-4000:]

    ours = load_from_config(recipe, checkpoint=checkpoint, device="cpu").model
    base = LlavaForConditionalGeneration.from_pretrained(out / "base", dtype=torch.float32)
    theirs = PeftModel.from_pretrained(base, out).eval()
    processor = AutoProcessor.from_pretrained(out / "base")
    image = Image.fromarray((torch.rand(40, 56, 3, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy())
    # llava-hf's content lists through the exported processor give the prompt training rendered (ChatML, <image> first)
    content = [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    trained_on = [{"role": "user", "content": "<image>\nWhat colour is the shape?"}]
    assert prompt == processor.tokenizer.apply_chat_template(trained_on, tokenize=False, add_generation_prompt=True)
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    assert int((inputs["input_ids"] == ours.image_token_id).sum()) == ours.num_image_tokens
    with torch.no_grad():
        expected = theirs(**inputs).logits
        actual = ours(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"]).logits
    torch.testing.assert_close(actual, expected, atol=0, rtol=0)
