"""A tiny trained-looking run for the inference tests: a recipe over demo data and a checkpoint of fixed tensors."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from mole_lightning.peft import MoLEConfig
from mole_lightning.training import ModelSpec, MoLELightningModule

MOLE = dict(num_experts=3, rank=4, alpha=8.0, dropout=0.0)
MAX_NEW_TOKENS = 10


def write_recipe(path: Path, demo, num_experts: int = 3) -> Path:
    """A mole-train recipe over the demo data: tiny preset, MoLE with ``num_experts``."""
    recipe = {
        "model": {
            "architecture": {"preset": "tiny"},
            "mole": {**MOLE, "num_experts": num_experts},
            "model_seed": 0,
            "max_new_tokens": MAX_NEW_TOKENS,
        },
        "data": {
            "sources": {name: {"urls": spec, "weight": 1.0} for name, spec in demo.train.items()},
            "val_sources": {name: {"urls": spec} for name, spec in demo.val.items()},
            "tokenizer": demo.tokenizer,
            "template": "vicuna_v1",
            "max_length": 160,
            "num_workers": 0,
            "batch_size": 2,
            "val_batch_size": 1,
        },
        "trainer": {"accelerator": "cpu", "precision": "32-true"},
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def write_checkpoint(path: Path, tokenizer: str) -> MoLELightningModule:
    """Save a checkpoint (trainable tensors + hyper-parameters, as training writes them) of the tiny module with
    fixed random "trained" tensors (LoRA B is zero at init and routers near uniform); returns the module (eval)."""
    module = MoLELightningModule(
        architecture=ModelSpec(preset="tiny"),
        mole=MoLEConfig(**MOLE),
        tokenizer=tokenizer,
        model_seed=0,
        max_new_tokens=MAX_NEW_TOKENS,
    )
    module.configure_model()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * (0.5 if "router" in name else 0.2))
    state = {name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}
    torch.save({"state_dict": state, "hyper_parameters": dict(module.hparams)}, path)
    return module.eval()
