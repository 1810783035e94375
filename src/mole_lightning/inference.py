"""Load a trained LLaVA-MoLE and answer questions about images: the code behind ``mole-chat`` and the lmms-eval model.

A model comes from one of three places, each giving the same :class:`Assistant` (checkpoints and exports are read
by :mod:`mole_lightning.checkpoints`; its one-line errors become :class:`InferenceError`):

* a training recipe and a checkpoint (:func:`load_from_config` with ``checkpoint=``): the model is built from the
  recipe's ``model`` section as ``mole-train predict`` builds it, then the checkpoint's trainable tensors are loaded;
* a training recipe and an adapter export (``adapter=``, written by ``mole-export``);
* a llava-hf ``LlavaForConditionalGeneration`` folder (:func:`load_from_llava_hf`), optionally with an adapter export.

Prompts are encoded by the data pipeline's own :class:`~mole_lightning.data.samples.SampleEncoder` in ``generate``
mode (the template, system prompt, image aspect and maximum length the run recorded, else the recipe's; image
size, mean and std of the model's vision tower) and collated with left padding, so an answer equals
``MoLELightningModule.predict_step``'s for the same sample. Generation runs under the precision of the recipe's
``trainer.precision``.
"""

from __future__ import annotations

import copy
import io
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch.cli import LightningArgumentParser
from lightning.pytorch.plugins.precision import DoublePrecision, HalfPrecision, MixedPrecision, Precision
from PIL import Image, UnidentifiedImageError

from mole_lightning.checkpoints import (
    CheckpointError,
    CheckpointMismatchError,
    checkpoint_data_settings,
    load_checkpoint_state,
    load_export,
    read_checkpoint,
    recorded_data_settings,
)
from mole_lightning.constants import IGNORE_INDEX
from mole_lightning.data import MixedInstructionDataModule
from mole_lightning.data.collate import pad_token_id_of
from mole_lightning.data.pipeline import make_collator
from mole_lightning.data.samples import SampleEncoder
from mole_lightning.data.templates import BadSampleError, ChatTemplateError
from mole_lightning.generation import generate_answers
from mole_lightning.models import load_llava_hf
from mole_lightning.peft import iter_routers
from mole_lightning.training.module import MoLELightningModule, link_model_and_data


class InferenceError(Exception):
    """A problem with the user's input (files, configs, checkpoints, images), stated in one line."""


# ---------------------------------------------------------------------------------------------------------- loading
def read_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """The YAML training recipe at ``path`` as a dict.

    Raises:
        InferenceError: the file is missing, not YAML, or has no ``model`` and ``data`` sections.
    """
    path = Path(path)
    if not path.is_file():
        raise InferenceError(f"config not found: {path}")
    try:
        recipe = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise InferenceError(f"config {path} is not valid YAML: {' '.join(str(error).split())}") from None
    if not isinstance(recipe, dict) or not isinstance(recipe.get("model"), dict) or "data" not in recipe:
        raise InferenceError(f"config {path} needs 'model' and 'data' sections (a mole-train recipe)")
    return recipe


def instantiate_recipe(recipe: dict[str, Any]) -> tuple[Any, Any]:
    """The LightningModule and DataModule of a recipe's ``model`` and ``data`` sections, linked as ``mole-train``
    links them (the tokenizer is ``data.tokenizer``; image tokens, size, mean and std follow the model).

    Returns:
        ``(MoLELightningModule, MixedInstructionDataModule)``; the model is not built yet.
    """
    parser = LightningArgumentParser(exit_on_error=False)
    parser.add_lightning_class_args(MoLELightningModule, "model")
    parser.add_lightning_class_args(MixedInstructionDataModule, "data")
    link_model_and_data(parser)
    try:
        config = parser.parse_object({"model": recipe["model"], "data": recipe["data"]})
        objects = parser.instantiate_classes(config)
    except Exception as error:  # jsonargparse reports unknown keys and bad values with several exception types
        raise InferenceError(f"cannot read the model/data sections: {' '.join(str(error).split())}") from None
    return objects["model"], objects["data"]


def read_trained_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A training checkpoint (:func:`~mole_lightning.checkpoints.read_checkpoint`, ``weights_only=True``).

    Raises:
        InferenceError: the file is missing or unreadable.
    """
    try:
        return read_checkpoint(path)
    except (OSError, CheckpointError) as error:
        raise InferenceError(str(error)) from None


def load_checkpoint_tensors(module: Any, checkpoint: dict[str, Any], path: str | os.PathLike) -> None:
    """Load the trainable tensors of a training checkpoint read from ``path`` into a configured module, as
    ``mole-train`` does (:func:`~mole_lightning.checkpoints.load_checkpoint_state`).

    Raises:
        InferenceError: its tensors do not fit the model (missing, extra or mis-shaped trainable tensors, e.g.
            another ``num_experts``).
    """
    try:
        load_checkpoint_state(module, checkpoint, source=f"checkpoint {path}")
    except CheckpointMismatchError as error:
        raise InferenceError(f"checkpoint {path} does not match the config: {error.reason}") from None


def load_adapter_export(model: Any, directory: str | os.PathLike) -> None:
    """Load an adapter export (``mole-export``) onto ``model`` in place
    (:func:`~mole_lightning.checkpoints.load_export`).

    Raises:
        InferenceError: the folder lacks the export files, or the export does not fit the model.
    """
    try:
        load_export(model, directory)
    except CheckpointError as error:
        raise InferenceError(str(error)) from None


def precision_plugin(precision: str | int | None, device: torch.device) -> Any:
    """Lightning's precision plugin for a ``trainer.precision`` value (``None``: full precision)."""
    value = str(precision) if precision is not None else "32-true"
    if value in ("bf16-true", "16-true", "bf16", "16"):
        return HalfPrecision("bf16-true" if value.startswith("bf16") else "16-true")
    if value in ("bf16-mixed", "16-mixed"):
        return MixedPrecision(value, device.type)
    if value in ("64-true", "64"):
        return DoublePrecision()
    return Precision()


def default_device() -> torch.device:
    """The first CUDA device when there is one, else the CPU."""
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


@dataclass
class Assistant:
    """A model ready to answer: eval mode, on its device, with the prompt encoder of its training data.

    Attributes:
        model: The :class:`~mole_lightning.models.LlavaMoLE`.
        encoder: The prompt encoder (``SampleEncoder`` in ``generate`` mode).
        precision: Lightning precision plugin whose ``forward_context`` wraps generation.
        device: Where the model lives.
    """

    model: Any
    encoder: SampleEncoder
    precision: Any
    device: torch.device
    pad_token_id: int = field(default=0)

    @property
    def tokenizer(self) -> Any:
        """The tokenizer used for prompts and answers."""
        return self.encoder.tokenizer

    def encode(self, samples: Sequence[tuple[list[dict[str, str]], bytes | None]]) -> dict[str, Any]:
        """A left-padded generation batch on the model's device from ``(conversation, image bytes)`` pairs.

        A conversation is a list of LLaVA turns (``{"from": "human"|"gpt", "value": ...}``) ending with the user
        turn to answer; with an image, ``<image>\\n`` is put before the first user turn unless a turn holds it.

        Raises:
            InferenceError: an image cannot be decoded or a prompt exceeds the data's ``max_length``.
        """
        encoded = []
        for index, (conversation, image) in enumerate(samples):
            raw: dict[str, Any] = {"__key__": str(index), "json": {"conversations": conversation}}
            if image is not None:
                raw["image"] = image
            try:
                encoded.append(self.encoder(raw, source="chat"))
            except BadSampleError as error:
                raise InferenceError(describe_bad_sample(error, self.encoder.max_length)) from None
            except ChatTemplateError as error:
                raise InferenceError(str(error)) from None
        batch = make_collator(self.pad_token_id, generation=True)(encoded)
        return move_batch(batch, self.device)

    def generate(self, batch: dict[str, Any], max_new_tokens: int = 128, **generation_kwargs: Any) -> list[str]:
        """Answers of a batch from :meth:`encode` (greedy unless ``do_sample=True`` is passed), stripped."""
        with torch.inference_mode(), self.precision.forward_context():
            return generate_answers(self.model, batch, self.tokenizer, max_new_tokens, **generation_kwargs)

    def loglikelihood(self, samples: Sequence[tuple[list[dict[str, str]], bytes | None]]) -> list[tuple[float, bool]]:
        """Log-probability of each conversation's last reply and whether greedy decoding would produce it.

        The conversations end with the assistant reply to score; the tokens scored are those training learns for
        that reply (the reply and its end-of-turn token), encoded by the data pipeline's training encoder.

        Returns:
            ``(sum of token log-probabilities, every token is the argmax)`` per sample.

        Raises:
            InferenceError: an image cannot be decoded or a conversation exceeds the data's ``max_length``.
        """
        encoder = copy.copy(self.encoder)
        encoder.mode = "train"
        encoded = []
        for index, (conversation, image) in enumerate(samples):
            raw: dict[str, Any] = {"__key__": str(index), "json": {"conversations": conversation}}
            if image is not None:
                raw["image"] = image
            try:
                example = encoder(raw, source="score")
            except BadSampleError as error:
                raise InferenceError(describe_bad_sample(error, encoder.max_length)) from None
            except ChatTemplateError as error:
                raise InferenceError(str(error)) from None
            # only the last reply is scored
            labels = example["labels"]
            learned = (labels != IGNORE_INDEX).nonzero().flatten().tolist()
            starts = [p for i, p in enumerate(learned) if i == 0 or learned[i - 1] != p - 1]
            labels[: starts[-1]] = IGNORE_INDEX
            encoded.append(example)
        batch = move_batch(make_collator(self.pad_token_id)(encoded), self.device)
        with torch.inference_mode(), self.precision.forward_context():
            logits = self.model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                pixel_values=batch["pixel_values"],
                has_image=batch["has_image"],
            ).logits
        targets = batch["labels"][:, 1:]  # (B, T-1)
        log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
        scored = targets != IGNORE_INDEX
        token_log_probs = log_probs.gather(-1, targets.clamp_min(0)[..., None]).squeeze(-1) * scored
        greedy = (log_probs.argmax(-1) == targets) | ~scored
        return [(float(lp), bool(g)) for lp, g in zip(token_log_probs.sum(-1).tolist(), greedy.all(-1).tolist())]


def describe_bad_sample(error: BadSampleError, max_length: int | None) -> str:
    """One line for a prompt the encoder refused."""
    if error.kind == "prompt_too_long":
        return f"the conversation is longer than the model's {max_length} tokens ({error}); start a new one"
    if error.kind == "corrupt_image":
        return f"the image cannot be decoded ({error})"
    return f"cannot encode the prompt: {error}"


def move_batch(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """``batch`` with its tensors on ``device``."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def ready(model: Any, encoder: SampleEncoder, precision: Any, device: torch.device) -> Assistant:
    """Put ``model`` in eval mode under ``precision`` on ``device`` and pair it with ``encoder``."""
    model = precision.convert_module(model).to(device).eval()
    return Assistant(model, encoder, precision, device, pad_token_id_of(encoder.tokenizer))


def load_from_config(
    config: str | os.PathLike,
    *,
    checkpoint: str | os.PathLike | None = None,
    adapter: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    template: str | None = None,
) -> Assistant:
    """The model of a training recipe with a checkpoint's or an adapter export's trained tensors.

    Args:
        config: A ``mole-train`` YAML recipe (its ``model``, ``data`` and ``trainer.precision`` are used).
        checkpoint: A ``.ckpt`` written by training.
        adapter: An adapter export folder (instead of ``checkpoint``).
        device: Where to run (default: the first GPU, else the CPU).
        template: Overrides ``data.template``.

    The data settings the run recorded (template, system prompt, maximum length, image aspect: a checkpoint's
    DataModule hyper-parameters, or a ``mole`` export's ``data_config.json``) take precedence over the recipe's
    ``data`` section; ``template`` overrides both.

    Raises:
        InferenceError: bad config, checkpoint or adapter (one line naming the problem).
    """
    if (checkpoint is None) == (adapter is None):
        raise InferenceError("give exactly one of a checkpoint or an adapter export with the config")
    recipe = read_recipe(config)
    state = read_trained_checkpoint(checkpoint) if checkpoint is not None else None  # read once
    if state is not None:
        recorded = checkpoint_data_settings(state)
    else:
        try:
            recorded = recorded_data_settings(adapter)
        except (OSError, ValueError):  # an unreadable data_config.json: the recipe's settings
            recorded = {}
    if isinstance(recipe.get("data"), dict):  # the run's own settings win over the recipe's
        recipe = {**recipe, "data": {**recipe["data"], **recorded}}
    module, datamodule = instantiate_recipe(recipe)
    module.hparams.adapter_path = None  # an export is loaded below, by load_adapter_export
    module.configure_model()
    if state is not None:
        load_checkpoint_tensors(module, state, checkpoint)
    else:
        load_adapter_export(module.model, adapter)
    encoder = datamodule.make_encoder("generate")
    if template is not None:
        encoder.template = template
    device = torch.device(device) if device is not None else default_device()
    precision = precision_plugin((recipe.get("trainer") or {}).get("precision"), device)
    return ready(module.model, encoder, precision, device)


def load_from_llava_hf(
    directory: str | os.PathLike,
    *,
    adapter: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    template: str = "processor",
    image_aspect: str = "crop",
    dtype: torch.dtype | None = None,
) -> Assistant:
    """A llava-hf ``LlavaForConditionalGeneration`` folder, optionally with an adapter export loaded onto it.

    Prompts use the folder's processor chat template by default; images are resized on the shortest side and
    centre-cropped as its ``CLIPImageProcessor`` does, to the tower's size and normalisation.

    Raises:
        InferenceError: the folder is missing or holds no tokenizer.
    """
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise InferenceError(f"llava-hf folder not found or without config.json: {directory}")
    model = load_llava_hf(directory, dtype=dtype)
    if model.tokenizer is None:
        raise InferenceError(f"llava-hf folder {directory} holds no tokenizer")
    if adapter is not None:
        load_adapter_export(model, adapter)
    tower = model.vision_tower
    encoder = SampleEncoder(
        tokenizer=model.tokenizer,
        template=template,
        num_image_tokens=model.num_image_tokens,
        image_size=tower.image_size,
        image_mean=tower.image_mean,
        image_std=tower.image_std,
        image_aspect=image_aspect,
        mode="generate",
    )
    device = torch.device(device) if device is not None else default_device()
    return ready(model, encoder, precision_plugin(None, device), device)


# ---------------------------------------------------------------------------------------------------------- images
def read_image(path: str | os.PathLike) -> bytes:
    """The encoded bytes of an image file, checked to decode.

    Raises:
        InferenceError: the file is missing, unreadable or not an image.
    """
    path = Path(path)
    if not path.is_file():
        raise InferenceError(f"image not found: {path}")
    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise InferenceError(f"cannot read image {path}: {' '.join(str(error).split())}") from None
    return data


# --------------------------------------------------------------------------------------------------------- routing
@dataclass
class RoutingTrace:
    """Each router's top-1 expert at the last position of every forward pass, recorded during generation.

    Step ``t`` of :meth:`experts` is the forward that predicted the ``t``-th new token (step 0 reads the prompt),
    so every generated token has the expert that its generating step chose at each MoLE layer.
    """

    names: list[str]
    steps: list[list[torch.Tensor]] = field(default_factory=list)  # per router: (B,) experts per forward
    num_experts: int = 0

    def experts(self, layer: int) -> torch.Tensor:
        """``(B, steps)`` top-1 expert of every generation step at router ``layer`` (an index into :attr:`names`)."""
        return torch.stack(self.steps[layer], dim=1)


@contextmanager
def trace_routing(model: Any) -> Iterator[RoutingTrace]:
    """Record :class:`RoutingTrace` while the block runs (forward hooks on every MoLE router of the LLM).

    Raises:
        InferenceError: the model has no MoLE routers (plain LoRA, K = 1, or no adapters).
    """
    routers = list(iter_routers(model.language_model))
    if not routers:
        raise InferenceError("the model has no MoLE routers (plain LoRA or no adapters): nothing to show")
    trace = RoutingTrace(names=[name for name, _ in routers], steps=[[] for _ in routers])
    trace.num_experts = routers[0][1].num_experts

    def hook_for(layer: int) -> Any:
        def record(router: Any, args: Any, output: Any) -> None:
            rec = router.record
            trace.steps[layer].append(rec.expert.reshape(rec.batch_size, -1)[:, -1].detach().cpu())

        return record

    handles = [router.register_forward_hook(hook_for(i)) for i, (_, router) in enumerate(routers)]
    try:
        yield trace
    finally:
        for handle in handles:
            handle.remove()


def expert_shares(experts: torch.Tensor, num_experts: int) -> list[float]:
    """Fraction of ``experts`` (1-D expert indices) routed to each of ``num_experts`` experts."""
    counts = torch.bincount(experts.reshape(-1).long(), minlength=num_experts).double()
    return (counts / counts.sum().clamp_min(1.0)).tolist()
