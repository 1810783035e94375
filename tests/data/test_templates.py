"""Conversation templates: rendered text, label masks and truncation, checked against hand-written expectations."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from mole_lightning.constants import IGNORE_INDEX
from mole_lightning.data.templates import (
    CHATML_SYSTEM,
    LLAMA3_SYSTEM,
    VICUNA_V1_SYSTEM,
    BadSampleError,
    encode_conversation,
    encode_prompt,
    image_token_id,
)

N = 4
IMG = "<image>" * N
TWO_TURNS = [
    {"from": "human", "value": "What is in the image?\n<image>"},  # placeholder moved to the front, as LLaVA does
    {"from": "gpt", "value": "a red circle"},
    {"from": "human", "value": "What color is it?"},
    {"from": "gpt", "value": "red"},
]

EXPECTED_TEXT = {
    "vicuna_v1": f"<s>{VICUNA_V1_SYSTEM} USER: {IMG}\nWhat is in the image? ASSISTANT: a red circle</s>"
    "USER: What color is it? ASSISTANT: red</s>",
    "llama3": f"<s><|start_header_id|>system<|end_header_id|>\n\n{LLAMA3_SYSTEM}<|eot_id|>"
    f"<|start_header_id|>user<|end_header_id|>\n\n{IMG}\nWhat is in the image?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\na red circle<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nWhat color is it?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nred<|eot_id|>",
    "chatml": f"<|im_start|>system\n{CHATML_SYSTEM}<|im_end|>\n"
    f"<|im_start|>user\n{IMG}\nWhat is in the image?<|im_end|>\n"
    "<|im_start|>assistant\na red circle<|im_end|>\n<|im_start|>user\nWhat color is it?<|im_end|>\n"
    "<|im_start|>assistant\nred<|im_end|>\n",
    "plain": f"<s>{IMG}a red circle</s>",
}
EXPECTED_LEARNED = {
    "vicuna_v1": ["a red circle</s>", "red</s>"],
    "llama3": ["a red circle<|eot_id|>", "red<|eot_id|>"],
    "chatml": ["a red circle<|im_end|>", "red<|im_end|>"],
    "plain": ["a red circle</s>"],
    "tokenizer": ["a red circle</s>", "red</s>"],  # the demo tokenizer's chat_template is Vicuna v1
}


def learned_runs(tokenizer, encoded: dict[str, torch.Tensor]) -> list[str]:
    """Decodes each maximal run of learned (label != -100) tokens."""
    runs, current = [], []
    for token, label in zip(encoded["input_ids"].tolist(), encoded["labels"].tolist()):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run).strip() for run in runs]


@pytest.mark.parametrize("template", ["vicuna_v1", "llama3", "chatml", "plain", "tokenizer"])
def test_learned_tokens_are_exactly_the_replies_and_end_tokens(tokenizer, template):
    encoded = encode_conversation(TWO_TURNS, tokenizer, template=template, num_image_tokens=N)
    assert encoded["input_ids"].dtype == torch.long and encoded["labels"].dtype == torch.long
    assert encoded["input_ids"].shape == encoded["labels"].shape and encoded["input_ids"].dim() == 1
    assert learned_runs(tokenizer, encoded) == EXPECTED_LEARNED[template]


@pytest.mark.parametrize("template", ["vicuna_v1", "llama3", "chatml", "plain"])
def test_rendered_text_matches_the_reference_format(tokenizer, template):
    encoded = encode_conversation(TWO_TURNS, tokenizer, template=template, num_image_tokens=N)
    assert tokenizer.decode(encoded["input_ids"]) == EXPECTED_TEXT[template]


def test_tokenizer_template_equals_vicuna_for_a_vicuna_chat_template(tokenizer):
    own = encode_conversation(TWO_TURNS, tokenizer, template="tokenizer", num_image_tokens=N)
    assert tokenizer.decode(own["input_ids"]) == EXPECTED_TEXT["vicuna_v1"]


def test_image_placeholder_becomes_n_image_tokens_never_learned(tokenizer):
    encoded = encode_conversation(TWO_TURNS, tokenizer, num_image_tokens=7)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    positions = (encoded["input_ids"] == image_id).nonzero().flatten().tolist()
    assert len(positions) == 7 and positions == list(range(positions[0], positions[0] + 7))
    assert (encoded["labels"][positions] == IGNORE_INDEX).all()


def test_text_only_conversation_has_no_image_tokens(tokenizer):
    conversation = [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "hello"}]
    encoded = encode_conversation(conversation, tokenizer)
    assert tokenizer.decode(encoded["input_ids"]) == f"<s>{VICUNA_V1_SYSTEM} USER: Hi? ASSISTANT: hello</s>"
    assert learned_runs(tokenizer, encoded) == ["hello</s>"]


def test_system_turn_and_override_replace_the_default_system_prompt(tokenizer):
    conversation = [{"from": "system", "value": "Be brief."}] + TWO_TURNS[:2]
    text = tokenizer.decode(encode_conversation(conversation, tokenizer, num_image_tokens=N)["input_ids"])
    assert text.startswith("<s>Be brief. USER: ")
    text = tokenizer.decode(
        encode_conversation(TWO_TURNS[:2], tokenizer, num_image_tokens=N, system_prompt="Short.")["input_ids"]
    )
    assert text.startswith("<s>Short. USER: ")


def test_openai_style_roles_are_accepted(tokenizer):
    conversation = [{"role": "user", "content": "<image>\nQ?"}, {"role": "assistant", "content": "yes"}]
    encoded = encode_conversation(conversation, tokenizer, template="chatml", num_image_tokens=N)
    assert learned_runs(tokenizer, encoded) == ["yes<|im_end|>"]


@pytest.mark.parametrize("template", ["vicuna_v1", "llama3", "chatml", "plain"])
def test_prompt_ends_with_the_assistant_header_and_omits_the_last_answer(tokenizer, template):
    prompt = encode_prompt(TWO_TURNS, tokenizer, template=template, num_image_tokens=N)["input_ids"]
    expected = {
        "vicuna_v1": EXPECTED_TEXT["vicuna_v1"][: -len(" red</s>")],
        "llama3": EXPECTED_TEXT["llama3"][: -len("red<|eot_id|>")],
        "chatml": EXPECTED_TEXT["chatml"][: -len("red<|im_end|>\n")],
        "plain": f"<s>{IMG}",
    }[template]
    assert tokenizer.decode(prompt) == expected


def test_prompt_for_a_bare_question(tokenizer):
    prompt = encode_prompt([{"from": "human", "value": "<image>\nWhat?"}], tokenizer, num_image_tokens=N)
    assert tokenizer.decode(prompt["input_ids"]) == f"<s>{VICUNA_V1_SYSTEM} USER: {IMG}\nWhat? ASSISTANT:"


def test_truncation_keeps_image_tokens_and_cuts_the_end(tokenizer):
    full = encode_conversation(TWO_TURNS, tokenizer, num_image_tokens=N)
    before_last_reply = tokenizer(
        EXPECTED_TEXT["vicuna_v1"][: -len(" red</s>")].replace(IMG, "<image>"), add_special_tokens=False
    )["input_ids"]
    cut = len(before_last_reply) - 1 + N  # ends right after "ASSISTANT:" of the second turn
    truncated = encode_conversation(TWO_TURNS, tokenizer, num_image_tokens=N, max_length=cut)
    assert truncated["input_ids"].tolist() == full["input_ids"][:cut].tolist()
    assert learned_runs(tokenizer, truncated) == ["a red circle</s>"]


def test_sample_whose_image_tokens_do_not_fit_is_rejected(tokenizer):
    prefix = tokenizer(f"<s>{VICUNA_V1_SYSTEM} USER: <image>", add_special_tokens=False)["input_ids"]
    image_end = len(prefix) - 1 + N
    with pytest.raises(BadSampleError) as error:
        encode_conversation(TWO_TURNS, tokenizer, num_image_tokens=N, max_length=image_end - 1)
    assert error.value.kind == "image_tokens_truncated"
    with pytest.raises(BadSampleError) as error:  # image fits, but no reply token does
        encode_conversation(TWO_TURNS, tokenizer, num_image_tokens=N, max_length=image_end + 2)
    assert error.value.kind == "no_target_after_truncation"


@pytest.mark.parametrize(
    ("conversation", "kind"),
    [
        ([{"from": "human", "value": "hi"}, {"from": "bot", "value": "x"}], "wrong_roles"),
        ([{"from": "gpt", "value": "x"}, {"from": "human", "value": "hi"}], "wrong_roles"),
        ([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], "wrong_roles"),
        ([{"from": "human", "value": "hi"}], "no_assistant_turn"),
        ([], "no_assistant_turn"),
        ([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "  "}], "empty_text"),
        ([{"from": "human", "value": ""}, {"from": "gpt", "value": "x"}], "empty_text"),
        ([{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "x"}], "bad_image_placeholder"),
        ([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "<image>"}], "bad_image_placeholder"),
    ],
)
def test_invalid_conversations_raise_with_their_kind(tokenizer, conversation, kind):
    with pytest.raises(BadSampleError) as error:
        encode_conversation(conversation, tokenizer, num_image_tokens=N)
    assert error.value.kind == kind


def test_unknown_template_and_missing_image_token_are_clear_errors(tokenizer):
    with pytest.raises(ValueError, match="unknown template"):
        encode_conversation(TWO_TURNS, tokenizer, template="nope")
    backend = Tokenizer(models.WordLevel({"<unk>": 0, "hello": 1}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    plain = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    with pytest.raises(ValueError, match="<image>"):
        image_token_id(plain)


@pytest.mark.parametrize("answer", ["a red circle", "B", "no"])  # "B", "no": the demo BPE splits off the space
@pytest.mark.parametrize("template", ["vicuna_v1", "llama3", "chatml", "plain"])
def test_tokens_after_the_generation_prompt_are_exactly_the_learned_ones(tokenizer, template, answer):
    """What generation must produce after the prompt (the separator space included) is what training learns."""
    one_turn = [TWO_TURNS[0], {"from": "gpt", "value": answer}]
    prompt = encode_prompt(one_turn, tokenizer, template=template, num_image_tokens=N)["input_ids"]
    encoded = encode_conversation(one_turn, tokenizer, template=template, num_image_tokens=N)
    ids, labels = encoded["input_ids"], encoded["labels"]
    assert torch.equal(ids[: len(prompt)], prompt)
    learned = (labels != IGNORE_INDEX).tolist()
    after_prompt = learned[len(prompt) :]
    assert not any(learned[: len(prompt)])
    assert after_prompt[0], "the first token generated after the prompt must be learned"
    first_unlearned = after_prompt.index(False) if False in after_prompt else len(after_prompt)
    assert not any(after_prompt[first_unlearned:])  # only template text after the end token (chatml's newline)
