"""lmms-eval (0.7.x) model ``mole_llava``: evaluate a trained LLaVA-MoLE on lmms-eval's benchmarks.

Registered through the ``lmms_eval.models`` entry point of this package (:func:`manifest`), so once the package is
installed next to lmms-eval (``pip install -e ".[lmms]"``)::

    python -m lmms_eval --model mole_llava \\
        --model_args checkpoint=runs/demo/checkpoints/last.ckpt,config=configs/demo.yaml \\
        --tasks pope --batch_size 8 --device cuda

``model_args``: ``config`` with ``checkpoint`` or ``adapter``, or ``llava_hf`` (optionally with ``adapter``);
``template`` overrides the recipe's template; ``max_new_tokens`` is the default when a task sets none (128).
The model is loaded by :mod:`mole_lightning.inference`, so prompts and images are encoded exactly as in training
and ``mole-train predict``. One image per request; one process (no data parallelism).
"""

from __future__ import annotations

import io
import json
from typing import Any

from lmms_eval.api.model import lmms
from PIL import Image
from tqdm import tqdm

from mole_lightning.inference import Assistant, load_from_config, load_from_llava_hf

MODEL_ID = "mole_llava"


def manifest() -> Any:
    """The ``lmms_eval.models`` entry-point payload: this module's :class:`MoLELlava` as ``mole_llava``."""
    from lmms_eval.models.registry_v2 import ModelManifest  # only when lmms-eval resolves the entry point

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.MoLELlava")


def image_bytes(visuals: list[Any]) -> bytes | None:
    """The request's image as PNG bytes (lossless), or ``None`` for a text-only request.

    Raises:
        ValueError: several images, or a visual that is not a PIL image (videos, audio).
    """
    if not visuals:
        return None
    if len(visuals) > 1:
        raise ValueError(f"{MODEL_ID} takes one image per question, got {len(visuals)}")
    visual = visuals[0]
    if not isinstance(visual, Image.Image):
        raise ValueError(f"{MODEL_ID} takes images only, got {type(visual).__name__}")
    buffer = io.BytesIO()
    visual.save(buffer, format="PNG")
    return buffer.getvalue()


def generation_options(gen_kwargs: dict[str, Any], default_max_new_tokens: int) -> tuple[dict[str, Any], list[str]]:
    """``generate`` options and the stop strings of a task's ``generation_kwargs`` (greedy unless temperature > 0)."""
    options = dict(gen_kwargs)
    until = options.pop("until", None) or []
    until = [until] if isinstance(until, str) else list(until)
    temperature = float(options.pop("temperature", 0) or 0)
    top_p = options.pop("top_p", None)
    sample = bool(options.pop("do_sample", False)) and temperature > 0
    kwargs: dict[str, Any] = {
        "max_new_tokens": int(options.pop("max_new_tokens", default_max_new_tokens)),
        "num_beams": int(options.pop("num_beams", 1) or 1),
        "do_sample": sample,
    }
    if sample:
        kwargs["temperature"] = temperature
        if top_p is not None:
            kwargs["top_p"] = float(top_p)
    return kwargs, until


def cut_at_stops(text: str, until: list[str]) -> str:
    """``text`` up to the first stop string (stripped)."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text.strip()


class MoLELlava(lmms):
    """lmms-eval model of a trained LLaVA-MoLE (``generate_until`` and ``loglikelihood``, batched).

    Args:
        config: ``mole-train`` recipe, with ``checkpoint`` (``.ckpt``) or ``adapter`` (export folder).
        checkpoint: Training checkpoint.
        adapter: Adapter export folder (with ``config``, or with ``llava_hf``).
        llava_hf: llava-hf ``LlavaForConditionalGeneration`` folder.
        template: Overrides the prompt template.
        device: ``cpu``, ``cuda``, ``cuda:1``... (default: the first GPU, else the CPU).
        batch_size: Requests per forward pass.
        max_new_tokens: Default when a task's ``generation_kwargs`` has none.
    """

    is_simple = True

    def __init__(
        self,
        config: str | None = None,
        checkpoint: str | None = None,
        adapter: str | None = None,
        llava_hf: str | None = None,
        template: str | None = None,
        device: str | None = None,
        batch_size: int | str = 1,
        max_new_tokens: int = 128,
        **unused: Any,
    ) -> None:
        super().__init__()
        if unused:
            raise ValueError(f"unknown {MODEL_ID} model_args: {sorted(unused)}")
        if llava_hf is not None:
            options = {"template": template} if template else {}
            self.assistant: Assistant = load_from_llava_hf(llava_hf, adapter=adapter, device=device, **options)
        elif config is not None:
            self.assistant = load_from_config(
                config, checkpoint=checkpoint, adapter=adapter, device=device, template=template
            )
        else:
            raise ValueError(f"{MODEL_ID} needs model_args config=...,checkpoint=... (or adapter=...), or llava_hf=...")
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.model_name = f"{MODEL_ID}:{checkpoint or adapter or llava_hf}"

    def _sample(self, request: Any) -> tuple[str, dict[str, Any] | str, bytes | None]:
        """``(context, gen_kwargs or continuation, image)`` of a request (args as lmms-eval's simple models get)."""
        context, second, doc_to_visual, doc_id, task, split = request.args
        doc = self.task_dict[task][split][doc_id]
        visuals = doc_to_visual(doc) if doc_to_visual is not None else []
        return context, second if isinstance(second, (str, dict)) else second(doc), image_bytes(list(visuals or []))

    def generate_until(self, requests: list[Any]) -> list[str]:
        """Answers to the requests' questions, cut at the task's ``until`` strings, batched by ``generation_kwargs``."""
        samples = [self._sample(request) for request in requests]
        groups: dict[str, list[int]] = {}
        for index, (_, gen_kwargs, _) in enumerate(samples):
            groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append(index)
        answers: list[str] = [""] * len(requests)
        progress = tqdm(total=len(requests), desc=f"{MODEL_ID} generating", disable=self.rank != 0)
        for indices in groups.values():
            kwargs, until = generation_options(samples[indices[0]][1], self.max_new_tokens)
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                batch = self.assistant.encode(
                    [([{"from": "human", "value": samples[i][0]}], samples[i][2]) for i in chunk]
                )
                for index, text in zip(chunk, self.assistant.generate(batch, **kwargs)):
                    answers[index] = cut_at_stops(text, until)
                    self.cache_hook.add_partial("generate_until", requests[index].args, answers[index])
                progress.update(len(chunk))
        progress.close()
        return answers

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        """``(log-probability, is greedy)`` of each request's continuation as the reply to its context."""
        results: list[tuple[float, bool]] = []
        for start in range(0, len(requests), self.batch_size):
            chunk = [self._sample(request) for request in requests[start : start + self.batch_size]]
            conversations = [
                ([{"from": "human", "value": context}, {"from": "gpt", "value": continuation}], image)
                for context, continuation, image in chunk
            ]
            results.extend(self.assistant.loglikelihood(conversations))
        return results

    def generate_until_multi_round(self, requests: list[Any]) -> list[str]:
        """Not supported: multi-round tasks need the conversation state that lmms-eval keeps per model."""
        raise NotImplementedError(
            f"{MODEL_ID} answers single-round tasks (generate_until, loglikelihood); multi-round generation is not "
            "implemented"
        )
