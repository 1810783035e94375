"""At initialisation the adapted real model is the pretrained model: ``apply_mole`` on SmolLM2-135M-Instruct leaves
its logits equal to transformers' (LoRA B and expert B start at zero), and a LLaVA-MoLE built from the folder gives,
on text-only questions, exactly the greedy answers of transformers' own ``generate`` on the base model."""

from __future__ import annotations

import copy

import pytest
import torch
import yaml

from mole_lightning.inference import instantiate_recipe, precision_plugin, ready
from mole_lightning.peft import MoLEConfig, apply_mole, routing_mask
from tests.real.recipes import write_recipe

pytestmark = pytest.mark.real

QUESTIONS = [
    "What is the capital of France?",
    "Name three colours of the rainbow.",
    "How many legs does a spider have?",
]


@pytest.fixture(scope="module")
def base(smollm2_folder):
    """transformers' SmolLM2 in eval mode, float32, and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_folder, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(smollm2_folder)


def chat_batch(tokenizer, questions):
    """Left-padded ChatML generation prompts, rendered by the tokenizer's own template."""
    tokenizer.padding_side = "left"
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in questions
    ]
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


@pytest.mark.parametrize(
    "mole",
    [
        MoLEConfig(num_experts=3, rank=8, alpha=16.0, dropout=0.0, gate="prob"),
        MoLEConfig(num_experts=3, rank=8, alpha=16.0, dropout=0.0, gate="soft"),
        MoLEConfig(num_experts=1, rank=8, alpha=16.0, dropout=0.0),
    ],
    ids=["prob", "soft", "lora"],
)
def test_apply_mole_leaves_the_logits_of_the_pretrained_model(base, mole):
    model, tokenizer = base
    adapted = apply_mole(copy.deepcopy(model), mole).eval()
    batch = chat_batch(tokenizer, QUESTIONS)
    with torch.no_grad():
        expected = model(**batch).logits
        with routing_mask(adapted, batch["attention_mask"]):
            actual = adapted(**batch).logits
    # every adapter adds an exact zero (B = 0) to the frozen layer's own output: the same float operations
    torch.testing.assert_close(actual, expected, atol=0, rtol=0)
    assert adapted.get_output_embeddings().weight is adapted.get_input_embeddings().weight  # still tied


def test_text_answers_at_init_equal_the_base_models_greedy_answers(smollm2_folder, base, tmp_path):
    from mole_lightning.data import make_demo_data

    model, tokenizer = base
    demo = make_demo_data(str(tmp_path / "demo"), train=2, val=1, seed=0, maxcount=2)  # the recipe needs shards
    recipe = yaml.safe_load(write_recipe(tmp_path / "recipe.yaml", smollm2_folder, demo, tmp_path).read_text())
    module, datamodule = instantiate_recipe(recipe)  # what mole-train and mole-chat build from the recipe
    module.configure_model()
    device = torch.device("cpu")
    ours = ready(module.model, datamodule.make_encoder("generate"), precision_plugin("32-true", device), device)
    assert ours.model.mole_config.num_experts == 3

    encoded = ours.encode([([{"from": "human", "value": q}], None) for q in QUESTIONS])
    reference = chat_batch(tokenizer, QUESTIONS)
    assert torch.equal(encoded["input_ids"], reference["input_ids"])  # the same ChatML prompt, token for token
    greedy = dict(max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    with torch.no_grad():
        generated = model.generate(**reference, **greedy)[:, reference["input_ids"].shape[1] :]
    expected = [text.strip() for text in tokenizer.batch_decode(generated, skip_special_tokens=True)]
    assert all(expected)
    assert ours.generate(encoded, max_new_tokens=24) == expected
