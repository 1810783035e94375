"""The paper's two recipes: both parse as ``mole-train`` reads them (the stage-2 mix by frequency, the stage-1 plain
template without adapters, the paper's data section reusable by the baselines), and stage 1 trains only the projector
(a short fit on stand-in folders of the 7B formats and ShareGPT4V-PT-format captions), whose checkpoint is stage 2's
``projector_path``."""

from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from mole_lightning.cli import cli_main
from mole_lightning.data.paper_datasets import convert_sharegpt4v
from mole_lightning.models.loading import load_projector
from mole_lightning.models.trainable import trainable_names
from tests.data.conftest import image_bytes

CONFIGS = Path(__file__).parents[2] / "configs"
PAPER_SOURCES = {
    "general": {"urls": "shards/m3it::shards/sharegpt4v_ft", "frequency": 1.0},
    "doc": {"urls": "shards/ureader", "frequency": 1.0},
    "med": {"urls": "shards/pathvqa", "frequency": 1.0},
}


def printed_config(*args: str) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", *args, "--print_config"])
    assert exit_info.value.code in (0, None), out.getvalue()[-2000:]
    return yaml.safe_load(out.getvalue())


def test_paper_recipes_parse_with_the_paper_mix_and_the_official_mole():
    stage2 = printed_config("--config", str(CONFIGS / "llava_mole_paper.yaml"))
    assert stage2["data"]["sources"] == PAPER_SOURCES and stage2["data"]["group_by_modality_length"] is True
    assert stage2["data"]["samples_per_epoch"] is None  # one epoch of D_mix
    mole = stage2["model"]["mole"]
    assert (mole["gate"], mole["balance"], mole["balance_coef"], mole["dropout"]) == ("none", "pooled", 0.05, 0.05)
    assert stage2["model"]["architecture"]["projector_path"].endswith("llava_pretrain_projector/checkpoints/last.ckpt")

    stage1 = printed_config("--config", str(CONFIGS / "llava_pretrain_projector.yaml"))
    assert stage1["data"]["template"] == "plain" and stage1["model"]["mole"] is None
    assert stage1["model"]["architecture"]["preset"] is None  # no preset: no adapters
    assert stage1["model"]["optimizer"]["init_args"]["lr"] == 1e-3
    assert stage1["data"]["batch_size"] * stage1["trainer"]["devices"] == 256  # LLaVA-1.5's global batch

    baseline = printed_config("--config", str(CONFIGS / "llava_lora_7b.yaml"), "--config",
                              str(CONFIGS / "data" / "paper_mix.yaml"))  # fmt: skip
    assert baseline["data"]["sources"] == PAPER_SOURCES and baseline["model"]["mole"]["num_experts"] == 1
    assert {k: baseline["data"][k] for k in stage2["data"]} == stage2["data"]  # the same data section


def zero_parameters(module: torch.nn.Module) -> None:
    for parameter in module.parameters(recurse=False):
        torch.nn.init.zeros_(parameter.data)


def pretrain_shards(root: Path) -> str:
    """ShareGPT4V-PT-format caption pairs (LLaVA JSON + an image root) converted by the library."""
    records = []
    for index, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]):
        name = f"coco/train2017/{index:012d}.jpg"
        (root / "data" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "data" / name).write_bytes(image_bytes(colour, size=(40, 30), fmt="JPEG"))
        caption = f"A solid square of colour {colour}, filling the whole picture."
        turns = [{"from": "human", "value": "<image>\nWhat's in the picture?"}, {"from": "gpt", "value": caption}]
        records.append({"id": str(index), "image": name, "conversations": turns})
    (root / "pt.json").write_text(json.dumps(records))
    report = convert_sharegpt4v(str(root / "pt.json"), str(root / "data"), str(root / "shards"), "pretrain")
    assert report.written == 4
    return str(root / "shards")


@pytest.mark.slow
def test_stage1_trains_only_the_projector_and_its_checkpoint_is_stage2s_projector(real_folders, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shards = pretrain_shards(tmp_path)
    args = [
        "--config", str(CONFIGS / "llava_pretrain_projector.yaml"),
        "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto",
        "--trainer.logger", "false",
        "--model.architecture.llm_path", str(real_folders["vicuna"]),
        "--model.architecture.vision_name_or_path", str(real_folders["clip"]),
        "--data.tokenizer", str(real_folders["vicuna"]),
        "--data.sources", json.dumps({"pretrain": {"urls": shards, "frequency": 1.0}}),
        "--data.batch_size", "2", "--data.num_workers", "0", "--data.shuffle_buffer", "4",
        "--trainer.max_steps", "2", "--checkpoint.dirpath", str(tmp_path / "ckpt"),
    ]  # fmt: skip
    cli = cli_main(["fit", *args])
    assert cli.trainer.global_step == 2 and cli.datamodule.epoch_samples() == 4
    model = cli.model.model
    names = trainable_names(model)
    assert names and all(name.startswith("projector.") for name in names), names
    assert not any("lora" in name or "expert" in name for name, _ in model.named_parameters())
    projector_params = {id(p) for p in model.projector.parameters()}
    optimized = {id(p) for group in cli.trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == projector_params
    optimizer = cli.trainer.optimizers[0]
    assert all(optimizer.state[p]["exp_avg"].abs().sum() > 0 for p in model.projector.parameters())  # got gradients

    checkpoint = tmp_path / "ckpt" / "last.ckpt"
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    assert state and all(key.startswith("model.projector.") for key in state), sorted(state)
    stage2 = copy.deepcopy(model.projector).apply(zero_parameters)
    load_projector(stage2, checkpoint)  # what stage 2's projector_path does with this checkpoint
    for (name, loaded), trained in zip(stage2.state_dict().items(), model.projector.state_dict().values()):
        assert torch.equal(loaded, trained.to(loaded.dtype)), name

    exported = {f"projector.{k}": v.contiguous() for k, v in model.projector.state_dict().items()}  # export keys
    save_file(exported, tmp_path / "adapter_model.safetensors")
    again = load_projector(copy.deepcopy(stage2).apply(zero_parameters), tmp_path / "adapter_model.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), stage2.state_dict().values()))
