"""Token-for-token parity of the templates with the code users compare against, on hub-format tokenizers.

- ``vicuna_v1`` against LLaVA-1.5's preprocessing (``conv_vicuna_v1.get_prompt()`` + ``tokenizer_image_token``),
  re-implemented here from LLaVA's published algorithm, on a SentencePiece ``tokenizer.model`` folder with
  ``legacy`` false and true; and the chunks against ``sentencepiece`` itself (the slow tokenizer's algorithm).
- ``processor`` against transformers' own ``LlavaProcessor`` (``apply_chat_template`` + ``__call__``) of a
  llava-hf folder.
- ``tokenizer`` on a Qwen2-style ``tokenizer.json``: the label mask against the rendered chat template.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from mole_lightning.constants import IGNORE_INDEX
from mole_lightning.data.templates import VICUNA_V1_SYSTEM, encode_conversation, encode_prompt
from mole_lightning.tokenization import load_tokenizer

NUM_IMAGE_TOKENS = 576
LLAVA_IMAGE_INDEX = -200

CONVERSATIONS = {
    "single_turn": [
        {"from": "human", "value": "<image>\nWhat is in the picture?"},
        {"from": "gpt", "value": "A red square on a white background."},
    ],
    "multi_turn": [
        {"from": "human", "value": "<image>\nWhat color is the circle?"},
        {"from": "gpt", "value": "It is blue."},
        {"from": "human", "value": "How many shapes are there?"},
        {"from": "gpt", "value": "3 shapes."},
    ],
    "text_only": [
        {"from": "human", "value": "Summarize the figure in one sentence."},
        {"from": "gpt", "value": "The line goes up from 10 to 42 percent."},
    ],
    "image_after_question": [
        {"from": "human", "value": "Where is the cat? <image>"},
        {"from": "gpt", "value": "on the mat, next to the dog."},
    ],
    "system_prompt": [
        {"from": "system", "value": "Answer the question using a single word or phrase."},
        {"from": "human", "value": "<image>\nIs there a tumor in this scan?"},
        {"from": "gpt", "value": "yes"},
    ],
}


# ------------------------------------------------------------------------------- LLaVA-1.5, re-implemented
def llava_rounds(conversation: list[dict[str, str]]) -> tuple[str, list[tuple[str, str | None]]]:
    """LLaVA's ``preprocess_multimodal`` (placeholder moved to the front) and the conversation's messages."""
    system = VICUNA_V1_SYSTEM
    messages = []
    for turn in conversation:
        value = turn["value"]
        if turn["from"] == "system":
            system = value
            continue
        if "<image>" in value:
            value = ("<image>\n" + value.replace("<image>", "").strip()).strip()
        messages.append(("USER" if turn["from"] == "human" else "ASSISTANT", value))
    return system, messages


def llava_get_prompt(system: str, messages: list[tuple[str, str | None]]) -> str:
    """``Conversation.get_prompt()`` of ``conv_vicuna_v1`` (``SeparatorStyle.TWO``, seps ``" "`` and ``"</s>"``)."""
    seps = [" ", "</s>"]
    ret = system + seps[0]
    for i, (role, message) in enumerate(messages):
        if message:
            ret += role + ": " + message + seps[i % 2]
        else:
            ret += role + ":"
    return ret


def llava_tokenizer_image_token(prompt: str, tokenizer) -> list[int]:
    """``llava.mm_utils.tokenizer_image_token`` with ``IMAGE_TOKEN_INDEX`` = -200."""
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]

    def insert_separator(items, separator):
        return [element for pair in zip(items, [separator] * len(items)) for element in pair][:-1]

    input_ids: list[int] = []
    offset = 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        input_ids.append(chunks[0][0])
    for piece in insert_separator(chunks, [LLAVA_IMAGE_INDEX] * (offset + 1)):
        input_ids.extend(piece[offset:])
    return input_ids


def expand_images(ids: list[int], image_id: int) -> list[int]:
    out: list[int] = []
    for token in ids:
        out.extend([image_id] * NUM_IMAGE_TOKENS if token == LLAVA_IMAGE_INDEX else [token])
    return out


# -------------------------------------------------------------------------- sentencepiece, the slow tokenizer
def sentencepiece_chunk(chunk: str, model_file: str, legacy: bool) -> list[int]:
    """Ids of one ``tokenizer(chunk)`` call as the SentencePiece ``LlamaTokenizer`` computes them: BOS, then the
    text split at ``</s>``; each piece gets the dummy prefix with ``legacy`` true, only the first with false."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    with_prefix = spm.SentencePieceProcessor(model_file=model_file)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(open(model_file, "rb").read())
    proto.normalizer_spec.add_dummy_prefix = False
    without_prefix = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    ids = [with_prefix.bos_id()]
    for index, piece in enumerate(chunk.split("</s>")):
        if index > 0:
            ids.append(with_prefix.eos_id())
        if piece:
            processor = with_prefix if legacy or index == 0 else without_prefix
            ids += processor.encode(piece)
    return ids


@pytest.mark.parametrize("legacy", [False, True], ids=["legacy_false", "legacy_true"])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_vicuna_v1_equals_llava_preprocessing_on_a_sentencepiece_tokenizer(real_folders, name, legacy):
    from transformers import AutoTokenizer

    folder = real_folders["vicuna_tokenizer_legacy" if legacy else "vicuna_tokenizer"]
    tokenizer = load_tokenizer(str(folder))  # prepared: <image> added, pad = unk
    plain = AutoTokenizer.from_pretrained(folder)  # what LLaVA loads: no <image>
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert image_id == len(plain) and tokenizer.pad_token == "<unk>"

    conversation = CONVERSATIONS[name]
    system, messages = llava_rounds(conversation)
    reference = llava_tokenizer_image_token(llava_get_prompt(system, messages), plain)
    # the chunks LLaVA tokenizes, computed by SentencePiece directly
    chunks = llava_get_prompt(system, messages).split("<image>")
    by_sentencepiece = [sentencepiece_chunk(c, str(folder / "tokenizer.model"), legacy) for c in chunks]
    stitched = by_sentencepiece[0] + [i for c in by_sentencepiece[1:] for i in [LLAVA_IMAGE_INDEX] + c[1:]]
    assert stitched == reference

    encoded = encode_conversation(conversation, tokenizer, "vicuna_v1", num_image_tokens=NUM_IMAGE_TOKENS)
    assert encoded["input_ids"].tolist() == expand_images(reference, image_id)

    # the learned tokens of each reply decode to the reply + </s>
    labels = encoded["labels"].tolist()
    runs, current = [], []
    for label in labels + [IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            current.append(label)
        elif current:
            runs.append(current)
            current = []
    replies = [m for role, m in messages if role == "ASSISTANT"]
    assert [plain.decode(run).strip() for run in runs] == [reply + "</s>" for reply in replies]

    # the generation prompt is LLaVA's prompt with an empty last reply
    prompt = encode_prompt(conversation, tokenizer, "vicuna_v1", num_image_tokens=NUM_IMAGE_TOKENS)
    prompt_reference = llava_tokenizer_image_token(
        llava_get_prompt(system, messages[:-1] + [("ASSISTANT", None)]), plain
    )
    assert prompt["input_ids"].tolist() == expand_images(prompt_reference, image_id)


def test_llava_tokens_around_the_image_are_the_known_ones(real_folders):
    """The known LLaVA-1.5 pattern: BOS, "▁A" (dummy prefix kept), ``USER: `` ending with "▁", image, "▁", "\\n"."""
    tokenizer = load_tokenizer(str(real_folders["vicuna_tokenizer"]))
    ids = encode_prompt(CONVERSATIONS["single_turn"], tokenizer, "vicuna_v1", num_image_tokens=2)["input_ids"]
    pieces = tokenizer.convert_ids_to_tokens(ids.tolist())
    assert pieces[0] == "<s>" and pieces[1] == "▁A"
    first = pieces.index("<image>")
    assert pieces[first - 1] == "▁" and pieces[first : first + 2] == ["<image>", "<image>"]
    assert pieces[first + 2 : first + 4] == ["▁", "<0x0A>"]


# ------------------------------------------------------------------------------------------ llava-hf folders
@pytest.mark.parametrize("name", ["single_turn", "multi_turn", "text_only"])
def test_processor_template_prompts_equal_transformers_llava_processor(real_folders, name):
    from transformers import AutoProcessor

    folder = real_folders["llava_hf"]
    processor = AutoProcessor.from_pretrained(folder)
    tokenizer = load_tokenizer(str(folder))
    conversation = CONVERSATIONS[name]
    _, messages = llava_rounds(conversation)
    chat = []
    for role, text in messages[:-1]:  # the prompt for the last reply
        content = []
        if text.startswith("<image>\n"):
            content.append({"type": "image"})
            text = text[len("<image>\n") :]
        content.append({"type": "text", "text": text})
        chat.append({"role": role.lower(), "content": content})
    text = processor.apply_chat_template(chat, add_generation_prompt=True)
    has_image = "<image>" in text
    image = Image.new("RGB", (336, 336), (120, 30, 200)) if has_image else None
    expected = processor(images=image, text=text, return_tensors="pt")["input_ids"][0]

    ours = encode_prompt(conversation, tokenizer, "processor", num_image_tokens=NUM_IMAGE_TOKENS)
    assert ours["input_ids"].tolist() == expected.tolist()
    if has_image:
        assert int((expected == tokenizer.convert_tokens_to_ids("<image>")).sum()) == 576


def test_processor_template_training_labels_learn_each_reply_and_eos(real_folders):
    tokenizer = load_tokenizer(str(real_folders["llava_hf"]))
    encoded = encode_conversation(CONVERSATIONS["multi_turn"], tokenizer, "processor", num_image_tokens=576)
    learned = encoded["input_ids"][encoded["labels"] != IGNORE_INDEX]
    text = tokenizer.decode(learned.tolist())
    assert text.replace(" ", "") == "Itisblue.</s>3shapes.</s>"
    assert encoded["input_ids"][0] == tokenizer.bos_token_id


# ---------------------------------------------------------------------------------------------- Qwen2 family
def test_qwen2_chat_template_labels_follow_the_rendered_template(real_folders):
    tokenizer = load_tokenizer(str(real_folders["qwen2"]))
    assert tokenizer.convert_tokens_to_ids("<image>") == len(tokenizer) - 1  # added after the vocabulary
    conversation = CONVERSATIONS["multi_turn"]
    encoded = encode_conversation(conversation, tokenizer, "tokenizer", num_image_tokens=4)
    chat = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]} for t in conversation]
    rendered = tokenizer.apply_chat_template(chat, tokenize=False)
    expected_ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    expanded = [i for t in expected_ids for i in ([image_id] * 4 if t == image_id else [t])]
    assert encoded["input_ids"].tolist() == expanded
    # learned: exactly each reply followed by <|im_end|>
    labels = encoded["labels"]
    runs = torch.tensor(labels != IGNORE_INDEX, dtype=torch.int8).diff(prepend=torch.zeros(1, dtype=torch.int8))
    assert int((runs == 1).sum()) == 2
    learned = tokenizer.decode(encoded["input_ids"][labels != IGNORE_INDEX].tolist())
    assert learned == "It is blue.<|im_end|>3 shapes.<|im_end|>"
