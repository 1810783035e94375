"""Conversation templates and the conversation → (``input_ids``, ``labels``) encoder.

A LLaVA conversation (``[{"from": "human", "value": "<image>\\nWhat is it?"}, {"from": "gpt", "value": "a cat"}]``)
is rendered to one string by a named template, tokenized with character offsets, and labelled: only the
assistant replies and their end token are learned, everything else is :data:`~mole_lightning.constants.IGNORE_INDEX`.
The ``<image>`` placeholder is expanded to ``num_image_tokens`` copies of the tokenizer's ``<image>`` id, where the
model scatters its visual features.

How the text is tokenized is part of the template (:class:`RenderedConversation`): ``vicuna_v1`` and ``plain``
follow LLaVA's ``tokenizer_image_token`` (the text is split at ``<image>``, each chunk tokenized with the tokenizer's
own special tokens, BOS kept once), so a SentencePiece tokenizer (vicuna's ``tokenizer.model``, ``legacy`` true or
false) gives LLaVA-1.5's ids token for token; ``processor`` tokenizes the whole text with the tokenizer's special
tokens as transformers' ``LlavaProcessor`` does; the others tokenize their text, which holds every special token,
as ``apply_chat_template`` does.

Templates (``TEMPLATES``):

* ``vicuna_v1`` -- LLaVA-1.5: ``"<s>{system} USER: {q} ASSISTANT: {a}</s>USER: ..."``.
* ``llama3`` -- ``<|start_header_id|>role<|end_header_id|>\\n\\n{text}<|eot_id|>`` blocks after the BOS token.
* ``chatml`` -- Qwen: ``<|im_start|>role\\n{text}<|im_end|>\\n`` blocks.
* ``plain`` -- stage-1 captioning: ``"<s><image>{caption}</s>"`` (the question text is dropped, as in LLaVA).
* ``tokenizer`` -- the tokenizer's own Jinja ``chat_template`` (``apply_chat_template``).
* ``processor`` -- the chat template of the tokenizer's processor folder (llava-hf's ``chat_template.json``:
  ``"USER: <image>\\n{q} ASSISTANT:"``), tokenized as transformers' ``LlavaProcessor`` does.

Requires a fast (``tokenizers``-backed) tokenizer, because labels are derived from character offsets; this makes
masking independent of how a tokenizer merges spaces around role markers.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import torch

from mole_lightning.constants import DEFAULT_IMAGE_TOKEN, IGNORE_INDEX

VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAMA3_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the user "
    "provides, and assist the user with a variety of tasks using natural language."
)
CHATML_SYSTEM = "You are a helpful assistant."

USER_ROLES = {"human": "user", "user": "user"}
ASSISTANT_ROLES = {"gpt": "assistant", "assistant": "assistant"}
SYSTEM_ROLES = {"system": "system"}


class ChatTemplateError(ValueError):
    """A Jinja chat template (the tokenizer's or the processor folder's) that cannot render a conversation, e.g. a
    text-only template given content lists. Not a bad sample: every sample would fail alike."""


def apply_jinja_template(tokenizer: Any, items: list[dict[str, Any]], generation: bool, **kwargs: Any) -> str:
    """``tokenizer.apply_chat_template(items, tokenize=False, ...)``; a template that fails raises
    :class:`ChatTemplateError` naming the tokenizer's folder and the template's error, in one line."""
    try:
        return tokenizer.apply_chat_template(items, tokenize=False, add_generation_prompt=generation, **kwargs)
    except (TypeError, KeyError, AttributeError, jinja2.TemplateError) as error:
        where = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
        detail = " ".join(str(error).split())
        raise ChatTemplateError(
            f"the chat template of {where!r} cannot render this conversation ({type(error).__name__}: {detail})"
        ) from None


class BadSampleError(ValueError):
    """A sample that cannot be used; ``kind`` names the reason (used as a counter key, e.g. ``"wrong_roles"``)."""

    def __init__(self, kind: str, message: str = "") -> None:
        super().__init__(f"{kind}: {message}" if message else kind)
        self.kind = kind


@dataclass(frozen=True)
class Message:
    """One normalized conversation turn.

    Attributes:
        role: ``"system"``, ``"user"`` or ``"assistant"``.
        text: The turn's text; an image placeholder, if any, is ``"<image>\\n"`` at its very start.
    """

    role: str
    text: str


@dataclass
class RenderedConversation:
    """A conversation rendered to text by a template.

    Attributes:
        text: The full string to tokenize (role markers as text; BOS too unless ``add_special_tokens``).
        learned_spans: Character ``[start, end)`` spans whose tokens are learned (assistant replies + end token).
        generation_prompt_end: Character offset where the prompt for generation ends (after the last assistant
            header); only meaningful when rendered with ``add_generation_prompt=True``.
        add_special_tokens: Tokenize with the tokenizer's own special tokens (its BOS), kept once at the start.
        split_at_image: Tokenize each ``<image>``-separated chunk on its own (LLaVA's ``tokenizer_image_token``).
    """

    text: str
    learned_spans: list[tuple[int, int]] = field(default_factory=list)
    generation_prompt_end: int | None = None
    add_special_tokens: bool = False
    split_at_image: bool = False


class _Builder:
    """Appends text pieces and remembers which character spans are learned."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.length = 0
        self.learned_spans: list[tuple[int, int]] = []

    def add(self, text: str, learned: bool = False) -> None:
        if learned and text:
            self.learned_spans.append((self.length, self.length + len(text)))
        self.parts.append(text)
        self.length += len(text)

    def build(self, generation_prompt_end: int | None = None, **tokenization: bool) -> RenderedConversation:
        return RenderedConversation("".join(self.parts), self.learned_spans, generation_prompt_end, **tokenization)


LLAVA_TOKENIZATION = {"add_special_tokens": True, "split_at_image": True}
"""LLaVA's ``tokenizer_image_token``: chunks between ``<image>`` tokenized with BOS, BOS kept once."""


Renderer = Callable[[list[Message], Any, str | None, bool], RenderedConversation]
"""``(messages, tokenizer, system_prompt, add_generation_prompt) -> RenderedConversation``."""


def _special(tokenizer: Any, name: str, fallback: str = "") -> str:
    value = getattr(tokenizer, name, None)
    return value if isinstance(value, str) and value else fallback


def _split_system(messages: list[Message], default: str, override: str | None) -> tuple[str, list[Message]]:
    if messages and messages[0].role == "system":
        return messages[0].text, messages[1:]
    return (default if override is None else override), messages


def render_vicuna_v1(
    messages: list[Message], tokenizer: Any, system_prompt: str | None, add_generation_prompt: bool
) -> RenderedConversation:
    """LLaVA-1.5 ``conv_vicuna_v1`` (``SeparatorStyle.TWO``, sep ``" "``, sep2 ``"</s>"``), tokenized as LLaVA does."""
    system, turns = _split_system(messages, VICUNA_V1_SYSTEM, system_prompt)
    eos = _special(tokenizer, "eos_token", "</s>")
    out = _Builder()
    out.add(system + " ")
    for message in turns:
        if message.role == "user":
            out.add(f"USER: {message.text} ")
        else:
            out.add("ASSISTANT:")  # the generation prompt ends here, so the separator space belongs to the reply
            out.add(" " + message.text + eos, learned=True)
    if add_generation_prompt:
        out.add("ASSISTANT:")
        return out.build(out.length, **LLAVA_TOKENIZATION)
    return out.build(**LLAVA_TOKENIZATION)


def render_llama3(
    messages: list[Message], tokenizer: Any, system_prompt: str | None, add_generation_prompt: bool
) -> RenderedConversation:
    """Llama-3 instruct blocks; the reply and its ``<|eot_id|>`` are learned."""
    system, turns = _split_system(messages, LLAMA3_SYSTEM, system_prompt)
    out = _Builder()
    out.add(_special(tokenizer, "bos_token"))
    if system:
        out.add(f"<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>")
    for message in turns:
        out.add(f"<|start_header_id|>{message.role}<|end_header_id|>\n\n")
        out.add(message.text + "<|eot_id|>", learned=message.role == "assistant")
    if add_generation_prompt:
        out.add("<|start_header_id|>assistant<|end_header_id|>\n\n")
        return out.build(out.length)
    return out.build()


def render_chatml(
    messages: list[Message], tokenizer: Any, system_prompt: str | None, add_generation_prompt: bool
) -> RenderedConversation:
    """ChatML (Qwen); the reply and its ``<|im_end|>`` are learned, the newline after it is not."""
    system, turns = _split_system(messages, CHATML_SYSTEM, system_prompt)
    out = _Builder()
    if system:
        out.add(f"<|im_start|>system\n{system}<|im_end|>\n")
    for message in turns:
        out.add(f"<|im_start|>{message.role}\n")
        out.add(message.text + "<|im_end|>", learned=message.role == "assistant")
        out.add("\n")
    if add_generation_prompt:
        out.add("<|im_start|>assistant\n")
        return out.build(out.length)
    return out.build()


def render_plain(
    messages: list[Message], tokenizer: Any, system_prompt: str | None, add_generation_prompt: bool
) -> RenderedConversation:
    """LLaVA ``plain`` (stage-1 captioning): image placeholder, then the first reply, then EOS.

    The user's text other than the placeholder is dropped (as ``preprocess_plain`` does); later turns are ignored.
    The reply ends with the tokenizer's EOS token (LLaVA uses ``"\\n"``) so generation has a stop token.
    """
    turns = [m for m in messages if m.role != "system"]
    first_user = turns[0]
    out = _Builder()
    if DEFAULT_IMAGE_TOKEN in first_user.text:
        out.add(DEFAULT_IMAGE_TOKEN)
    if add_generation_prompt:
        return out.build(out.length, **LLAVA_TOKENIZATION)
    out.add(turns[1].text + _special(tokenizer, "eos_token", "\n"), learned=True)
    return out.build(**LLAVA_TOKENIZATION)


def render_tokenizer_chat_template(
    messages: list[Message], tokenizer: Any, system_prompt: str | None, add_generation_prompt: bool
) -> RenderedConversation:
    """The tokenizer's own ``chat_template``; learned spans are found by rendering growing prefixes.

    Each assistant reply's span is the text between the prefix rendered with ``add_generation_prompt=True`` and the
    prefix that includes the reply (trailing whitespace excluded). The template must render prefixes consistently
    (true for Llama, Qwen, Mistral, Vicuna-style templates).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("template='tokenizer' needs a tokenizer with a chat_template")
    chat = [{"role": m.role, "content": m.text} for m in messages]
    if system_prompt is not None and (not chat or chat[0]["role"] != "system"):
        chat.insert(0, {"role": "system", "content": system_prompt})

    def render(items: list[dict[str, Any]], generation: bool) -> str:
        return apply_jinja_template(tokenizer, items, generation)

    text, spans = _render_with_reply_spans(chat, render, add_generation_prompt)
    return RenderedConversation(text, spans, len(text) if add_generation_prompt else None)


def _render_with_reply_spans(
    chat: list[dict[str, Any]], render: Callable[[list[dict[str, Any]], bool], str], add_generation_prompt: bool
) -> tuple[str, list[tuple[int, int]]]:
    """``render(chat)`` and the character span of every assistant reply, found by rendering growing prefixes."""
    text = render(chat, add_generation_prompt)
    spans: list[tuple[int, int]] = []
    for index, item in enumerate(chat):
        if item["role"] != "assistant":
            continue
        prompt = render(chat[:index], True)
        if text[: len(prompt)] != prompt:
            raise ValueError("the chat template does not render conversation prefixes consistently")
        spans.append((len(prompt), len(render(chat[: index + 1], False).rstrip())))
    return text, spans


PROCESSOR_TEMPLATE_FILES = ("chat_template.json", "chat_template.jinja")
"""Where a processor folder (llava-hf) keeps its chat template, beside the tokenizer files."""


def processor_chat_template(tokenizer: Any) -> str:
    """The chat template of the processor whose folder holds ``tokenizer`` (``chat_template.json`` / ``.jinja``).

    Raises:
        ValueError: The tokenizer's folder holds no processor chat template.
    """
    folder = Path(str(getattr(tokenizer, "name_or_path", "") or ""))
    for name in PROCESSOR_TEMPLATE_FILES:
        path = folder / name
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            return json.loads(text)["chat_template"] if name.endswith(".json") else text
    raise ValueError(f"template='processor' needs {' or '.join(PROCESSOR_TEMPLATE_FILES)} in {str(folder)!r}")


def render_processor_chat_template(
    messages: list[Message], tokenizer: Any, system_prompt: str | None, add_generation_prompt: bool
) -> RenderedConversation:
    """The chat template of the tokenizer's processor folder (llava-hf: ``USER: <image>\\n{q} ASSISTANT:``).

    Messages become processor content lists (``{"type": "image"}`` for the placeholder, then the text) and the
    whole text is tokenized with the tokenizer's BOS, so a generation prompt is, token for token, what
    transformers' processor (``apply_chat_template`` + ``__call__``) gives. Templates that end a reply without the
    EOS token (llava-hf's) get it inserted after each reply of a training conversation, so the model learns to stop;
    generation prompts keep the template's text exactly.
    """
    template = processor_chat_template(tokenizer)
    chat: list[dict[str, Any]] = []
    if system_prompt is not None and (not messages or messages[0].role != "system"):
        chat.append({"role": "system", "content": [{"type": "text", "text": system_prompt}]})
    for message in messages:
        content: list[dict[str, str]] = []
        text = message.text
        if text.startswith(DEFAULT_IMAGE_TOKEN):
            content.append({"type": "image"})
            text = text[len(DEFAULT_IMAGE_TOKEN) :].lstrip("\n")
        content.append({"type": "text", "text": text})
        chat.append({"role": message.role, "content": content})

    def render(items: list[dict[str, Any]], generation: bool) -> str:
        return apply_jinja_template(tokenizer, items, generation, chat_template=template)

    text, spans = _render_with_reply_spans(chat, render, add_generation_prompt)
    eos = _special(tokenizer, "eos_token")
    if add_generation_prompt or not eos:
        return RenderedConversation(text, spans, len(text) if add_generation_prompt else None, add_special_tokens=True)
    out = _Builder()
    previous = 0
    for start, end in spans:
        out.add(text[previous:start])
        ends_with_eos = text[end:].lstrip().startswith(eos)
        out.add(text[start:end] if ends_with_eos else text[start:end] + eos, learned=True)
        previous = end
    out.add(text[previous:])
    return out.build(add_special_tokens=True)


TEMPLATES: dict[str, Renderer] = {
    "vicuna_v1": render_vicuna_v1,
    "llama3": render_llama3,
    "chatml": render_chatml,
    "plain": render_plain,
    "tokenizer": render_tokenizer_chat_template,
    "processor": render_processor_chat_template,
}
"""Template registry: name → renderer. Add your own with :func:`register_template`."""


def register_template(name: str, renderer: Renderer) -> None:
    """Registers a conversation template under ``name`` (overwrites an existing one).

    Args:
        name: Name used as ``template=`` in :func:`encode_conversation` and the DataModule.
        renderer: Function ``(messages, tokenizer, system_prompt, add_generation_prompt) -> RenderedConversation``.
    """
    TEMPLATES[name] = renderer


def normalize_conversation(conversations: Sequence[dict[str, Any]]) -> list[Message]:
    """Validates a LLaVA (``from``/``value``) or OpenAI-style (``role``/``content``) turn list.

    Roles ``human``/``user`` and ``gpt``/``assistant`` must alternate, starting with a user turn (one optional
    leading ``system`` turn). At most one ``<image>`` placeholder is allowed, in a user turn; it is moved to the
    start of its turn as ``"<image>\\n"`` (as LLaVA does).

    Args:
        conversations: The ``conversations`` list of a LLaVA record.

    Returns:
        The normalized messages.

    Raises:
        BadSampleError: ``wrong_roles``, ``empty_text``, ``no_assistant_turn`` or ``bad_image_placeholder``.
    """
    if not isinstance(conversations, (list, tuple)) or not conversations:
        raise BadSampleError("no_assistant_turn", "empty conversation")
    messages: list[Message] = []
    placeholders = 0
    for index, turn in enumerate(conversations):
        if not isinstance(turn, dict):
            raise BadSampleError("wrong_roles", f"turn {index} is not an object")
        raw_role = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content"))
        role_key = str(raw_role).lower()
        if role_key in SYSTEM_ROLES and index == 0:
            role = "system"
        elif role_key in USER_ROLES:
            role = "user"
        elif role_key in ASSISTANT_ROLES:
            role = "assistant"
        else:
            raise BadSampleError("wrong_roles", f"turn {index} has role {raw_role!r}")
        if not isinstance(text, str):
            raise BadSampleError("empty_text", f"turn {index} has no text")
        count = text.count(DEFAULT_IMAGE_TOKEN)
        if count:
            if role != "user":
                raise BadSampleError("bad_image_placeholder", f"<image> in a {role} turn")
            placeholders += count
            text = DEFAULT_IMAGE_TOKEN + "\n" + text.replace(DEFAULT_IMAGE_TOKEN, "").strip()
        else:
            text = text.strip()
        if not text and role != "system":
            raise BadSampleError("empty_text", f"turn {index} is empty")
        messages.append(Message(role, text))
    if placeholders > 1:
        raise BadSampleError("bad_image_placeholder", f"{placeholders} <image> placeholders, at most 1 supported")
    dialogue = messages[1:] if messages[0].role == "system" else messages
    for index, message in enumerate(dialogue):
        expected = "user" if index % 2 == 0 else "assistant"
        if message.role != expected:
            raise BadSampleError("wrong_roles", f"turn {index} is {message.role}, expected {expected}")
    if not any(m.role == "assistant" for m in dialogue):
        raise BadSampleError("no_assistant_turn")
    return messages


def image_token_id(tokenizer: Any) -> int:
    """Returns the id of the ``<image>`` token, which must be a single special/added token of ``tokenizer``.

    Raises:
        ValueError: If the tokenizer has no ``<image>`` token (add it with
            ``tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})`` and resize the embeddings).
    """
    ids = tokenizer.encode(DEFAULT_IMAGE_TOKEN, add_special_tokens=False)
    if len(ids) != 1 or ids[0] == getattr(tokenizer, "unk_token_id", None):
        raise ValueError(
            f"the tokenizer has no single {DEFAULT_IMAGE_TOKEN!r} token (got ids {ids}); add it as a special token"
        )
    return ids[0]


def _tokenize_rendered(
    rendered: RenderedConversation, tokenizer: Any, end: int | None = None
) -> tuple[list[int], list[bool]]:
    """Tokenizes ``rendered.text[:end]`` as the template says and flags tokens that overlap a learned span.

    With ``split_at_image`` the ``<image>``-separated chunks are tokenized one by one (each with the tokenizer's
    special tokens when ``add_special_tokens``) and the BOS of every chunk but the first is dropped, exactly like
    LLaVA's ``tokenizer_image_token``; the ``<image>`` id goes between the chunks.
    """
    text = rendered.text if end is None else rendered.text[:end]
    if not rendered.split_at_image:
        return _tokenize_chunk(text, 0, rendered, tokenizer)
    image_id = image_token_id(tokenizer)
    bos_id = getattr(tokenizer, "bos_token_id", None)
    ids: list[int] = []
    learned: list[bool] = []
    start = 0
    for index, chunk in enumerate(text.split(DEFAULT_IMAGE_TOKEN)):
        chunk_ids, chunk_learned = _tokenize_chunk(chunk, start, rendered, tokenizer)
        if index > 0:
            ids.append(image_id)
            learned.append(False)
            if rendered.add_special_tokens and chunk_ids and chunk_ids[0] == bos_id and ids[0] == bos_id:
                chunk_ids, chunk_learned = chunk_ids[1:], chunk_learned[1:]
        ids += chunk_ids
        learned += chunk_learned
        start += len(chunk) + len(DEFAULT_IMAGE_TOKEN)
    return ids, learned


def _tokenize_chunk(
    chunk: str, start: int, rendered: RenderedConversation, tokenizer: Any
) -> tuple[list[int], list[bool]]:
    """Ids of ``chunk`` (at character ``start`` of the rendered text) and whether each lies in a learned span.

    A token is learned when its non-whitespace characters overlap a learned span, so " a" starting before a reply
    counts as part of the reply; a whitespace-only token is learned when it lies inside one (e.g. the space between
    ``ASSISTANT:`` and the reply, which the model must generate after the generation prompt). Special tokens the
    tokenizer adds (BOS) are never learned.
    """
    encoding = tokenizer(chunk, add_special_tokens=rendered.add_special_tokens, return_offsets_mapping=True)
    ids: list[int] = list(encoding["input_ids"])
    spans = rendered.learned_spans
    learned: list[bool] = []
    for raw_start, raw_stop in encoding["offset_mapping"]:
        if rendered.add_special_tokens and raw_start == raw_stop:  # added by the tokenizer, not in the text
            learned.append(False)
            continue
        first, stop = raw_start, raw_stop
        while first < stop and chunk[first].isspace():
            first += 1
        while stop > first and chunk[stop - 1].isspace():
            stop -= 1
        if first < stop:
            learned.append(any(start + first < s_end and start + stop > s_start for s_start, s_end in spans))
        else:
            learned.append(any(s_start <= start + raw_start and start + raw_stop <= s_end for s_start, s_end in spans))
    return ids, learned


def _get_renderer(template: str) -> Renderer:
    try:
        return TEMPLATES[template]
    except KeyError:
        raise ValueError(f"unknown template {template!r}; known: {sorted(TEMPLATES)}") from None


def _expand_image_tokens(
    ids: list[int], learned: list[bool], image_id: int, num_image_tokens: int, expected_images: int
) -> tuple[list[int], list[bool], int]:
    """Replaces each ``<image>`` id by ``num_image_tokens`` copies; returns ids, flags and the end of the image."""
    positions = [i for i, token in enumerate(ids) if token == image_id]
    if len(positions) != expected_images:
        raise BadSampleError(
            "bad_image_placeholder", f"{expected_images} <image> in text but {len(positions)} <image> tokens"
        )
    if not positions:
        return ids, learned, 0
    pos = positions[0]
    ids = ids[:pos] + [image_id] * num_image_tokens + ids[pos + 1 :]
    learned = learned[:pos] + [False] * num_image_tokens + learned[pos + 1 :]
    return ids, learned, pos + num_image_tokens


def encode_conversation(
    conversations: Sequence[dict[str, Any]],
    tokenizer: Any,
    template: str = "vicuna_v1",
    num_image_tokens: int = 576,
    max_length: int | None = None,
    system_prompt: str | None = None,
) -> dict[str, torch.Tensor]:
    """Turns a LLaVA conversation into ``input_ids`` and ``labels`` for causal-LM training.

    A trailing user turn without a reply is dropped. Over-long samples are truncated on the right; truncation never
    cuts through the image tokens (such samples raise ``BadSampleError("image_tokens_truncated")``), and a
    truncation that leaves no learned token raises ``BadSampleError("no_target_after_truncation")``.

    Args:
        conversations: Turns as in the LLaVA JSON (``from``: human/gpt, ``value``), or ``role``/``content`` dicts.
        tokenizer: A fast Hugging Face tokenizer that has an ``<image>`` special token.
        template: Template name from :data:`TEMPLATES`.
        num_image_tokens: Visual tokens per image (576 for ViT-L/14 at 336 px).
        max_length: Maximum sequence length after image expansion; ``None`` for no limit.
        system_prompt: Overrides the template's default system prompt (a leading ``system`` turn wins over both).

    Returns:
        ``{"input_ids": LongTensor (L,), "labels": LongTensor (L,)}``; labels are ``-100`` except on assistant
        replies and their end token.

    Raises:
        BadSampleError: Invalid conversation (see :func:`normalize_conversation`) or truncation problems.
    """
    messages = normalize_conversation(conversations)
    if messages[-1].role == "user":
        messages = messages[:-1]
    rendered = _get_renderer(template)(messages, tokenizer, system_prompt, False)
    image_count = int(any(DEFAULT_IMAGE_TOKEN in m.text for m in messages if m.role == "user"))
    if template == "plain":
        image_count = int(DEFAULT_IMAGE_TOKEN in rendered.text)
    ids, learned = _tokenize_rendered(rendered, tokenizer)
    ids, learned, image_end = _expand_image_tokens(
        ids, learned, image_token_id(tokenizer), num_image_tokens, image_count
    )
    if max_length is not None and len(ids) > max_length:
        if image_end > max_length:
            raise BadSampleError("image_tokens_truncated", f"image tokens end at {image_end} > {max_length}")
        ids, learned = ids[:max_length], learned[:max_length]
        if not any(learned):
            raise BadSampleError("no_target_after_truncation", f"no reply left within {max_length} tokens")
    input_ids = torch.tensor(ids, dtype=torch.long)
    labels = torch.where(torch.tensor(learned, dtype=torch.bool), input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    return {"input_ids": input_ids, "labels": labels}


def encode_prompt(
    conversations: Sequence[dict[str, Any]],
    tokenizer: Any,
    template: str = "vicuna_v1",
    num_image_tokens: int = 576,
    max_length: int | None = None,
    system_prompt: str | None = None,
) -> dict[str, torch.Tensor]:
    """Encodes the prompt for generating the reply to the last user turn.

    The final assistant reply (if present) is dropped; the result ends with the assistant role header, e.g.
    ``"... USER: <image>\\nWhat is it? ASSISTANT:"`` for ``vicuna_v1``. Earlier replies stay in the prompt.

    Args:
        conversations: Turns as in :func:`encode_conversation`; may end with the user turn to answer.
        tokenizer: A fast Hugging Face tokenizer that has an ``<image>`` special token.
        template: Template name from :data:`TEMPLATES`.
        num_image_tokens: Visual tokens per image.
        max_length: If set and the prompt is longer, raises ``BadSampleError("prompt_too_long")``.
        system_prompt: Overrides the template's default system prompt.

    Returns:
        ``{"input_ids": LongTensor (L,)}``.
    """
    messages = normalize_prompt_conversation(conversations)
    if messages[-1].role == "assistant":
        messages = messages[:-1]
    rendered = _get_renderer(template)(messages, tokenizer, system_prompt, True)
    image_count = int(DEFAULT_IMAGE_TOKEN in rendered.text[: rendered.generation_prompt_end])
    ids, learned = _tokenize_rendered(rendered, tokenizer, end=rendered.generation_prompt_end)
    ids, _, _ = _expand_image_tokens(ids, learned, image_token_id(tokenizer), num_image_tokens, image_count)
    if max_length is not None and len(ids) > max_length:
        raise BadSampleError("prompt_too_long", f"prompt has {len(ids)} > {max_length} tokens")
    return {"input_ids": torch.tensor(ids, dtype=torch.long)}


def normalize_prompt_conversation(conversations: Sequence[dict[str, Any]]) -> list[Message]:
    """Like :func:`normalize_conversation` but also accepts a single user turn (a bare question)."""
    try:
        return normalize_conversation(conversations)
    except BadSampleError as error:
        if error.kind != "no_assistant_turn" or not conversations:
            raise
        padded = list(conversations) + [{"from": "gpt", "value": "-"}]
        return normalize_conversation(padded)[:-1]
