"""Session fixtures shared by every test package: the stand-ins of hub folders in their real formats."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import realformats


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
