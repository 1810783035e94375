"""`ModelSpec` beside the builders it describes: one field per `build_llava_mole` argument, presets merged once."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

from mole_lightning.models import (
    PRESETS,
    TINY_CLIP_VISION_CONFIG,
    TINY_OPEN_CLIP_CONFIG,
    ModelSpec,
    build_llava_mole,
    preset_kwargs,
)

SET_AT_BUILD_TIME = {"mole", "tokenizer", "frozen_on_meta", "image_token"}
"""Arguments the Lightning module passes itself (the adapter config, the data's tokenizer, sharded loading)."""


def test_spec_fields_are_the_builders_arguments():
    fields = {field.name for field in dataclasses.fields(ModelSpec)}
    parameters = set(inspect.signature(build_llava_mole).parameters)
    assert fields - {"preset"} == parameters - SET_AT_BUILD_TIME


def test_spec_and_preset_kwargs_merge_presets_alike():
    """A field left None keeps the preset's value; a set one replaces it; dtype names become torch dtypes."""
    spec = ModelSpec(preset="llava-1.5-7b", projector_path="p.bin", dtype="float16", llm_path="/models/vicuna")
    kwargs = spec.builder_kwargs()
    assert kwargs == {**PRESETS["llava-1.5-7b"], "projector_path": "p.bin", "dtype": torch.float16,
                      "llm_path": "/models/vicuna", "trust_remote_code": False}  # fmt: skip
    assert ModelSpec(preset=None, feature_layer=-1).builder_kwargs() == {
        "feature_layer": -1,
        "trust_remote_code": False,
    }


@pytest.mark.parametrize(("vision", "config"), [("open_clip", TINY_OPEN_CLIP_CONFIG), ("hf", TINY_CLIP_VISION_CONFIG)])
def test_the_tiny_preset_takes_the_tiny_tower_of_the_kind_asked_for(vision, config):
    assert preset_kwargs("tiny", vision=vision)["vision_config"] == config
    assert ModelSpec(preset="tiny", vision=vision).builder_kwargs()["vision_config"] == config
    own = {"image_size": 16}
    assert ModelSpec(preset="tiny", vision=vision, vision_config=own).builder_kwargs()["vision_config"] == own


def test_an_llm_folder_replaces_the_presets_random_llm():
    assert "llm_config" not in ModelSpec(preset="tiny", llm_path="/models/smollm2").builder_kwargs()
    assert "llm_config" in ModelSpec(preset="tiny").builder_kwargs()


def test_unknown_preset_is_refused():
    with pytest.raises(ValueError, match=r"unknown preset 'huge'; available: \['llava-1.5-7b', 'tiny'\]"):
        ModelSpec(preset="huge").builder_kwargs()
