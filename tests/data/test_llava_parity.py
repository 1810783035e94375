"""Token-for-token parity of the templates with the code users compare against, on hub-format tokenizers.

- ``vicuna_v1`` labels against LLaVA's ``preprocess_v1`` count-based masking (as at ``c121f04``) and against the
  span of each reply + ``</s>`` located by tokenizing the conversation's prefixes; where LLaVA's counting is off
  (multi-turn, ``legacy`` false) the test shows by how much and why.
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
    "three_turns": [
        {"from": "human", "value": "<image>\nWhat is drawn here?"},
        {"from": "gpt", "value": "A chart with 3 bars."},
        {"from": "human", "value": "Which bar is the tallest?"},
        {"from": "gpt", "value": "The middle one, at 42 percent."},
        {"from": "human", "value": "And the shortest?"},
        {"from": "gpt", "value": "The left one."},
    ],
    "text_only_multi_turn": [
        {"from": "human", "value": "Name a primary colour."},
        {"from": "gpt", "value": "Red."},
        {"from": "human", "value": "Another one?"},
        {"from": "gpt", "value": "Blue."},
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


# ------------------------------------------------------------------ LLaVA's preprocess_v1 label masking, re-implemented
def llava_preprocess_v1_labels(prompt: str, tokenizer, *, guard: bool = True) -> list[int]:
    """Labels of ``preprocess_v1`` (LLaVA ``c121f04``) for one ``conv_vicuna_v1`` prompt, over LLaVA's ids.

    The prompt is split at ``sep2`` (``</s>``) into rounds and each round at ``" ASSISTANT: "``. Positions are
    counted, not searched: ``cur_len`` starts at 1 (BOS); a round spans ``len(tokenizer_image_token(round))`` tokens
    (its own BOS standing for the ``</s>`` that ends it) and its first ``len(tokenizer_image_token(instruction)) − 2``
    tokens are masked (minus BOS and the lone "▁" that ``"ASSISTANT: "`` ends with when tokenized alone). For
    rounds after the first, with ``tokenizer.legacy`` false and tokenizers ≥ 0.14, both counts lose one more token.
    If the counted total differs from the real length, every label is masked (``guard``; LLaVA prints "tokenization
    mismatch" and trains nothing on the sample).
    """
    import tokenizers
    from packaging import version

    input_ids = llava_tokenizer_image_token(prompt, tokenizer)
    target = list(input_ids)
    sep = " ASSISTANT: "
    cur_len = 1
    target[:cur_len] = [IGNORE_INDEX] * cur_len
    tokenizers_0_14 = version.parse(tokenizers.__version__) >= version.parse("0.14")
    for index, round_text in enumerate(prompt.split("</s>")):
        if round_text == "":
            break
        parts = round_text.split(sep)
        if len(parts) != 2:
            break
        instruction = parts[0] + sep
        round_len = len(llava_tokenizer_image_token(round_text, tokenizer))
        instruction_len = len(llava_tokenizer_image_token(instruction, tokenizer)) - 2
        if index != 0 and not tokenizer.legacy and tokenizers_0_14:
            round_len -= 1
            instruction_len -= 1
        end = min(cur_len + instruction_len, len(target))
        target[cur_len:end] = [IGNORE_INDEX] * (end - cur_len)
        cur_len += round_len
    target[cur_len:] = [IGNORE_INDEX] * max(0, len(target) - cur_len)
    if guard and cur_len != len(input_ids):
        target = [IGNORE_INDEX] * len(target)
    return [IGNORE_INDEX if t == LLAVA_IMAGE_INDEX else t for t in target]


def reply_spans(system: str, messages: list[tuple[str, str | None]], tokenizer) -> list[tuple[int, int]]:
    """``[start, end)`` of each reply + ``</s>`` in LLaVA's ids, located by tokenizing the conversation's prefixes.

    ``start`` = length of the generation prompt ending in ``ASSISTANT:`` (the reply's first token, "▁" + word,
    follows it), ``end`` = length of the text up to and including that round's ``</s>``. Each prefix's ids are
    checked to be a prefix of the whole conversation's ids.
    """
    full = llava_tokenizer_image_token(llava_get_prompt(system, messages), tokenizer)
    spans = []
    for index in range(1, len(messages), 2):
        prompt = llava_tokenizer_image_token(
            llava_get_prompt(system, messages[:index] + [("ASSISTANT", None)]), tokenizer
        )
        through_reply = llava_tokenizer_image_token(llava_get_prompt(system, messages[: index + 1]), tokenizer)
        assert full[: len(prompt)] == prompt and full[: len(through_reply)] == through_reply
        assert through_reply[-1] == tokenizer.eos_token_id
        spans.append((len(prompt), len(through_reply)))
    return spans


def labels_from_spans(ids: list[int], spans: list[tuple[int, int]]) -> list[int]:
    learned = {i for start, end in spans for i in range(start, end)}
    return [t if i in learned else IGNORE_INDEX for i, t in enumerate(ids)]


def expand_labels(labels: list[int], llava_ids: list[int]) -> list[int]:
    """LLaVA's labels with the image index's one position widened to ``NUM_IMAGE_TOKENS`` masked ones."""
    out: list[int] = []
    for label, token in zip(labels, llava_ids):
        out.extend([IGNORE_INDEX] * NUM_IMAGE_TOKENS if token == LLAVA_IMAGE_INDEX else [label])
    return out


def llava_counting_holds(conversation, tokenizer) -> bool:
    """Whether LLaVA's length counting matches the conversation's real tokens: always for ``legacy`` true or one
    round; for later rounds with ``legacy`` false only if tokenizing a round alone (dummy prefix, "▁USER") gives
    exactly one token more than the same round after ``</s>`` ("USER", no prefix), as LLaVA's ``− 1`` assumes."""
    system, messages = llava_rounds(conversation)
    rounds = [r for r in llava_get_prompt(system, messages).split("</s>") if r]
    for round_text in rounds[1:]:
        alone = len(tokenizer(round_text).input_ids) - 1  # without BOS
        after_eos = len(tokenizer("</s>" + round_text, add_special_tokens=False).input_ids) - 1  # without </s>
        if alone - after_eos != (0 if tokenizer.legacy else 1):
            return False
    return True


@pytest.mark.parametrize("legacy", [False, True], ids=["legacy_false", "legacy_true"])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_vicuna_v1_labels_are_each_reply_and_eos_and_equal_llava_where_its_counting_holds(real_folders, name, legacy):
    from transformers import AutoTokenizer

    folder = real_folders["vicuna_tokenizer_legacy" if legacy else "vicuna_tokenizer"]
    tokenizer = load_tokenizer(str(folder))
    plain = AutoTokenizer.from_pretrained(folder)
    assert plain.legacy is legacy
    conversation = CONVERSATIONS[name]
    system, messages = llava_rounds(conversation)
    prompt = llava_get_prompt(system, messages)
    llava_ids = llava_tokenizer_image_token(prompt, plain)
    expected = expand_labels(labels_from_spans(llava_ids, reply_spans(system, messages, plain)), llava_ids)
    ours = encode_conversation(conversation, tokenizer, "vicuna_v1", num_image_tokens=NUM_IMAGE_TOKENS)
    assert ours["labels"].tolist() == expected

    llava = expand_labels(llava_preprocess_v1_labels(prompt, plain), llava_ids)
    if llava_counting_holds(conversation, plain):
        assert llava == expected
    else:  # LLaVA drops the sample: its counted length misses the real one, so every label is masked
        assert set(llava) == {IGNORE_INDEX} and set(expected) != {IGNORE_INDEX}


def test_where_llava_counting_is_off_for_a_non_legacy_tokenizer(real_folders):
    """After ``</s>``, a ``legacy`` false tokenizer gives the next round no dummy prefix. LLaVA's ``− 1`` assumes
    that saves one token ("▁USER" → "USER" shorter by one, true of some vocabularies); in this SentencePiece
    vocabulary "▁USER" is one piece and "USER" two ("US", "ER"), so each later round is one token longer in context
    than alone, and LLaVA's counts fall two short per later round, cumulatively: round k (from 0) would learn 2k
    prompt tokens ("▁ASSISTANT", ":" in round 1) and mask the end of the round before it; its total misses the real
    length, so the mismatch guard masks the whole sample instead."""
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(real_folders["vicuna_tokenizer"])
    tokenizer = load_tokenizer(str(real_folders["vicuna_tokenizer"]))
    conversation = CONVERSATIONS["three_turns"]
    system, messages = llava_rounds(conversation)
    prompt = llava_get_prompt(system, messages)
    llava_ids = llava_tokenizer_image_token(prompt, plain)
    rounds = [r for r in prompt.split("</s>") if r]
    assert len(rounds) == 3

    # where: the second round's first tokens, alone and in the conversation
    alone = plain(rounds[1]).input_ids[1:]
    start = llava_ids.index(plain.eos_token_id) + 1
    in_context = llava_ids[start : llava_ids.index(plain.eos_token_id, start)]
    assert plain.convert_ids_to_tokens(alone[:1]) == ["▁USER"]
    assert plain.convert_ids_to_tokens(in_context[:2]) == ["US", "ER"]
    assert len(in_context) - len(alone) == 1  # LLaVA assumes −1

    # by how much: LLaVA's unguarded labels vs the real spans (each later round: instruction mask 2 short)
    spans = reply_spans(system, messages, plain)
    unguarded = llava_preprocess_v1_labels(prompt, plain, guard=False)
    counted_shift = -(len(in_context) - len(alone) + 1)  # tokens per later round LLaVA's counting misses: −2
    assert counted_shift == -2
    previous_end = 0
    for index, (start, end) in enumerate(spans):
        first = next(i for i in range(previous_end, end) if unguarded[i] != IGNORE_INDEX)
        assert first == start + index * counted_shift  # round k starts learning 2k tokens early
        if index >= 2:  # and the rounds before lose their last 2(k − 1) learned tokens, "</s>" included
            assert set(unguarded[previous_end - 2 * (index - 1) : previous_end]) == {IGNORE_INDEX}
        previous_end = end
    early = [llava_ids[i] for i in range(spans[1][0] + counted_shift, spans[1][0])]
    assert plain.convert_ids_to_tokens(early) == ["▁ASSISTANT", ":"]  # prompt tokens LLaVA would learn
    assert set(llava_preprocess_v1_labels(prompt, plain)) == {IGNORE_INDEX}  # guarded: the sample is dropped

    # ours: exactly each reply + </s>
    labels = encode_conversation(conversation, tokenizer, "vicuna_v1", num_image_tokens=NUM_IMAGE_TOKENS)["labels"]
    assert labels.tolist() == expand_labels(labels_from_spans(llava_ids, spans), llava_ids)
    learned = [plain.decode([llava_ids[i] for i in range(s, e)]).strip() for s, e in spans]
    assert learned == [reply + "</s>" for role, reply in messages if role == "ASSISTANT"]


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
