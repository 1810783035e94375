"""Tokenizers and folders as users bring them: a hub tokenizer without ``<image>`` works in model and data with the
same ids; bad folders, projector files and geometries fail at once with one line naming the file and the problem."""

from __future__ import annotations

import time

import pytest
import torch

from mole_lightning.models import build_llava_mole
from mole_lightning.peft import MoLEConfig
from mole_lightning.tokenization import load_tokenizer, prepare_tokenizer
from mole_lightning.training import ModelSpec


def test_a_plain_vicuna_folder_gets_image_and_pad_with_the_same_ids_in_model_and_data(real_folders):
    from transformers import AutoTokenizer

    folder = str(real_folders["vicuna"])
    raw = AutoTokenizer.from_pretrained(folder)  # transformers' own reading of tokenizer.model (no tokenizer.json)
    assert "<image>" not in raw.get_vocab() and raw.pad_token is None
    data_side = load_tokenizer(folder)
    assert data_side.convert_tokens_to_ids("<image>") == len(raw)  # appended after the vocabulary
    assert data_side.pad_token == "<unk>" and data_side.pad_token_id == raw.unk_token_id  # LLaVA pads with unk
    again = prepare_tokenizer(data_side)  # idempotent
    assert len(again) == len(raw) + 1

    model = build_llava_mole(llm_path=folder, vision_name_or_path=str(real_folders["clip"]), mole=MoLEConfig())
    assert model.image_token_id == data_side.convert_tokens_to_ids("<image>")
    assert model.language_model.get_input_embeddings().weight.shape[0] == len(data_side)
    assert model.num_image_tokens == 576  # ViT-L/14-336 geometry: 24 x 24 patches, CLS dropped
    # a fresh process-less load (another folder copy of the same files) gives the same ids
    fresh = load_tokenizer(str(real_folders["vicuna_tokenizer"]))
    assert fresh.convert_tokens_to_ids("<image>") == model.image_token_id


def test_a_stage1_projector_loads_exactly_from_mm_projector_bin(real_folders):
    model = build_llava_mole(
        llm_path=str(real_folders["vicuna"]),
        vision_name_or_path=str(real_folders["clip"]),
        projector_path=str(real_folders["mm_projector"]),
    )
    state = torch.load(real_folders["mm_projector"], weights_only=True)
    for ours, theirs in (("0.weight", "model.mm_projector.0.weight"), ("2.bias", "model.mm_projector.2.bias")):
        torch.testing.assert_close(model.projector.state_dict()[ours], state[theirs].float(), rtol=0, atol=0)
    assert model.projector[0].weight.dtype == torch.float32  # trained: fp32 master weights


def test_local_paths_that_do_not_exist_fail_at_once_naming_them(tmp_path, real_folders):
    start = time.perf_counter()
    for kwargs, what in (
        ({"llm_path": str(tmp_path / "vicuna-7b")}, "LLM folder"),
        ({"llm_path": str(real_folders["vicuna"]), "vision_name_or_path": "./clip-336"}, "vision tower folder"),
        ({"llm_path": str(real_folders["vicuna"]), "projector_path": "~/no/mm_projector.bin"}, "projector file"),
    ):
        with pytest.raises(FileNotFoundError, match=what):
            build_llava_mole(**kwargs)
    with pytest.raises(FileNotFoundError, match="tokenizer folder"):
        load_tokenizer(str(tmp_path / "missing-tokenizer"))
    assert time.perf_counter() - start < 30  # no hub lookup waiting for a network timeout


def test_a_folder_without_a_tokenizer_is_one_line_naming_it_and_its_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError) as error:
        load_tokenizer(str(tmp_path))
    message = str(error.value)
    assert str(tmp_path) in message and "config.json" in message and "\n" not in message


def test_a_tower_whose_geometry_disagrees_with_its_config_is_named(real_folders, tmp_path, monkeypatch):
    spec = ModelSpec(preset=None, llm_path=str(real_folders["vicuna"]), vision_name_or_path=str(real_folders["clip"]))
    from mole_lightning.models import spec as spec_module

    geometry = spec.vision_geometry()
    wrong = spec_module.VisionGeometry(577, 336, geometry.image_mean, geometry.image_std)  # as if the config said 577
    monkeypatch.setattr(spec_module.ModelSpec, "vision_geometry", lambda self: wrong)
    with pytest.raises(ValueError, match=r"clip-vit-large-patch14-336.*576 tokens per image, its config said 577"):
        spec.build()


def test_remote_checkpoint_paths_go_through_fsspec(tmp_path, monkeypatch):
    import fsspec

    from mole_lightning.training import AtomicCheckpointIO

    monkeypatch.chdir(tmp_path)
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(2)}}, "memory://runs/ckpt/last.ckpt")
    with fsspec.open("memory://runs/ckpt/last.ckpt", "rb") as handle:
        assert torch.equal(torch.load(handle, weights_only=True)["state_dict"]["w"], torch.ones(2))
    assert not any(tmp_path.iterdir())  # no local "memory:" folder
