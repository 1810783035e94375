"""`mole-train` CLI: every YAML in configs/ parses, links fill the DataModule from the model, the demo config
instantiates, and extra callbacks can be added from YAML."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import yaml

from mole_lightning.cli import cli_main
from mole_lightning.training import (
    AtomicCheckpointIO,
    MoLEModelParallelStrategy,
    ResumableTrainLoader,
    RoutingHeatmapCallback,
    SourceMetricsTable,
)

CONFIGS = Path(__file__).parents[2] / "configs"
MAIN_CONFIGS = sorted(p for p in CONFIGS.glob("*.yaml"))
TRAINER_CONFIGS = sorted((CONFIGS / "trainer").glob("*.yaml"))


def print_config(args: list[str]) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        cli_main(args)
    assert exit_info.value.code in (0, None), out.getvalue()
    return yaml.safe_load(out.getvalue())


@pytest.mark.parametrize("config", MAIN_CONFIGS, ids=lambda p: p.name)
def test_every_config_parses(config):
    resolved = print_config(["fit", "--config", str(config), "--print_config"])
    assert "tokenizer" not in resolved["model"] and resolved["data"]["tokenizer"]  # set once, linked to the model
    assert resolved["model"]["mole"]["num_experts"] >= 1
    assert resolved["checkpoint"]["save_last"] is True


def flatten(tree, prefix: str = "") -> dict:
    """``{"a.b.c": leaf}`` of a nested dict (lists are leaves)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else key))
    return out


@pytest.mark.parametrize("base", ["demo.yaml", "llava_mole_7b.yaml"])
@pytest.mark.parametrize("trainer_config", TRAINER_CONFIGS, ids=lambda p: p.name)
def test_every_trainer_config_is_applied_over_a_recipe(trainer_config, base):
    recipe = print_config(["fit", "--config", str(CONFIGS / base), "--print_config"])["trainer"]
    args = ["fit", "--config", str(CONFIGS / base), "--trainer", str(trainer_config), "--print_config"]
    resolved = flatten(print_config(args)["trainer"])
    written = flatten(yaml.safe_load(trainer_config.read_text()))
    assert {key: resolved.get(key, "<missing>") for key in written} == written
    if base == "demo.yaml":  # the CPU demo shares no distributed setting with any trainer file, so each one shows
        changed = {key for key in written if flatten(recipe).get(key, "<missing>") != written[key]}
        assert {"devices", "strategy.class_path"} <= changed


def test_paper_configs_differ_only_in_the_number_of_experts_and_names():
    mole = print_config(["fit", "--config", str(CONFIGS / "llava_mole_7b.yaml"), "--print_config"])
    lora = print_config(["fit", "--config", str(CONFIGS / "llava_lora_7b.yaml"), "--print_config"])
    assert mole["model"]["mole"]["num_experts"] == 3 and lora["model"]["mole"]["num_experts"] == 1
    assert mole["model"]["projector_lr"] == lora["model"]["projector_lr"] == 2.0e-5

    def comparable(config: dict) -> dict:
        flat = flatten(config)
        flat.pop("model.mole.num_experts")
        flat.pop("trainer.plugins")  # an object, printed with its memory address
        return {key: str(value).replace("llava_lora_7b", "llava_mole_7b") for key, value in flat.items()}

    mole_flat, lora_flat = comparable(mole), comparable(lora)
    assert mole_flat.keys() == lora_flat.keys()
    assert {key for key in mole_flat if mole_flat[key] != lora_flat[key]} == set()


def test_demo_config_instantiates_with_linked_geometry_forced_and_extra_callbacks(tmp_path):
    from mole_lightning.data import make_demo_data

    demo = make_demo_data(str(tmp_path / "demo"), train=20, val=8, seed=0, maxcount=20)
    cli = cli_main(
        [
            "--config",
            str(CONFIGS / "demo.yaml"),
            "--data.tokenizer",
            demo.tokenizer,
            "--trainer.logger",
            "false",
            "--trainer.callbacks+=lightning.pytorch.callbacks.LearningRateMonitor",
        ],
        run=False,
    )
    assert cli.datamodule.num_image_tokens == cli.model.num_image_tokens == 16
    assert cli.datamodule.image_size == 32 and cli.model.hparams.tokenizer == demo.tokenizer
    assert tuple(cli.datamodule.image_mean) == tuple(cli.model.image_mean)
    kinds = {type(c).__name__ for c in cli.trainer.callbacks}
    assert {"ModelCheckpoint", "LearningRateMonitor"} <= kinds
    for forced in (RoutingHeatmapCallback, ResumableTrainLoader, SourceMetricsTable):
        assert any(isinstance(c, forced) for c in cli.trainer.callbacks), forced
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert cli.model.resolved_mole_config().num_experts == 3


def test_fsdp2_is_the_default_for_several_devices(tmp_path):
    from mole_lightning.data import make_demo_data

    demo = make_demo_data(str(tmp_path / "demo"), train=20, val=8, seed=0, maxcount=20)
    args = ["--config", str(CONFIGS / "demo.yaml"), "--data.tokenizer", demo.tokenizer]  # run=False: no subcommand
    cli = cli_main([*args, "--trainer.devices", "2", "--trainer.logger", "false"], run=False)
    assert isinstance(cli.trainer.strategy, MoLEModelParallelStrategy)
