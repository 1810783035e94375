"""Fixtures and factories shared by every test package.

- :func:`demo`: the demo data set (``mole_lightning.data.make_demo_data``) at one size, written once per session;
  :func:`demo_at` makes it visible at a recipe's relative ``demo_data/`` path.
- :func:`make_module` / :func:`make_datamodule`: the tiny :class:`MoLELightningModule` and a DataModule over the demo
  shards whose image geometry follows the module, as ``mole-train`` links them.
- :func:`write_checkpoint`: a checkpoint as training writes it (trainable tensors, hyper-parameters);
  :func:`tiny_checkpoint` and :func:`write_recipe`: a trained-looking tiny run for the inference tests.
- :func:`run_ranks`: the one way to run a script of ``tests/workers/`` as several CPU ranks (gloo); the rendezvous
  store is hosted by the launcher on a port the OS assigns and it holds, so no two runs can collide.
- :func:`load_tool`: a script of ``tools/`` as a module.
- :func:`real_folders`: stand-ins of hub folders in their real formats (:mod:`tests.realformats`).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import yaml

from mole_lightning.data import DemoData, MixedInstructionDataModule, make_demo_data
from mole_lightning.peft import MoLEConfig
from mole_lightning.training import ModelSpec, MoLELightningModule
from tests import realformats

ROOT = Path(__file__).resolve().parents[1]
WORKERS = ROOT / "tests" / "workers"

# ------------------------------------------------------------------------------------------------------ demo data
DEMO_TRAIN, DEMO_VAL, DEMO_MAXCOUNT = 120, 12, 40
"""Samples per source (general, doc, med): 120 training samples in 3 shards of 40, 12 validation samples in one
shard; enough for several epochs of the tiny runs, grouped batches and simulated ranks."""


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoData:
    """The demo data set (read-only: tests that need a changed copy write their own files)."""
    return make_demo_data(
        str(tmp_path_factory.mktemp("demo")), train=DEMO_TRAIN, val=DEMO_VAL, seed=0, maxcount=DEMO_MAXCOUNT
    )


def demo_at(demo: DemoData, folder: Path) -> Path:
    """Links ``folder/demo_data`` to the demo data (the relative paths of ``configs/demo.yaml``); returns ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "demo_data").symlink_to(demo.root, target_is_directory=True)
    return folder


# ------------------------------------------------------------------------------------------ module and DataModule
TINY_MOLE = dict(num_experts=3, rank=4, alpha=8.0, dropout=0.0, balance_coef=0.01, z_loss_coef=0.001)


def make_module(demo: DemoData, **kwargs: Any) -> MoLELightningModule:
    """The tiny preset with the demo tokenizer and a small MoLE config (``kwargs`` override them)."""
    kwargs.setdefault("architecture", ModelSpec(preset="tiny"))
    kwargs.setdefault("mole", MoLEConfig(**TINY_MOLE))
    return MoLELightningModule(tokenizer=demo.tokenizer, **kwargs)


def make_datamodule(
    demo: DemoData, module: MoLELightningModule | None = None, **kwargs: Any
) -> MixedInstructionDataModule:
    """A DataModule over the demo shards; the image geometry comes from ``module`` (as the CLI links it) or, without
    one, is the tiny preset's (16 image tokens, 32 px). ``kwargs`` override the small defaults (batch 4, validation
    batch 8, no workers, 160 tokens, shuffle buffer 50, 64 samples per epoch)."""
    defaults: dict[str, Any] = dict(
        sources=demo.sources("train"),
        val_sources=demo.sources("val"),
        tokenizer=demo.tokenizer,
        num_image_tokens=16,
        image_size=32,
        batch_size=4,
        val_batch_size=8,
        num_workers=0,
        max_length=160,
        shuffle_buffer=50,
        samples_per_epoch=64,
        seed=0,
    )
    if module is not None:
        geometry = module.vision_geometry
        defaults.update(
            num_image_tokens=geometry.num_image_tokens,
            image_size=geometry.image_size,
            image_mean=geometry.image_mean,
            image_std=geometry.image_std,
        )
    defaults.update(kwargs)
    return MixedInstructionDataModule(**defaults)


# ---------------------------------------------------------------------------------------------------- checkpoints
MOLE = dict(num_experts=3, rank=4, alpha=8.0, dropout=0.0)
MAX_NEW_TOKENS = 10


def write_checkpoint(path: Path, module: MoLELightningModule, data: dict | None = None) -> MoLELightningModule:
    """Save ``module`` (built) as training does: hyper-parameters and the trainable tensors only (the module's
    ``on_save_checkpoint``); ``data``: the DataModule's hyper-parameters Lightning records beside them. Returns
    ``module``."""
    checkpoint: dict[str, Any] = {"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}
    if data is not None:
        checkpoint["datamodule_hyper_parameters"] = data
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return module


def tiny_checkpoint(path: Path, tokenizer: str) -> MoLELightningModule:
    """Save a checkpoint of the tiny module (:data:`MOLE`, model seed 0) with fixed random "trained" tensors (LoRA B
    is zero at init and routers near uniform); returns the module (eval)."""
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
    return write_checkpoint(path, module).eval()


def write_recipe(path: Path, demo: DemoData, num_experts: int = 3) -> Path:
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


# ---------------------------------------------------------------------------------------------------------- ranks
class Ranks:
    """``tests/workers/<worker>.py *args`` running as ``world_size`` ranks (see :func:`start_ranks`)."""

    def __init__(self, worker: str, args: list[str], logs: Path, world_size: int, timeout: int, env: dict) -> None:
        from torch.distributed import TCPStore

        self.logs, self.world_size, self.timeout = logs, world_size, timeout
        self.logs.mkdir(parents=True, exist_ok=True)
        # port 0: the OS picks a free port, bound by this process until wait() returns
        self.store = TCPStore(
            "127.0.0.1", 0, world_size, is_master=True, timeout=timedelta(seconds=timeout), wait_for_workers=False
        )
        self.processes: list[tuple[subprocess.Popen, Any]] = []
        for rank in range(world_size):
            rank_env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
            rank_env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), NODE_RANK="0")
            rank_env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(self.store.port))
            rank_env.update(TORCHELASTIC_USE_AGENT_STORE="True", OMP_NUM_THREADS="1", **env)
            log = open(logs / f"log{rank}.txt", "w")  # noqa: SIM115 (closed by wait())
            command = [sys.executable, str(WORKERS / f"{worker}.py"), *args]
            process = subprocess.Popen(command, cwd=ROOT, env=rank_env, stdout=log, stderr=subprocess.STDOUT)
            self.processes.append((process, log))

    def wait(self) -> None:
        """Wait for every rank; assert that each exited 0, showing the end of each rank's log otherwise."""
        codes: list[int | str] = []
        try:
            for process, _ in self.processes:
                try:
                    codes.append(process.wait(timeout=self.timeout))
                except subprocess.TimeoutExpired:
                    codes.append("timeout")
        finally:
            for process, log in self.processes:
                if process.poll() is None:
                    process.kill()
                    process.wait()
                log.close()
            del self.store
        tails = "".join(
            f"--- rank {r}\n" + (self.logs / f"log{r}.txt").read_text()[-3000:] for r in range(self.world_size)
        )
        assert codes == [0] * self.world_size, f"exit codes {codes}\n{tails}"


def start_ranks(
    worker: str, args: list[str], logs: Path, world_size: int = 2, timeout: int = 300, env: dict | None = None
) -> Ranks:
    """Start ``tests/workers/<worker>.py *args`` as ``world_size`` CPU ranks; ``.wait()`` checks their exit codes.

    Each rank gets ``RANK``/``LOCAL_RANK``/``WORLD_SIZE``/``MASTER_*``, one thread and a log ``logs/log<rank>.txt``.
    The launcher hosts the rendezvous store itself (a ``TCPStore`` on port 0: the OS assigns a free port, and it
    stays bound until the ranks end) and ``TORCHELASTIC_USE_AGENT_STORE`` makes every rank a client of it, as under
    ``torchrun``: no port is picked first and bound later, so concurrent runs cannot collide. Lightning sees
    ``LOCAL_RANK`` and starts no processes of its own.
    """
    return Ranks(worker, args, logs, world_size, timeout, env or {})


def run_ranks(worker: str, args: list[str], logs: Path, world_size: int = 2, timeout: int = 300) -> None:
    """:func:`start_ranks` and wait for the ranks."""
    start_ranks(worker, args, logs, world_size, timeout).wait()


# ---------------------------------------------------------------------------------------------------------- tools
def load_tool(name: str) -> ModuleType:
    """The command-line tool ``tools/<name>.py`` as a module (to call its ``main(argv)``)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------------- hub folders
@pytest.fixture(scope="session")
def real_folders(tmp_path_factory) -> dict[str, Path]:
    """Hub-format folders (see :mod:`tests.realformats`), written once per session.

    Keys: ``vicuna_tokenizer`` (``legacy`` false), ``vicuna_tokenizer_legacy``, ``vicuna`` (Llama checkpoint + its
    tokenizer files), ``clip`` (ViT-L/14-336 geometry), ``mm_projector`` (stage-1 ``mm_projector.bin``), ``llava_hf``,
    ``qwen2``, ``siglip``.
    """
    root = tmp_path_factory.mktemp("hub")
    tokenizer = realformats.vicuna_tokenizer(root / "vicuna-tokenizer", legacy=False)
    folders = {
        "vicuna_tokenizer": tokenizer,
        "vicuna_tokenizer_legacy": realformats.vicuna_tokenizer(root / "vicuna-tokenizer-legacy", legacy=True),
        "vicuna": realformats.llama_folder(root / "vicuna-7b-v1.5", tokenizer),
        "clip": realformats.clip_336_folder(root / "clip-vit-large-patch14-336"),
        "llava_hf": realformats.llava_hf_folder(root / "llava-1.5-7b-hf", tokenizer),
        "qwen2": realformats.qwen2_folder(root / "qwen2"),
        "siglip": realformats.siglip_folder(root / "siglip"),
    }
    width = realformats.TINY_VISION["hidden_size"], realformats.TINY_TEXT["hidden_size"]
    folders["mm_projector"] = realformats.mm_projector_bin(root / "llava-v1.5-7b-pretrain" / "mm_projector.bin", *width)
    return folders


# ------------------------------------------------------------------------------------------------------- markers
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``gpu`` tests skip without CUDA (they are also deselected by default: ``-m 'not real and not gpu'``)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
