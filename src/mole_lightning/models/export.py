"""Write a trained :class:`LlavaMoLE` in the formats other tools load: ``mole``, ``peft`` and merged ``llava-hf``.

- ``mole`` (:func:`save_adapters`, any K): this package's adapter folder, loaded by
  ``load_llava_hf(base, adapter=folder)`` or ``load_adapters(model, folder)``.
- ``peft`` (K = 1): ``adapter_config.json`` + ``adapter_model.safetensors`` in peft's own layout for a llava-hf
  base (``PeftModel.from_pretrained(LlavaForConditionalGeneration..., folder)``); the trained projector and the
  module of any other tensor trained by hand (a layer norm, a vision-tower weight) are peft ``modules_to_save``
  entries, written whole as peft saves them.
- ``llava-hf`` (:func:`save_llava_hf`): a ``LlavaForConditionalGeneration`` folder (config, safetensors, tokenizer,
  ``LlavaProcessor`` files) that transformers, vLLM and SGLang load; plain LoRA (K = 1) is merged into the base
  weights, ``W + (alpha / r) (A B)^T``. Routed experts (K > 1) cannot be merged: routing is per token. Its
  processor's chat template (:func:`llava_hf_chat_template`) renders llava-hf content lists as the run's
  ``data.template`` rendered training prompts, token for token.
- ``write_base`` (any K): the frozen base as llava-hf, without LoRA, expert or router tensors.

What each format holds of the trained state is :func:`~mole_lightning.models.trainable.trainable_state_dict`'s
set (the parameters that require grad); a tensor trained by hand that a format has no place for is refused with an
:class:`ExportError` naming it, never dropped.

A model over a 4-bit base (QLoRA) exports its adapter (``mole``, ``peft`` with ``base``); ``llava-hf`` and
``write_base`` are refused: they would write the 4-bit weights, not the full-precision base the adapter belongs on.

:func:`export_model` writes any of them atomically (temporary folder renamed into place) and never overwrites a
non-empty folder unless asked.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import LlavaConfig

from mole_lightning.constants import DEFAULT_IMAGE_TOKEN
from mole_lightning.data.templates import (
    CHATML_SYSTEM,
    LLAMA3_SYSTEM,
    VICUNA_V1_SYSTEM,
    _special,
    encode_prompt,
    processor_chat_template,
)
from mole_lightning.models.llava_mole import LlavaMoLE
from mole_lightning.models.loading import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, save_adapters
from mole_lightning.models.projector import MLPProjector, projector_name
from mole_lightning.models.trainable import trainable_state_dict
from mole_lightning.models.vision import HFVisionTower, _encoder_layers, _has_cls
from mole_lightning.peft.layers import LoRALinear, MoLELinear
from mole_lightning.peft.quantization import is_quantized
from mole_lightning.peft.router import MoLERouter

EXPORT_FORMATS = ("mole", "peft", "llava-hf")
BASE_DIR_NAME = "base"
"""Sub-folder of an export that holds the llava-hf base written with ``write_base=True``."""


class ExportError(ValueError):
    """The model cannot be written in the asked format; the message says why."""


# ---------------------------------------------------------------------------------------------------------- LoRA
def lora_modules(model: LlavaMoLE) -> dict[str, Any]:
    """Plain-LoRA layers of the language model by module path (``model.layers.0.self_attn.q_proj``).

    Raises:
        ExportError: the model has routed experts (K > 1), which have no single LoRA per projection.
    """
    modules = dict(model.language_model.named_modules())
    routed = [name for name, module in modules.items() if isinstance(module, MoLELinear)]
    if routed:
        k = model.mole_config.num_experts
        raise ExportError(
            f"the model is a MoLE with K={k} experts per MLP projection (e.g. {routed[0]}): routing is per token, so "
            "the experts cannot be merged into the weights or written as one LoRA (llava-hf merge=True, peft); export "
            "them with to='mole' (add write_base=True for a llava-hf base without them)"
        )
    return {name: module for name, module in modules.items() if isinstance(module, LoRALinear)}


def adapter_tensor_names(model: LlavaMoLE) -> set[str]:
    """Names in ``model.language_model.state_dict()`` of every adapter tensor: LoRA / expert ``lora_A``,
    ``lora_B`` (plain or routed layers) and the routers' ``weight`` / ``bias`` (any K)."""
    names: set[str] = set()
    for path, module in model.language_model.named_modules():
        if isinstance(module, (LoRALinear, MoLELinear)):
            names.update(f"{path}.{p}" for p in module.adapter_parameter_names())
        elif isinstance(module, MoLERouter):
            names.update(f"{path}.{key}" for key in module.state_dict())
    return names


def merged_weight(layer: Any) -> torch.Tensor:
    """``W + (alpha / r) (A B)^T`` of a ``LoRALinear`` (A ``(d_in, r)``, B ``(r, d_out)``), computed in float32 and
    returned in the base weight's dtype, shape ``(d_out, d_in)``."""
    delta = (layer.lora_A.detach().float() @ layer.lora_B.detach().float()).T * layer.scaling  # (d_out, d_in)
    return (layer.weight.detach().float() + delta).to(layer.weight.dtype)


# ------------------------------------------------------------------------------------------------------ llava-hf
def _hf_tower(model: LlavaMoLE) -> HFVisionTower:
    if not isinstance(model.vision_tower, HFVisionTower):
        raise ExportError(
            f"a {type(model.vision_tower).__name__} cannot be written as llava-hf (transformers' LlavaForConditional"
            "Generation holds a transformers CLIP/SigLIP tower); build the model with vision='hf', or export with "
            "to='mole'"
        )
    return model.vision_tower


def _check_projector(model: LlavaMoLE) -> MLPProjector:
    if projector_name(model.projector) != "mlp2x_gelu":
        raise ExportError(
            f"llava-hf holds an mlp2x_gelu projector (linear_1, gelu, linear_2); this model has "
            f"{projector_name(model.projector)!r}: export with to='mole'"
        )
    return model.projector


def llava_hf_config(model: LlavaMoLE) -> Any:
    """The ``LlavaConfig`` of the model: vision config with the layers the tower kept, the LLM config, image token,
    feature layer (counted from the end of the kept layers) and ``"default"`` (drop CLS) or ``"full"``."""
    tower = _hf_tower(model)
    projector = _check_projector(model)
    vision_config = copy.deepcopy(tower.model.config)
    num_layers = len(_encoder_layers(tower.model))
    vision_config.num_hidden_layers = num_layers  # layers after the feature layer may have been pruned
    if hasattr(vision_config, "vision_use_head"):  # SigLIP: the pooling head is dropped with pruning
        vision_config.vision_use_head = bool(getattr(tower.model, "use_head", False))
    text_config = copy.deepcopy(model.language_model.config)
    text_config.vocab_size = model.language_model.get_input_embeddings().weight.shape[0]
    return LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=model.image_token_id,
        image_seq_length=model.num_image_tokens,
        vision_feature_layer=tower.hidden_index - (num_layers + 1),
        vision_feature_select_strategy="default" if tower.num_prefix_tokens else "full",
        projector_hidden_act="gelu",
        multimodal_projector_bias=projector[0].bias is not None,
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
        dtype=model.language_model.get_input_embeddings().weight.dtype,
    )


_HF_PROJECTOR_LAYERS = {"0": "linear_1", "2": "linear_2"}


def llava_hf_name(model: LlavaMoLE, name: str) -> str | None:
    """``LlavaForConditionalGeneration``'s name of an entry of ``model.state_dict()``: ``vision_tower.model.*`` →
    ``model.vision_tower.*``, ``projector.{0,2}.*`` → ``model.multi_modal_projector.linear_{1,2}.*``,
    ``language_model.<base prefix>.*`` → ``model.language_model.*``, ``language_model.lm_head.*`` → ``lm_head.*``;
    ``None`` for entries llava-hf has no place for (``token_rows.*``, written into the embeddings instead)."""
    lm_prefix = f"language_model.{model.language_model.base_model_prefix}."
    if name.startswith("vision_tower.model."):
        return f"model.vision_tower.{name[len('vision_tower.model.') :]}"
    if name.startswith("projector."):
        index, _, rest = name[len("projector.") :].partition(".")
        return (
            f"model.multi_modal_projector.{_HF_PROJECTOR_LAYERS[index]}.{rest}"
            if index in _HF_PROJECTOR_LAYERS
            else None
        )
    if name.startswith(lm_prefix):
        return f"model.language_model.{name[len(lm_prefix) :]}"
    if name.startswith("language_model."):
        return name[len("language_model.") :]  # lm_head
    return None


def llava_hf_state_dict(model: LlavaMoLE, *, merge: bool) -> dict[str, torch.Tensor]:
    """Tensors under ``LlavaForConditionalGeneration`` names (:func:`llava_hf_name`: ``model.vision_tower.*``,
    ``model.multi_modal_projector.linear_{1,2}.*``, ``model.language_model.*``, ``lm_head.*``), every base tensor with
    its current value (tensors trained by hand included) and the trained token rows in the embeddings.

    Args:
        merge: fold plain LoRA into the base weights; ``False`` keeps only the base weights: every LoRA, expert and
            router tensor is dropped (any K).

    Raises:
        ExportError: routed experts (K > 1) with ``merge``, an ``open_clip`` tower, a projector llava-hf cannot
            hold, or a state entry with no llava-hf name.
    """
    _hf_tower(model)
    _check_projector(model)
    layers = lora_modules(model) if merge else {}  # without merging, routed layers (K > 1) are fine: dropped below
    adapter_names = {f"language_model.{name}" for name in adapter_tensor_names(model)}
    rows = {f"language_model.{k}": v for k, v in model.merged_embedding_state().items()}  # trained token rows
    state = {}
    for key, value in model.state_dict().items():
        if key in adapter_names or key.startswith("token_rows."):
            continue
        hf_name = llava_hf_name(model, key)
        if hf_name is None:
            raise ExportError(f"{key} has no place in a llava-hf folder; export with to='mole'")
        state[hf_name] = rows.get(key, value)
    if merge:
        for name, layer in layers.items():
            state[llava_hf_name(model, f"language_model.{name}.weight")] = merged_weight(layer)
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


# ------------------------------------------------------------------------------------------------ chat template
CHAT_TEMPLATES = ("vicuna_v1", "llama3", "chatml", "plain", "tokenizer", "processor")
"""``data.template`` values a llava-hf export can ship a chat template for (see :func:`llava_hf_chat_template`)."""


def _jinja_string(text: str) -> str:
    """``text`` as a Jinja string literal (Jinja decodes JSON's escapes)."""
    return json.dumps(text, ensure_ascii=False)


def _content_macro(image_text: str) -> str:
    """Jinja macro ``mole_content(content)``: a message's content as the string training saw.

    A llava-hf content list (``[{"type": "image"}, {"type": "text", "text": q}]``) becomes ``image_text`` (once per
    image, first, where training moves the placeholder) followed by its texts joined by spaces and stripped; a
    string content is stripped (:func:`~mole_lightning.data.templates.normalize_conversation`).
    """
    return (
        "{%- macro mole_content(content) -%}{%- if content is string -%}{{ content | trim }}{%- else -%}"
        "{%- for item in content if item['type'] == 'image' -%}{{ " + _jinja_string(image_text) + " }}{%- endfor -%}"
        "{{ content | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') | trim }}"
        "{%- endif -%}{%- endmacro -%}"
    )


def _system_prelude(system_prompt: str | None, as_list: bool) -> str:
    """Jinja that puts ``system_prompt`` first when the conversation has no system message (the run's
    ``data.system_prompt``); its content is a content list for processor templates, else a string."""
    if system_prompt is None:
        return ""
    text = _jinja_string(system_prompt)
    content = "[{'type': 'text', 'text': " + text + "}]" if as_list else text
    return (
        "{%- if not messages or messages[0]['role'] != 'system' -%}"
        "{%- set messages = [{'role': 'system', 'content': " + content + "}] + messages -%}{%- endif %}"
    )


def _system_choice(default: str) -> str:
    """Jinja setting ``mole_system``: the leading system message's text, else ``default`` (the run's system prompt
    or the template's own)."""
    return (
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set mole_system = mole_content(messages[0]['content']) -%}"
        "{%- else -%}{%- set mole_system = " + _jinja_string(default) + " -%}{%- endif -%}"
    )


def _turns(user: str, assistant: str, generation: str) -> str:
    """Jinja rendering every non-system message with ``user`` / ``assistant`` (Jinja expressions of ``text``) and,
    with ``add_generation_prompt``, the literal ``generation``."""
    return (
        "{%- for message in messages if message['role'] != 'system' -%}"
        "{%- set text = mole_content(message['content']) -%}"
        "{%- if message['role'] == 'user' -%}{{ " + user + " }}{%- else -%}{{ " + assistant + " }}{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ " + _jinja_string(generation) + " }}{%- endif -%}"
    )


def _vicuna_template(image_text: str, system_prompt: str | None, tokenizer: Any) -> str:
    """:func:`~mole_lightning.data.templates.render_vicuna_v1` in Jinja:
    ``{system} USER: <image>\\n{q} ASSISTANT: {a}</s>USER: {q2} ASSISTANT:``."""
    eos = _jinja_string(_special(tokenizer, "eos_token", "</s>"))
    return (
        _content_macro(image_text)
        + _system_choice(VICUNA_V1_SYSTEM if system_prompt is None else system_prompt)
        + "{{ mole_system + ' ' }}"
        + _turns("'USER: ' + text + ' '", "'ASSISTANT: ' + text + " + eos, "ASSISTANT:")
    )


def _chatml_template(image_text: str, system_prompt: str | None, tokenizer: Any) -> str:
    """:func:`~mole_lightning.data.templates.render_chatml` in Jinja: ``<|im_start|>role\\n{text}<|im_end|>\\n``."""
    block = "'<|im_start|>' + message['role'] + '\\n' + text + '<|im_end|>\\n'"
    return (
        _content_macro(image_text)
        + _system_choice(CHATML_SYSTEM if system_prompt is None else system_prompt)
        + "{%- if mole_system -%}{{ '<|im_start|>system\\n' + mole_system + '<|im_end|>\\n' }}{%- endif -%}"
        + _turns(block, block, "<|im_start|>assistant\n")
    )


def _llama3_template(image_text: str, system_prompt: str | None, tokenizer: Any) -> str:
    """:func:`~mole_lightning.data.templates.render_llama3` in Jinja: BOS, then
    ``<|start_header_id|>role<|end_header_id|>\\n\\n{text}<|eot_id|>`` blocks."""
    block = "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + text + '<|eot_id|>'"
    return (
        _content_macro(image_text)
        + _system_choice(LLAMA3_SYSTEM if system_prompt is None else system_prompt)
        + "{{ "
        + _jinja_string(_special(tokenizer, "bos_token"))
        + " }}"
        + "{%- if mole_system -%}"
        "{{ '<|start_header_id|>system<|end_header_id|>\\n\\n' + mole_system + '<|eot_id|>' }}{%- endif -%}"
        + _turns(block, block, "<|start_header_id|>assistant<|end_header_id|>\n\n")
    )


def _plain_template(image_text: str, system_prompt: str | None, tokenizer: Any) -> str:
    """:func:`~mole_lightning.data.templates.render_plain` in Jinja: the first user message's image placeholder
    only (stage-1 captioning drops the question); the model continues with a caption."""
    return (
        "{%- for message in messages if message['role'] == 'user' -%}{%- if loop.first -%}"
        "{%- for item in message['content'] if item is not string and item['type'] == 'image' -%}"
        "{{ " + _jinja_string(image_text) + " }}{%- endfor -%}"
        "{%- if message['content'] is string and " + _jinja_string(image_text) + " in message['content'] -%}"
        "{{ " + _jinja_string(image_text) + " }}{%- endif -%}"
        "{%- endif -%}{%- endfor -%}"
    )


def _flattening_template(image_token: str, template: str, system_prompt: str | None) -> str:
    """A text-only chat template (the tokenizer's own) behind a prelude that turns each message's content list into
    the string training gave it (``"<image>\\n" + text``); the template itself is unchanged."""
    return (
        _system_prelude(system_prompt, as_list=False)
        + _content_macro(image_token + "\n")
        + "{%- set mole = namespace(messages=[]) -%}{%- for message in messages -%}"
        "{%- set mole.messages = mole.messages + [dict(message, content=mole_content(message['content']))] -%}"
        "{%- endfor -%}{%- set messages = mole.messages %}" + template
    )


PROBE_CONVERSATIONS = (
    [{"from": "human", "value": "<image>\nWhat is in the picture?"}],
    [{"from": "human", "value": "What color is the circle?"}],
    [
        {"from": "human", "value": "<image>\nWhat color is the circle?"},
        {"from": "gpt", "value": "It is blue."},
        {"from": "human", "value": "How many shapes are there?"},
    ],
)
"""Conversations a shipped chat template is checked on: image + question, text only, two turns."""


def as_content_lists(conversation: list[dict[str, str]]) -> list[dict[str, Any]]:
    """LLaVA turns (``from``/``value``, ``<image>`` in the text) as llava-hf messages with content lists
    (``[{"type": "image"}, {"type": "text", "text": ...}]``), the input of a processor's ``apply_chat_template``."""
    messages = []
    for turn in conversation:
        text = turn["value"]
        content: list[dict[str, str]] = []
        if DEFAULT_IMAGE_TOKEN in text:
            content.append({"type": "image"})
            text = text.replace(DEFAULT_IMAGE_TOKEN, "").strip()
        content.append({"type": "text", "text": text})
        role = {"human": "user", "gpt": "assistant"}.get(turn["from"], turn["from"])
        messages.append({"role": role, "content": content})
    return messages


def processor_prompt_ids(template: str, tokenizer: Any, conversation: list[dict[str, str]]) -> list[int]:
    """Ids of a generation prompt as ``LlavaProcessor.apply_chat_template(..., tokenize=True)`` makes them with
    ``template``, one ``<image>`` id per image: the rendered text, tokenized with the tokenizer's special tokens
    unless it starts with BOS."""
    text = tokenizer.apply_chat_template(
        as_content_lists(conversation), chat_template=template, tokenize=False, add_generation_prompt=True
    )
    bos = getattr(tokenizer, "bos_token", None)
    return list(tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"])


def _renders_as_trained(template: str, tokenizer: Any, data_template: str, system_prompt: str | None) -> bool:
    """Whether ``template`` gives, on every :data:`PROBE_CONVERSATIONS`, the ids of
    :func:`~mole_lightning.data.templates.encode_prompt` with ``data_template``."""
    for conversation in PROBE_CONVERSATIONS:
        expected = encode_prompt(
            conversation, tokenizer, data_template, num_image_tokens=1, system_prompt=system_prompt
        )["input_ids"].tolist()
        try:
            if processor_prompt_ids(template, tokenizer, conversation) != expected:
                return False
        except Exception:  # jinja2 raises TypeError, UndefinedError, TemplateError... on a template it cannot run
            return False
    return True


def llava_hf_chat_template(
    tokenizer: Any, data_template: str = "vicuna_v1", system_prompt: str | None = None, image_token: str | None = None
) -> str:
    """The processor chat template to ship for a model trained with ``data.template = data_template``.

    It renders llava-hf content lists and puts ``<image>`` where training did, so that
    ``LlavaProcessor.apply_chat_template`` gives, token for token, the generation prompt of
    :func:`~mole_lightning.data.templates.encode_prompt` (checked on :data:`PROBE_CONVERSATIONS`):

    - ``vicuna_v1``: LLaVA-1.5's ``{system} USER: <image>\\n{q} ASSISTANT:`` with the run's system prompt. Training
      tokenizes each ``<image>``-separated chunk on its own (LLaVA's ``tokenizer_image_token``), so a SentencePiece
      tokenizer with ``legacy: false`` puts a ``▁`` before the ``\\n`` that whole-text tokenization does not; the
      template then writes ``"<image> \\n"``, which the processor tokenizes to the trained ids.
    - ``llama3``, ``chatml``: their blocks with the run's (or the template's default) system prompt.
    - ``plain`` (stage-1 captioning): the image placeholder only; the model continues with a caption.
    - ``processor``: the tokenizer folder's processor template (``chat_template.json`` / ``.jinja``).
    - ``tokenizer``: the tokenizer's own Jinja template behind a prelude turning content lists into the strings
      training gave it (``"<image>\\n{q}"``).

    Args:
        system_prompt: the run's ``data.system_prompt`` (``None``: the template's default).
        image_token: the tokenizer's image token (default ``<image>``).

    Raises:
        ExportError: an unknown template, a ``processor``/``tokenizer`` template the tokenizer lacks, or a template
            whose processor prompt differs from training's (e.g. a tokenizer that adds BOS to a template without it).
    """
    image_token = image_token or DEFAULT_IMAGE_TOKEN
    if data_template in _RENDERED_TEMPLATES:
        build = _RENDERED_TEMPLATES[data_template]
        # what follows <image>: the "\n" training puts there; vicuna_v1 may need " \n" (see above); plain drops it
        separators = {"vicuna_v1": ("\n", " \n"), "plain": ("",)}.get(data_template, ("\n",))
        candidates = [build(image_token + sep, system_prompt, tokenizer) for sep in separators]
    elif data_template == "processor":
        try:
            candidates = [_system_prelude(system_prompt, as_list=True) + processor_chat_template(tokenizer)]
        except ValueError as error:
            raise ExportError(str(error)) from None
    elif data_template == "tokenizer":
        own = getattr(tokenizer, "chat_template", None)
        if not isinstance(own, str) or not own:
            raise ExportError("data.template 'tokenizer' needs a tokenizer with a chat_template to ship")
        candidates = [_flattening_template(image_token, own, system_prompt)]
    else:
        raise ExportError(
            f"unknown data.template {data_template!r} for the llava-hf chat template; expected one of {CHAT_TEMPLATES}"
        )
    for template in candidates:
        if _renders_as_trained(template, tokenizer, data_template, system_prompt):
            return template
    raise ExportError(
        f"the processor's apply_chat_template cannot reproduce the {data_template!r} prompts training used with this "
        "tokenizer; export with to='mole'"
    )


_RENDERED_TEMPLATES = {
    "vicuna_v1": _vicuna_template,
    "llama3": _llama3_template,
    "chatml": _chatml_template,
    "plain": _plain_template,
}
"""Built-in templates written as Jinja here (``processor`` and ``tokenizer`` reuse the tokenizer's templates)."""


def default_chat_template_name(tokenizer: Any) -> str:
    """``processor`` when the tokenizer's folder holds a processor chat template (a llava-hf model), else
    ``vicuna_v1`` (the data module's default)."""
    try:
        processor_chat_template(tokenizer)
    except ValueError:
        return "vicuna_v1"
    return "processor"


def llava_hf_processor(model: LlavaMoLE, template: str | None = None, system_prompt: str | None = None) -> Any:
    """``LlavaProcessor``: the model's tokenizer, a ``CLIPImageProcessor`` with the tower's size, mean and std
    (resize shortest edge, centre crop), the patch size, feature strategy, extra tokens (CLS) and the chat template
    of the run's ``data.template`` / ``data.system_prompt`` (:func:`llava_hf_chat_template`; ``template=None``:
    :func:`default_chat_template_name`)."""
    from transformers import CLIPImageProcessor, LlavaProcessor  # heavy (~0.5 s): image processing, modeling_utils

    tower = _hf_tower(model)
    if model.tokenizer is None:
        raise ExportError("the model has no tokenizer to write with the llava-hf processor")
    size = tower.image_size
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=list(tower.image_mean),
        image_std=list(tower.image_std),
    )
    has_cls = _has_cls(tower.model)
    image_token = model.tokenizer.convert_ids_to_tokens(model.image_token_id)
    template = template or default_chat_template_name(model.tokenizer)
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=model.tokenizer,
        patch_size=int(tower.model.config.patch_size),
        vision_feature_select_strategy="default" if tower.num_prefix_tokens else "full",
        chat_template=llava_hf_chat_template(model.tokenizer, template, system_prompt, image_token),
        image_token=image_token,
        num_additional_image_tokens=1 if has_cls else 0,
    )


def save_llava_hf(
    model: LlavaMoLE,
    directory: str | os.PathLike,
    *,
    merge: bool,
    template: str | None = None,
    system_prompt: str | None = None,
) -> Path:
    """Write a ``LlavaForConditionalGeneration`` folder: ``config.json``, ``generation_config.json``,
    ``model.safetensors`` (sharded when large), tokenizer and processor files.

    Args:
        merge: fold plain LoRA into the weights (needed when the model has adapters; ``False`` writes the frozen
            base with the trained projector and token rows, e.g. as the base of a peft or mole export; any K).
        template, system_prompt: the run's ``data.template`` and ``data.system_prompt``, for the processor's chat
            template (:func:`llava_hf_processor`).

    Raises:
        ExportError: K > 1 with ``merge``, an ``open_clip`` tower, a projector other than ``mlp2x_gelu``, a state
            dict that does not fill the llava-hf model exactly, or no chat template for ``template``.
    """
    from transformers import LlavaForConditionalGeneration  # heavy: loads transformers.modeling_utils

    config = llava_hf_config(model)
    processor = llava_hf_processor(model, template, system_prompt)  # before the weights: refuse early
    state = llava_hf_state_dict(model, merge=merge)
    with torch.device("meta"):
        hf = LlavaForConditionalGeneration(config)
    expected = set(hf.state_dict())
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        expected.discard("lm_head.weight")
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ExportError(f"llava-hf mapping incomplete: missing {missing[:5]}, unexpected {unexpected[:5]}")
    hf.load_state_dict(state, strict=not config.tie_word_embeddings, assign=True)
    if config.tie_word_embeddings:
        hf.tie_weights()
    hf.generation_config = copy.deepcopy(model.language_model.generation_config)
    directory = Path(directory)
    hf.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


# ---------------------------------------------------------------------------------------------------------- peft
def peft_saved_modules(model: LlavaMoLE) -> dict[str, str]:
    """The modules a peft export keeps whole (``modules_to_save``): for every trained tensor that is no LoRA
    ``lora_A``/``lora_B`` nor a token row, its module, as ``{peft modules_to_save entry: our module path}``.

    The projector is ``multi_modal_projector``; any other module its full llava-hf path (peft matches entries as
    module-name suffixes, so the path names exactly that module).

    Raises:
        ExportError: a trained tensor peft cannot hold (the base weight or bias of a LoRA layer, which peft keeps
            frozen, or a tensor llava-hf has no name for).
    """
    lora = {f"language_model.{name}": layer for name, layer in lora_modules(model).items()}
    saved: dict[str, str] = {}
    for name in trainable_state_dict(model):
        path, _, leaf = name.rpartition(".")
        if name.startswith("token_rows.") or (path in lora and leaf in ("lora_A", "lora_B")):
            continue
        if path in lora:
            raise ExportError(
                f"{name} is trained, and a peft folder keeps the base weights of its LoRA layers frozen: export "
                "with to='mole', or to='llava-hf' with merge=True"
            )
        if name.startswith("projector."):
            saved["multi_modal_projector"] = "projector"
            continue
        hf_name = llava_hf_name(model, name)
        if hf_name is None:
            raise ExportError(f"{name} is trained and has no place in a peft folder for a llava-hf base; export with "
                              "to='mole'")  # fmt: skip
        saved[hf_name.rpartition(".")[0]] = path
    return saved


def peft_state_dict(model: LlavaMoLE) -> dict[str, torch.Tensor]:
    """peft's adapter keys for a llava-hf base: ``base_model.model.model.language_model.<path>.lora_A.weight``
    ``(r, d_in)`` and ``lora_B.weight`` ``(d_out, r)`` (our A and B transposed) of the trained LoRA tensors, plus
    the whole state of each :func:`peft_saved_modules` module under its llava-hf name, e.g. the projector as
    ``base_model.model.model.multi_modal_projector.linear_{1,2}.*``."""
    _check_projector(model)
    lora = {f"language_model.{name}": name for name in lora_modules(model)}
    trained = trainable_state_dict(model)
    frozen = [f"{path}.{leaf}" for path in lora for leaf in ("lora_A", "lora_B") if f"{path}.{leaf}" not in trained]
    if frozen:  # peft would load its own initialisation in their place
        raise ExportError(
            f"{frozen[0]} is frozen ({len(frozen)} LoRA tensor(s) without requires_grad), and a peft folder holds "
            "every LoRA tensor of its target modules: export with to='mole', or to='llava-hf' with merge=True"
        )
    state: dict[str, torch.Tensor] = {}
    for name, value in trained.items():
        path, _, leaf = name.rpartition(".")
        if path in lora and leaf in ("lora_A", "lora_B"):
            module = llava_hf_name(model, f"{path}.weight").removesuffix(".weight")
            state[f"base_model.model.{module}.{leaf}.weight"] = value.T
    for path in peft_saved_modules(model).values():
        for key, value in model.get_submodule(path).state_dict().items():
            state[f"base_model.model.{llava_hf_name(model, f'{path}.{key}')}"] = value
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def peft_config(model: LlavaMoLE, base_model_name_or_path: str) -> dict[str, Any]:
    """peft's ``adapter_config.json`` (``LoraConfig``) for the model's LoRA: r, alpha, dropout, a regex of the
    language-model projections as ``target_modules`` (the vision tower's ``q_proj`` stay untouched) and the
    trained modules kept whole (:func:`peft_saved_modules`) as ``modules_to_save``."""
    config = model.mole_config
    names = sorted(set(config.attn_targets) | set(config.mlp_targets))
    own_mlp = (config.expert_rank, config.expert_alpha) != (config.rank, config.alpha)
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": config.rank,
        "lora_alpha": config.alpha,
        # MLP adapters at their own rank (the parameter-matched dense baseline); peft matches keys as name suffixes
        "rank_pattern": {name: config.expert_rank for name in config.mlp_targets} if own_mlp else {},
        "alpha_pattern": {name: config.expert_alpha for name in config.mlp_targets} if own_mlp else {},
        "lora_dropout": config.dropout,
        "target_modules": rf"model\.language_model\..*\.({'|'.join(names)})",
        "modules_to_save": list(peft_saved_modules(model)) or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "auto_mapping": {
            "base_model_class": "LlavaForConditionalGeneration",
            "parent_library": "transformers.models.llava.modeling_llava",
        },
    }


def save_peft(
    model: LlavaMoLE, directory: str | os.PathLike, base_model_name_or_path: str, *, token_rows_in_base: bool = False
) -> Path:
    """Write a peft LoRA folder (``adapter_config.json`` + ``adapter_model.safetensors``) for a llava-hf base.

    Args:
        token_rows_in_base: the base was written from this model, trained embedding rows included.

    Raises:
        ExportError: no LoRA (stage-1 model), K > 1, or trainable token rows (peft's base would lack them).
    """
    if model.mole_config is None:
        raise ExportError("the model has no LoRA adapters to write in peft format; export with to='llava-hf'")
    if model.token_row_start is not None and not token_rows_in_base:
        raise ExportError(
            "the model trains embedding rows of added tokens, which a peft LoRA folder does not hold: write the "
            "base with them (write_base=True) or export with to='mole'"
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(peft_state_dict(model), str(directory / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
    config = peft_config(model, base_model_name_or_path)
    (directory / ADAPTER_CONFIG_NAME).write_text(json.dumps(config, indent=2))
    return directory


# -------------------------------------------------------------------------------------------------------- export
def write_atomically(directory: str | os.PathLike, write: Callable[[Path], None], *, overwrite: bool = False) -> Path:
    """Run ``write(tmp)`` into a temporary folder beside ``directory``, then rename it into place.

    A failed write leaves ``directory`` untouched. An existing non-empty ``directory`` is replaced only with
    ``overwrite`` (the old folder is removed after the new one is in place).

    Raises:
        FileExistsError: ``directory`` is a file, or a non-empty folder without ``overwrite``.
    """
    directory = Path(directory).absolute()
    check_destination(directory, overwrite=overwrite)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        write(tmp)
        old = None
        if directory.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
            os.replace(directory, old / directory.name)
        os.replace(tmp, directory)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def check_destination(directory: str | os.PathLike, *, overwrite: bool) -> None:
    """Raise ``FileExistsError`` when ``directory`` is a file, or a non-empty folder and ``overwrite`` is off."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"output {str(directory)!r} exists and is not a folder")
    if directory.is_dir() and any(directory.iterdir()) and not overwrite:
        raise FileExistsError(f"output folder {str(directory)!r} is not empty; pass overwrite=True to replace it")


def export_model(
    model: LlavaMoLE,
    directory: str | os.PathLike,
    *,
    to: str = "mole",
    merge: bool = False,
    base: str | None = None,
    write_base: bool = False,
    overwrite: bool = False,
    extra_files: dict[str, str] | None = None,
    template: str | None = None,
    system_prompt: str | None = None,
) -> Path:
    """Write ``model`` to ``directory`` in format ``to`` (``"mole"``, ``"peft"`` or ``"llava-hf"``), atomically.

    Args:
        merge: ``llava-hf`` only: merge plain LoRA (K = 1) into the weights; required when the model has adapters.
        base: the llava-hf folder (or hub id) the ``mole``/``peft`` export refers to as ``base_model_name_or_path``;
            default: the folder the model was loaded from with ``load_llava_hf``, if any.
        write_base: write the frozen base (with the trained projector and token rows) as llava-hf into
            ``directory/base`` and refer to it (for models built from an LLM and a vision tower).
        overwrite: replace a non-empty ``directory``.
        extra_files: ``{file name: text}`` written beside the export (e.g. ``training_config.json``).
        template, system_prompt: the run's ``data.template`` (``vicuna_v1``, ``processor``, ``tokenizer``) and
            ``data.system_prompt``: the chat template of the llava-hf folder (``llava-hf`` or ``write_base``)
            renders prompts as training did; ``template=None``: :func:`default_chat_template_name`.

    Raises:
        ExportError: the model cannot be written in that format (K > 1 with merge, open_clip tower to llava-hf, no
            base for peft, llava-hf or write_base from a 4-bit base, ...).
    """
    if to not in EXPORT_FORMATS:
        raise ExportError(f"unknown export format {to!r}; expected one of {EXPORT_FORMATS}")
    if merge and to != "llava-hf":
        raise ExportError("merge=True applies to to='llava-hf' only")
    if to == "llava-hf" and model.mole_config is not None and not merge:
        raise ExportError(
            "llava-hf has no place for adapters: pass merge=True (K = 1), or export with to='peft' / 'mole'"
        )
    if to == "llava-hf" and write_base:
        raise ExportError("write_base=True applies to to='mole' / 'peft'")
    if base is not None and write_base:
        raise ExportError("pass either base or write_base=True, not both")
    if (to == "llava-hf" or write_base) and is_quantized(model.language_model):
        raise ExportError(
            "the language model is a 4-bit base (architecture.quantize): merging into it or writing it as llava-hf "
            "would ship 4-bit weights; export the adapter with to='mole', or to='peft' with base=DIR (the "
            "full-precision "
            "llava-hf base), and merge onto the full-precision base"
        )
    given = directory
    directory = Path(directory).absolute()
    if write_base:  # as the output folder was given: a relative export stays valid when its parent folder moves
        base = os.path.join(os.fspath(given), BASE_DIR_NAME)
    elif base is None:
        base = model.base_model_name_or_path
    if to == "peft" and base is None:
        raise ExportError(
            "a peft export needs a llava-hf base: pass base=DIR (the llava-hf folder the model was built on) or "
            "write_base=True"
        )
    if to == "peft" or (to == "llava-hf" and merge):
        lora_modules(model)  # K > 1: refuse before writing anything

    def write(tmp: Path) -> None:
        if write_base:
            save_llava_hf(model, tmp / BASE_DIR_NAME, merge=False, template=template, system_prompt=system_prompt)
        if to == "llava-hf":
            save_llava_hf(model, tmp, merge=merge, template=template, system_prompt=system_prompt)
        elif to == "peft":
            save_peft(model, tmp, base, token_rows_in_base=write_base)
        else:
            save_adapters(model, tmp, base_model_name_or_path=base)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)

    return write_atomically(directory, write, overwrite=overwrite)


def file_sizes(directory: str | os.PathLike) -> list[tuple[str, int]]:
    """``(path relative to directory, bytes)`` of every file under ``directory``, sorted by path."""
    directory = Path(directory)
    return sorted((str(p.relative_to(directory)), p.stat().st_size) for p in directory.rglob("*") if p.is_file())


def human_size(num_bytes: float) -> str:
    """``1.5 KB``, ``13.5 GB``: bytes in powers of 1024."""
    if num_bytes < 1024:
        return f"{num_bytes:.0f} B"
    for unit in ("KB", "MB", "GB", "TB"):
        num_bytes /= 1024
        if num_bytes < 1024 or unit == "TB":
            break
    return f"{num_bytes:.1f} {unit}"
