"""`mole-train` CLI: every YAML in configs/ parses, links fill the DataModule from the model, the demo config
instantiates, and extra callbacks can be added from YAML."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import torch
import yaml

from mole_lightning.cli import cli_main
from mole_lightning.training import (
    AtomicCheckpointIO,
    MoLEModelParallelStrategy,
    ResumableTrainLoader,
    RoutingHeatmapCallback,
    SourceMetricsTable,
)
from tests.conftest import demo_at

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
    mole = resolved["model"]["mole"]
    assert mole["num_experts"] >= 1 if mole is not None else config.name == "llava_pretrain_projector.yaml"
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


def recipe_differences(first: str, second: str) -> dict[str, tuple]:
    """``{key: (first's value, second's value)}`` of the resolved recipes, run names aside."""

    def comparable(recipe: str) -> dict:
        flat = flatten(print_config(["fit", "--config", str(CONFIGS / recipe), "--print_config"]))
        flat.pop("trainer.plugins", None)  # an object, printed with its memory address
        return {key: str(value).replace(Path(recipe).stem, "<run>") for key, value in flat.items()}

    a, b = comparable(first), comparable(second)
    return {key: (a.get(key), b.get(key)) for key in a.keys() | b.keys() if a.get(key) != b.get(key)}


@pytest.mark.parametrize(
    ("first", "second", "expected"),
    [
        ("llava_mole_7b.yaml", "llava_lora_7b.yaml", {"model.mole.num_experts": ("3", "1")}),
        (  # the paper-faithful recipe and the Switch-style variant: routing only, batching included
            "llava_mole_official.yaml",
            "llava_mole_7b.yaml",
            {
                "model.mole.gate": ("none", "prob"),
                "model.mole.balance": ("pooled", "switch"),
                "model.mole.balance_coef": ("0.05", "0.01"),
            },
        ),
        ("llava_lora_7b.yaml", "llava_dense_7b.yaml", {"model.mole.mlp_rank": ("None", "96")}),
        (
            "llava_lora_7b.yaml",
            "llava_lora_7b_r128.yaml",
            {"model.mole.rank": ("32", "128"), "model.mole.alpha": ("64.0", "256.0")},
        ),
    ],
)
def test_baseline_recipes_differ_from_each_other_in_one_knob(first, second, expected):
    assert recipe_differences(first, second) == expected


def test_dense_baseline_trains_as_many_parameters_as_mole_at_7b_shapes():
    """The parameter-matched dense LoRA (K=1, MLP rank K*r) within 5 % of MoLE K=3, r=32 on vicuna-7b's shapes
    (d 4096, MLP 11008, 32 layers), both counted against the closed form: attention 4 (d r + r d) per layer, an MLP
    expert (d r + r f) * 2 + (f r + r d), a router d K + K."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mole_lightning.peft import MoLEConfig, apply_mole

    d, f, layers = 4096, 11008, 32
    built = 2  # every decoder layer gets the same adapters: count two layers' and scale to 32

    def trainable(recipe: str) -> int:
        mole = print_config(["fit", "--config", str(CONFIGS / recipe), "--print_config"])["model"]["mole"]
        with torch.device("meta"):
            llm = LlamaForCausalLM(LlamaConfig(hidden_size=d, intermediate_size=f, num_hidden_layers=built))
        apply_mole(llm, MoLEConfig(**mole))
        per_layer = [sum(p.numel() for p in layer.parameters() if p.requires_grad) for layer in llm.model.layers]
        assert per_layer[0] == per_layer[1]
        assert sum(p.numel() for p in llm.parameters() if p.requires_grad) == sum(per_layer)  # only in the layers
        return per_layer[0] * layers

    def closed_form(rank: int, mlp_rank: int, experts: int) -> int:
        attention = 4 * 2 * d * rank
        mlp = experts * 3 * (d + f) * mlp_rank
        router = (d * experts + experts) if experts > 1 else 0
        return layers * (attention + mlp + router)

    mole, dense = trainable("llava_mole_official.yaml"), trainable("llava_dense_7b.yaml")
    assert mole == closed_form(32, 32, 3) == 173_146_208  # paper.md: 173.1M
    assert dense == closed_form(32, 96, 1)
    assert abs(dense - mole) / mole < 0.05
    assert trainable("llava_lora_7b.yaml") == closed_form(32, 32, 1)  # 80.0M
    assert trainable("llava_lora_7b_r128.yaml") == closed_form(128, 128, 1)  # 319.8M


def test_demo_config_instantiates_with_linked_geometry_forced_and_extra_callbacks(demo):
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


def test_fsdp2_is_the_default_for_several_devices(demo):
    args = ["--config", str(CONFIGS / "demo.yaml"), "--data.tokenizer", demo.tokenizer]  # run=False: no subcommand
    cli = cli_main([*args, "--trainer.devices", "2", "--trainer.logger", "false"], run=False)
    assert isinstance(cli.trainer.strategy, MoLEModelParallelStrategy)


def print_config_text(args: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        cli_main(args)
    assert exit_info.value.code in (0, None), out.getvalue()
    return out.getvalue()


@pytest.mark.parametrize("config", MAIN_CONFIGS, ids=lambda p: p.name)
def test_a_printed_config_reads_back_as_itself(config, tmp_path):
    printed = print_config_text(["fit", "--config", str(config), "--print_config"])
    assert "Unable to serialize" not in printed
    written = tmp_path / "printed.yaml"
    written.write_text(printed)
    assert print_config_text(["fit", "--config", str(written), "--print_config"]) == printed


def test_a_run_is_validated_from_the_config_saved_beside_it(demo, tmp_path, monkeypatch):
    """``mole-train fit`` saves ``config.yaml`` in the run's log folder; ``validate --config <that file>`` of the
    run's checkpoint works (exit 0), checkpoints were written through the atomic writer, and ``predict`` of the
    checkpoint with the plain recipe takes the run's data settings."""
    monkeypatch.chdir(demo_at(demo, tmp_path))  # the demo recipe's relative paths: demo_data/, runs/demo/
    quick = ["--trainer.max_steps", "1", "--trainer.val_check_interval", "1", "--data.batch_size", "2"]
    quick += ["--data.val_batch_size", "4", "--data.num_workers", "0", "--data.shuffle_buffer", "4"]
    quick += ["--trainer.callbacks", "[]", "--checkpoint.every_n_train_steps", "1"]
    quick += ["--data.template", "chatml", "--data.max_length", "200"]  # recorded by the run, read back by predict
    fit = cli_main(["fit", "--config", str(CONFIGS / "demo.yaml"), *quick])
    assert isinstance(fit.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    saved = Path(fit.trainer.log_dir) / "config.yaml"
    assert saved.is_file() and "Unable to serialize" not in saved.read_text()
    checkpoint = tmp_path / "runs" / "demo" / "checkpoints" / "last.ckpt"
    validate = cli_main(["validate", "--config", str(saved), "--ckpt_path", str(checkpoint)])
    assert "val/loss" in validate.trainer.callback_metrics

    # predict with the plain recipe: the run's recorded data settings (given on its command line) replace the
    # recipe's, except those given on predict's own command line
    recipe = ["predict", "--config", str(CONFIGS / "demo.yaml"), "--ckpt_path", str(checkpoint)]
    recipe += ["--trainer.limit_predict_batches", "1", "--data.val_batch_size", "2", "--data.num_workers", "0"]
    predict = cli_main(recipe)
    assert (predict.datamodule.hparams.template, predict.datamodule.hparams.max_length) == ("chatml", 200)
    predict = cli_main([*recipe, "--data.template", "vicuna_v1"])
    assert (predict.datamodule.hparams.template, predict.datamodule.hparams.max_length) == ("vicuna_v1", 200)
