"""``tools/export_adapter.py`` on training checkpoints of the hub-format stand-ins: exit codes, printed sizes,
one-line errors, and the written folders loaded by transformers and peft (logits equal ours). Two cases run the
command in a subprocess; the others call its ``main`` (same code, without a second interpreter start)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mole_lightning.peft import MoLEConfig
from mole_lightning.training import ModelSpec, MoLELightningModule
from tests.conftest import write_checkpoint

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "export_adapter.py"
MOLE_EXPORT = Path(sys.executable).with_name("mole-export")


DATA_SETTINGS = {"template": "vicuna_v1", "system_prompt": None, "max_length": 512, "image_aspect": "pad"}


def vicuna_checkpoint(real_folders, path: Path, num_experts: int, data: dict | None = None) -> MoLELightningModule:
    """A checkpoint as mole-train writes it (trainable tensors only) of vicuna + CLIP-336 with non-zero adapters;
    ``data``: the data module's hyper-parameters Lightning records beside the module's (default: vicuna_v1, 512
    tokens, pad)."""
    spec = ModelSpec(preset=None, llm_path=str(real_folders["vicuna"]), vision_name_or_path=str(real_folders["clip"]))
    module = MoLELightningModule(architecture=spec, mole=MoLEConfig(num_experts=num_experts, rank=4, alpha=8.0))
    module.configure_model()
    g = torch.Generator().manual_seed(num_experts)
    with torch.no_grad():
        for name, param in module.model.named_parameters():
            if name.endswith("lora_B") or name.startswith("projector."):
                param.add_(0.2 * torch.randn(param.shape, generator=g))
    return write_checkpoint(path, module, data if data is not None else {**DATA_SETTINGS, "batch_size": 2})


def run_tool(*args: str) -> subprocess.CompletedProcess:
    """The installed ``mole-export``, as users run it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(MOLE_EXPORT), *args], capture_output=True, text=True, env=env, timeout=300)


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def tool():
    """The old ``tools/export_adapter.py`` entry point, which runs ``mole-export``'s ``main``."""
    spec = importlib.util.spec_from_file_location("export_adapter", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def lora_checkpoint(real_folders, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "last.ckpt"
    module = vicuna_checkpoint(real_folders, path, num_experts=1)
    return path, module.model.eval()


def inputs(model):
    ids = torch.randint(3, 500, (1, 600), generator=torch.Generator().manual_seed(0))
    ids[0, 3 : 3 + model.num_image_tokens] = model.image_token_id
    return ids, torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(1))


def test_llava_hf_merge_command(lora_checkpoint, tmp_path):
    from transformers import LlavaForConditionalGeneration

    checkpoint, model = lora_checkpoint
    out = tmp_path / "hf"
    result = run_tool(str(checkpoint), "--out", str(out), "--to", "llava-hf", "--merge")
    assert result.returncode == 0, result.stderr
    lines = [line.split() for line in result.stdout.splitlines()[1:]]
    sizes = {parts[-1]: parts[0:2] for parts in lines}
    assert {"config.json", "model.safetensors", "processor_config.json", "total"} <= set(sizes)
    size, unit = sizes["model.safetensors"]
    assert unit == "KB" and abs(float(size) * 1024 - (out / "model.safetensors").stat().st_size) < 52

    hf = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    ids, pixels = inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(
            hf(input_ids=ids, pixel_values=pixels).logits, model(ids, pixel_values=pixels).logits, atol=1e-4, rtol=0
        )


def test_mole_then_peft_from_the_mole_folder(tool, lora_checkpoint, tmp_path, capsys):
    from transformers import LlavaForConditionalGeneration

    from peft import PeftModel

    checkpoint, model = lora_checkpoint
    mole = tmp_path / "mole"
    assert tool.main([str(checkpoint), "--out", str(mole)]) == 0  # --to mole is the default
    assert sorted(p.name for p in mole.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "data_config.json",
        "training_config.json",
    ]
    assert json.loads((mole / "data_config.json").read_text()) == DATA_SETTINGS  # how the run built its inputs
    printed = capsys.readouterr().out
    assert "adapter_model.safetensors" in printed and "total" in printed

    peft_dir = tmp_path / "peft"
    assert tool.main([str(mole), "--out", str(peft_dir), "--to", "peft", "--write-base"]) == 0
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(peft_dir / "base")
    base = LlavaForConditionalGeneration.from_pretrained(config["base_model_name_or_path"], dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, peft_dir).eval()
    ids, pixels = inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(
            peft_model(input_ids=ids, pixel_values=pixels).logits,
            model(ids, pixel_values=pixels).logits,
            atol=1e-4,
            rtol=0,
        )


def test_missing_input_exits_nonzero_with_one_line(tmp_path):
    result = run_tool(str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "a"))
    assert result.returncode == 1 and result.stdout == ""
    assert last_line(result.stderr) == f"mole-export: error: input {str(tmp_path / 'missing.ckpt')!r} does not exist"


def test_refusals(tool, real_folders, lora_checkpoint, tmp_path, capsys):
    checkpoint, _ = lora_checkpoint
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert tool.main([str(checkpoint), "--out", str(busy)]) == 1
    assert "not empty; pass --overwrite" in last_line(capsys.readouterr().err)
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]

    assert tool.main([str(checkpoint), "--out", str(tmp_path / "x"), "--to", "peft"]) == 1  # no llava-hf base
    assert "--base DIR" in last_line(capsys.readouterr().err)

    mole_ckpt = tmp_path / "mole.ckpt"
    vicuna_checkpoint(real_folders, mole_ckpt, num_experts=3)
    assert tool.main([str(mole_ckpt), "--out", str(tmp_path / "m"), "--to", "llava-hf", "--merge"]) == 1
    error = last_line(capsys.readouterr().err)
    assert error.startswith("mole-export: error: the model is a MoLE with K=3") and "--to mole" in error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "mole.ckpt"]


def test_llava_hf_chat_template_follows_the_recorded_data_settings(tool, real_folders, tmp_path, capsys):
    from transformers import AutoProcessor

    from mole_lightning.data.templates import encode_prompt

    checkpoint = tmp_path / "lora.ckpt"
    system = "Answer briefly."
    data = {"tokenizer": str(real_folders["vicuna"]), "template": "vicuna_v1", "system_prompt": system}
    model = vicuna_checkpoint(real_folders, checkpoint, num_experts=1, data=data).model
    out = tmp_path / "hf"
    assert tool.main([str(checkpoint), "--out", str(out), "--to", "llava-hf", "--merge"]) == 0
    processor = AutoProcessor.from_pretrained(out)
    turns = [{"from": "human", "value": "What is in the picture?"}]
    messages = [{"role": "user", "content": [{"type": "text", "text": turns[0]["value"]}]}]
    ids = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    expected = encode_prompt(turns, model.tokenizer, "vicuna_v1", system_prompt=system)["input_ids"].tolist()
    assert list(ids["input_ids"][0]) == expected
    # the recorded template is overridden on the command line: the vicuna tokenizer has no processor template
    assert (
        tool.main(
            [str(checkpoint), "--out", str(tmp_path / "p"), "--to", "llava-hf", "--merge", "--template", "processor"]
        )
        == 1
    )
    assert "chat_template.json" in last_line(capsys.readouterr().err)


def test_mole_k3_with_write_base_command(tool, real_folders, tmp_path):
    from safetensors import safe_open

    from mole_lightning.models import load_llava_hf

    checkpoint = tmp_path / "mole.ckpt"
    model = vicuna_checkpoint(real_folders, checkpoint, num_experts=3).model.eval()
    out = tmp_path / "mole"
    assert tool.main([str(checkpoint), "--out", str(out), "--write-base"]) == 0
    names = []
    for file in (out / "base").glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            names += list(handle.keys())
    assert names and not [name for name in names if "lora_" in name or "router" in name]
    reloaded = load_llava_hf(out / "base", adapter=out).eval()
    ids, pixels = inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids, pixel_values=pixels).logits, model(ids, pixel_values=pixels).logits)
