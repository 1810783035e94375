"""The ``mole-train`` recipe of the real-model tier: LLaVA-MoLE from the SmolLM2 folder plus the tiny CLIP tower.

Short on purpose (2 CPU cores): batches of 2 demo samples (16 image tokens, SmolLM2's ChatML prompt through
``data.template: tokenizer``), a few training steps, float32 throughout. The data is the synthetic demo data
(``mole_lightning.data.make_demo_data``) read with the SmolLM2 tokenizer (``data.tokenizer``: the folder).
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).parents[2]
BIN = Path(sys.executable).parent
MOLE_TRAIN = BIN / "mole-train"
MOLE_CHAT = BIN / "mole-chat"


def write_recipe(
    path: Path, folder: Path, demo, workdir: Path, *, num_experts: int = 3, max_steps: int = 20, lr: float = 1e-3
) -> Path:
    """A ``mole-train`` YAML recipe at ``path``: SmolLM2 + tiny CLIP (preset ``tiny`` with ``llm_path``), MoLE on
    every MLP, the demo shards of ``demo``; CSV logs under ``workdir/logs``, checkpoint ``workdir/ckpt/last.ckpt``."""
    recipe = {
        "seed_everything": 0,
        "model": {
            "architecture": {"preset": "tiny", "llm_path": str(folder)},  # the preset's tiny CLIP, SmolLM2's LLM
            "mole": {"num_experts": num_experts, "rank": 8, "alpha": 16.0, "dropout": 0.0, "balance_coef": 0.01},
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": lr, "weight_decay": 0.0}},
            "projector_lr": lr,
            "model_seed": 0,
        },
        "data": {
            "sources": {name: {"urls": url, "weight": 1.0} for name, url in demo.train.items()},
            "val_sources": {name: {"urls": url} for name, url in demo.val.items()},
            "tokenizer": str(folder),
            "template": "tokenizer",  # SmolLM2's own ChatML chat template
            "batch_size": 2,
            "val_batch_size": 4,
            "num_workers": 0,
            "max_length": 256,
            "shuffle_buffer": 8,
            "seed": 0,
        },
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "precision": "32-true",
            "max_steps": max_steps,
            "max_epochs": -1,
            "val_check_interval": max_steps,
            "check_val_every_n_epoch": None,
            "num_sanity_val_steps": 0,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(workdir / "logs"), "name": "real"},
            },
            "callbacks": [],
        },
        "checkpoint": {"dirpath": str(workdir / "ckpt"), "save_last": True, "every_n_train_steps": max_steps},
    }
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def run(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run an installed script on one thread (the CI machine has 2 cores), capturing its output."""
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.setdefault("OMP_NUM_THREADS", "2")
    return subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def logged(workdir: Path, metric: str, name: str = "real") -> list[float]:
    """Every value of ``metric`` that the CSV logger of run ``name`` wrote under ``workdir/logs``, in order."""
    values = []
    for metrics in (workdir / "logs" / name).glob("version_*/metrics.csv"):
        with metrics.open() as handle:
            values += [float(row[metric]) for row in csv.DictReader(handle) if row.get(metric)]
    return values
