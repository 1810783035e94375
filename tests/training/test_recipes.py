"""The 7B recipes as a user runs them: the installed ``mole-train`` script on hub-format folders (vicuna-style
``tokenizer.model`` without ``<image>``, CLIP ViT-L/14-336 geometry, a stage-1 ``mm_projector.bin``), FSDP2 on 2 CPU
processes with the recipe's own strategy and ``bf16-true`` precision (fit), then validate → test → predict of the
checkpoint on one process → export, each exiting 0, and failures exiting non-zero with a one-line error naming the
problem.

Only paths, devices and the run length change (a few steps, small batches); every other value is the recipe's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mole_lightning.cli import cli_main
from mole_lightning.constants import IGNORE_INDEX
from mole_lightning.peft.quantization import is_quantized
from tests.conftest import demo_at, load_tool

ROOT = Path(__file__).parents[2]
CONFIGS = ROOT / "configs"
MOLE_TRAIN = Path(sys.executable).parent / "mole-train"


def run(args: list[str], cwd: Path, timeout: int = 400) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def recipe_args(recipe: str, folders: dict, demo, workdir: Path) -> list[str]:
    """Paths and run length only; the recipe's model, MoLE, optimizer, strategy and precision stay."""
    sources = {name: {"urls": spec, "weight": 1.0} for name, spec in demo.train.items()}
    val_sources = {name: {"urls": spec} for name, spec in demo.val.items()}
    return [
        "--config", str(CONFIGS / recipe),
        "--trainer", str(CONFIGS / "trainer" / "fsdp2_cpu.yaml"),
        "--model.architecture.llm_path", str(folders["vicuna"]),
        "--model.architecture.vision_name_or_path", str(folders["clip"]),
        "--model.architecture.projector_path", str(folders["mm_projector"]),
        "--data.tokenizer", str(folders["vicuna"]),
        "--data.sources", json.dumps(sources),
        "--data.val_sources", json.dumps(val_sources),
        "--data.batch_size", "2",
        "--data.val_batch_size", "2",
        "--data.num_workers", "0",
        "--data.shuffle_buffer", "8",
        "--trainer.max_steps", "2",
        "--trainer.val_check_interval", "2",
        "--trainer.limit_val_batches", "1",
        "--trainer.limit_test_batches", "1",
        "--trainer.limit_predict_batches", "1",
        "--checkpoint.dirpath", str(workdir / "ckpt"),
        "--checkpoint.every_n_train_steps", "2",
    ]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["llava_mole_7b.yaml", "llava_lora_7b.yaml"])
def test_recipe_runs_fit_validate_test_predict_export_on_hub_format_folders(
    recipe, real_folders, demo, tmp_path, capsys, monkeypatch
):
    """``fit`` through the installed ``mole-train`` on 2 gloo processes; ``validate``, ``test``, ``predict`` and the
    export of its checkpoint through the same entry points in this process (the console scripts themselves are
    run in tests/training/test_cli.py and tests/tools/test_export.py)."""
    assert MOLE_TRAIN.exists(), "the mole-train console script is not installed next to the interpreter"
    args = recipe_args(recipe, real_folders, demo, tmp_path)
    fit = run([str(MOLE_TRAIN), "fit", *args], tmp_path)
    assert fit.returncode == 0, fit.stdout[-3000:] + fit.stderr[-5000:]
    assert "MoLECLI object" not in fit.stdout
    checkpoint = tmp_path / "ckpt" / "last.ckpt"
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert state["global_step"] == 2 and state["optimizer_states"]
    trained = state["state_dict"]
    assert any(".experts" in k or ".lora_A" in k for k in trained) and any("projector" in k for k in trained)
    assert {v.dtype for v in trained.values()} == {torch.float32}  # fp32 master weights under bf16-true
    routers = [k for k in trained if "router" in k]
    assert bool(routers) == (recipe == "llava_mole_7b.yaml")

    # the FSDP2 checkpoint holds full tensors: evaluate it on one process, as on a single GPU
    monkeypatch.chdir(tmp_path)
    one_device = ["--trainer.devices", "1", "--trainer.strategy", "auto"]
    subcommands = {"validate": "val/loss", "test": "test/loss", "predict": None}
    for subcommand, metric in subcommands.items():
        cli_main([subcommand, *args, *one_device, "--ckpt_path", str(checkpoint)])
        printed = capsys.readouterr().out
        if metric is not None:
            assert metric in printed, printed[-3000:]
    predictions = sorted(tmp_path.glob("runs/*/predictions/predictions.jsonl"))
    assert [p.parent.parent.name for p in predictions] == [Path(recipe).stem]  # the recipe's own prediction writer
    answers = [json.loads(line) for line in predictions[0].open()]
    assert answers and all(answer["prediction"] is not None for answer in answers)

    out = tmp_path / "export"
    assert load_tool("export_adapter").main([str(checkpoint), "--out", str(out)]) == 0
    assert (out / "adapter_model.safetensors").exists() and str(out) in capsys.readouterr().out


@pytest.mark.slow
def test_qlora_recipe_fits_on_one_device_over_a_4bit_base(real_folders, demo, tmp_path, monkeypatch):
    """The QLoRA recipe on one CPU device (bitsandbytes' CPU backend), in process to keep the suite short: the LLM
    from the vicuna-style folder is 4-bit, the trained tensors are fp32 and only they are saved. (Its refusal of
    FSDP/FSDP2 and the export of a 4-bit checkpoint are tested in ``test_quantized_training.py`` and
    ``tests/models/test_quantized_loading.py``.)"""
    pytest.importorskip("bitsandbytes")
    monkeypatch.chdir(tmp_path)
    args = recipe_args("llava_mole_7b_qlora.yaml", real_folders, demo, tmp_path)
    one_device = ["--trainer.devices", "1", "--trainer.strategy", "auto", "--trainer.limit_val_batches", "0"]
    cli = cli_main(["fit", *args, *one_device, "--trainer.logger", "false"])
    assert cli.trainer.global_step == 2
    model = cli.model.model
    assert is_quantized(model.language_model) and not is_quantized(model.vision_tower)
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    trained = state["state_dict"]
    assert any("router" in k for k in trained) and {v.dtype for v in trained.values()} == {torch.float32}
    assert not any(k.endswith(("proj.weight", "absmax")) for k in trained)  # the 4-bit base is never saved
    assert state["hyper_parameters"]["architecture"]["quantize"] == "nf4"


@pytest.mark.slow
def test_recipe_failures_exit_nonzero_with_a_one_line_error(real_folders, demo, tmp_path):
    args = recipe_args("llava_mole_7b.yaml", real_folders, demo, tmp_path)
    missing = str(tmp_path / "no-such-vicuna")
    one_device = ["--trainer.devices", "1", "--trainer.strategy", "auto"]
    result = run([str(MOLE_TRAIN), "fit", *args, *one_device, "--data.tokenizer", missing], tmp_path)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert missing in last and "does not exist" in last


@pytest.mark.slow
def test_qwen2_siglip_recipe_trains_on_its_stand_ins_with_the_chat_template_labels(
    real_folders, demo, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    sources = {name: {"urls": spec, "weight": 1.0} for name, spec in demo.train.items()}
    args = [
        "--config", str(CONFIGS / "qwen2_siglip_mole.yaml"),
        "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto",
        "--trainer.logger", "false", "--trainer.callbacks", "[]",
        "--model.architecture.llm_path", str(real_folders["qwen2"]),
        "--model.architecture.vision_name_or_path", str(real_folders["siglip"]),
        "--data.tokenizer", str(real_folders["qwen2"]),
        "--data.sources", json.dumps(sources), "--data.val_sources", "null",
        "--data.batch_size", "2", "--data.num_workers", "0", "--data.shuffle_buffer", "8",
        "--trainer.max_steps", "2", "--checkpoint.dirpath", str(tmp_path / "ckpt"),
    ]  # fmt: skip
    cli = cli_main(["fit", *args])
    assert cli.trainer.global_step == 2
    data, tokenizer = cli.datamodule, cli.model.tokenizer
    assert data.num_image_tokens == (384 // 14) ** 2 and data.image_mean == (0.5, 0.5, 0.5)  # SigLIP geometry
    batch = next(iter(data.train_dataloader()))
    im_start, assistant = tokenizer.convert_tokens_to_ids("<|im_start|>"), tokenizer.encode("assistant\n")
    for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
        runs, start = [], None
        for position, label in enumerate([*labels, IGNORE_INDEX]):
            if label != IGNORE_INDEX and start is None:
                start = position
            elif label == IGNORE_INDEX and start is not None:
                runs.append((start, position))
                start = None
        assert runs
        for begin, end in runs:  # each learned span: right after "<|im_start|>assistant\n", ends with <|im_end|>
            assert ids[begin - 1 - len(assistant)] == im_start and ids[begin - len(assistant) : begin] == assistant
            assert tokenizer.decode(ids[begin:end]).endswith("<|im_end|>")


@pytest.mark.slow
def test_documented_demo_on_fsdp2_cpu_saves_after_validation(demo, tmp_path):
    """``mole-train fit --config configs/demo.yaml --trainer configs/trainer/fsdp2_cpu.yaml`` as documented, made short:
    a checkpoint written right after a validation pass (at the end of an epoch) under FSDP2 on 2 gloo processes."""
    demo_at(demo, tmp_path)  # the config's relative paths
    args = [
        "fit", "--config", str(CONFIGS / "demo.yaml"), "--trainer", str(CONFIGS / "trainer" / "fsdp2_cpu.yaml"),
        "--trainer.max_steps", "2", "--trainer.val_check_interval", "1", "--trainer.limit_val_batches", "1",
        "--data.samples_per_epoch", "32", "--data.val_batch_size", "4", "--data.num_workers", "0",
        "--checkpoint.every_n_train_steps", "null", "--checkpoint.every_n_epochs", "1",
    ]  # fmt: skip
    result = run([str(MOLE_TRAIN), *args], tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    state = torch.load(tmp_path / "runs/demo/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 2 and state["optimizer_states"][0]["state"]
