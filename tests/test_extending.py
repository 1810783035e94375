"""The recipes of docs/extending.md, done as written: a chat template, an eval task, what a checkpoint holds, a gate
mode and a vision tower."""

from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric

from mole_lightning.cli import cli_main
from mole_lightning.constants import IGNORE_INDEX
from mole_lightning.data.templates import TEMPLATES, RenderedConversation, encode_conversation, register_template
from mole_lightning.eval import TASK_SPECS, SourceTaskMetrics, TaskSpec, apply_eval_prompt, infer_task, register_task
from mole_lightning.models import (
    VISION_TOWERS,
    TowerKind,
    VisionGeometry,
    VisionTower,
    build_preset,
    load_adapters,
    register_vision_tower,
    select_trainable,
    trainable_names,
    trainable_state_dict,
)
from mole_lightning.models.export import export_model
from mole_lightning.peft import GATES, GateSpec, MoLEConfig, apply_mole, register_gate
from mole_lightning.tokenization import load_tokenizer
from mole_lightning.training import ModelSpec


def test_a_registered_chat_template_is_encoded_with_its_learned_spans(real_folders):
    def render_alpaca(messages, tokenizer, system_prompt, add_generation_prompt):
        text, spans = "", []
        for m in messages:
            if m.role == "user":
                text += f"### Instruction:\n{m.text}\n\n### Response:\n"
            elif m.role == "assistant":
                spans.append((len(text), len(text) + len(m.text) + len(tokenizer.eos_token)))
                text += m.text + tokenizer.eos_token + "\n\n"
        end = len(text) if add_generation_prompt else None
        return RenderedConversation(text, spans, end, add_special_tokens=True)

    register_template("alpaca", render_alpaca)
    try:
        tokenizer = load_tokenizer(str(real_folders["vicuna"]))
        conversation = [
            {"from": "human", "value": "What color is the circle?"},
            {"from": "gpt", "value": "It is blue."},
        ]
        encoded = encode_conversation(conversation, tokenizer, "alpaca", num_image_tokens=4)
        assert encoded["input_ids"][0] == tokenizer.bos_token_id  # add_special_tokens: the tokenizer's BOS
        learned = encoded["input_ids"][encoded["labels"] != IGNORE_INDEX].tolist()
        assert tokenizer.decode(learned).strip() == "It is blue.</s>"
    finally:
        TEMPLATES.pop("alpaca")


class CountAccuracy(Metric):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("right", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, preds, refs) -> None:
        self.right += sum(float(p.strip() in r) for p, r in zip(preds, refs))
        self.total += len(preds)

    def compute(self) -> dict[str, float]:
        return {"accuracy": float(self.right / self.total.clamp_min(1)), "count": float(self.total)}


def test_a_registered_eval_task_is_prompted_inferred_and_scored():
    spec = TaskSpec(
        name="count",
        metric=lambda sync, leave_one_out: CountAccuracy(sync_on_compute=sync),
        primary="accuracy",
        score=lambda prediction, references, options, leave_one_out: float(prediction.strip() in references),
        prompt="Answer with a number.",
        recognize=lambda refs, options, text: bool(refs) and all(r.isdigit() for r in refs),
    )
    register_task(spec)
    try:
        assert apply_eval_prompt("How many cats?", "count") == "How many cats?\nAnswer with a number."
        assert infer_task(["3"]) == "count" and infer_task(["red"]) == "vqa"  # tried before the built-ins
        metrics = SourceTaskMetrics(sources=["general"], sync=False)
        scores = metrics.update(["general", "general"], [None, "count"], ["3", "2"], [["3"], ["4"]])
        assert scores == [1.0, 0.0]
        out = metrics.compute()
        assert out["general/count/accuracy"] == 0.5 and out["general/score"] == 0.5
    finally:
        TASK_SPECS.pop("count")
    assert infer_task(["3"]) == "vqa"


def test_a_tensor_made_trainable_is_what_the_checkpoint_and_the_export_hold(tmp_path):
    torch.manual_seed(0)
    model = build_preset("tiny")
    norm = model.language_model.model.norm.weight
    norm.requires_grad_(True)
    with torch.no_grad():
        norm.mul_(1.5)  # as training would move it
    names = trainable_names(model)
    assert "language_model.model.norm.weight" in names
    kept = select_trainable(model.state_dict(), names)
    assert set(kept) == set(names) and "language_model.model.embed_tokens.weight" not in kept
    assert set(trainable_state_dict(model)) == set(names)  # the mole export's tensors
    export_model(model, tmp_path / "export", to="mole")
    torch.manual_seed(0)
    base = build_preset("tiny", mole=None)  # the same base weights, the norm as built
    load_adapters(base, tmp_path / "export")
    assert torch.equal(base.language_model.model.norm.weight, norm)


def squared_top_prob(probs, expert):
    """A toy gate: the chosen expert's delta scaled by its probability squared."""
    one_hot = F.one_hot(expert, probs.shape[-1]).to(probs.dtype)  # (T, K)
    return one_hot * probs.gather(1, expert[:, None]).square()


def test_a_registered_gate_mode_weights_the_experts_and_trains_the_router(monkeypatch):
    try:
        register_gate("squared", GateSpec(squared_top_prob))
        register_gate("frozen_router", GateSpec(squared_top_prob, router_gradient=False))
        # Identity router on 2-d inputs, A_e = I, B_e = (e + 1) I, zero base: delta = scale * coeff * (e + 1) * x.
        ln3 = math.log(3.0)
        x = torch.tensor([[0.0, ln3], [ln3, 0.0]])  # probs (.25, .75) -> expert 1; (.75, .25) -> expert 0
        mlp = nn.Module()
        mlp.up_proj = nn.Linear(2, 2, bias=False)
        mlp.forward = lambda inp: mlp.up_proj(inp)
        nn.init.zeros_(mlp.up_proj.weight)
        config = MoLEConfig(num_experts=2, rank=2, alpha=3.0, dropout=0.0, gate="squared", mlp_targets=["up_proj"])
        apply_mole(mlp, config)
        with torch.no_grad():
            mlp.router.weight.copy_(torch.eye(2))
            mlp.router.bias.zero_()
            mlp.up_proj.lora_A.copy_(torch.eye(2).expand(2, 2, 2))
            mlp.up_proj.lora_B.copy_(torch.stack([torch.eye(2), 2 * torch.eye(2)]))
        expected = 1.5 * torch.tensor([[0.75**2 * 2.0], [0.75**2 * 1.0]]) * x
        for impl in ("loop", "dense_masked"):  # a sparse mode: the per-expert and the dense kernel agree
            mlp.up_proj.impl = impl
            torch.testing.assert_close(mlp(x), expected, msg=impl)
        out = mlp(x)
        out.sum().backward()
        assert torch.count_nonzero(mlp.router.weight.grad) > 0  # the coefficient carries the task gradient

        with pytest.raises(ValueError, match="never trains the router"):
            MoLEConfig(gate="frozen_router", balance_coef=0.0)
        monkeypatch.chdir(Path(__file__).parents[1])
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed), pytest.raises(SystemExit) as exit_info:
            cli_main(["fit", "--config", "configs/demo.yaml", "--model.mole.gate", "squared", "--print_config"])
        assert exit_info.value.code in (0, None) and "gate: squared" in printed.getvalue()
    finally:
        GATES.pop("squared", None)
        GATES.pop("frozen_router", None)
    with pytest.raises(ValueError, match="registered gate mode"):
        MoLEConfig(gate="squared")


class PatchMeanTower(VisionTower):
    """A toy tower: one linear map of 8x8 patches (16 px images: 4 patches)."""

    def __init__(self, width: int = 12) -> None:
        super().__init__()
        self.patch = torch.nn.Conv2d(3, width, kernel_size=8, stride=8)
        self.hidden_size, self.num_patches, self.image_size = width, 4, 16
        self.image_mean, self.image_std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
        self.freeze()

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.patch(pixel_values).flatten(2).transpose(1, 2)  # (B, 4, width)


def test_a_registered_vision_tower_is_built_and_linked_by_its_geometry():
    geometry = VisionGeometry(4, 16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    register_vision_tower(
        "patch_mean",
        TowerKind(build=lambda name, pretrained, config, layer, dtype: PatchMeanTower(), geometry=lambda *_: geometry),
    )
    try:
        spec = ModelSpec(preset="tiny", vision="patch_mean")
        assert spec.vision_geometry() == geometry  # what the CLI links into the DataModule
        model = spec.build()
        assert isinstance(model.vision_tower, PatchMeanTower) and model.num_image_tokens == 4
        pixels = torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8)  # as the DataModule sends them
        features = model.encode_images(pixels)
        assert features.shape == (1, 4, model.hidden_size)
    finally:
        VISION_TOWERS.pop("patch_mean")
