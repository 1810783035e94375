"""Sharded loading (meta build, ``fully_shard``, per-rank safetensors reads) on 2 CPU processes with gloo equals the
unsharded ``from_pretrained`` build exactly: every parameter, every buffer, the logits, in fp32 and in bf16 (the
trained new token rows then stay bf16 beside the fp32 projector: embedding units of their own)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_ranks
from tests.realformats import clip_336_folder, llama_folder, mm_projector_bin, vicuna_tokenizer


def run_workers(tmp_path: Path, spec: dict) -> dict:
    out = tmp_path / "result.json"
    run_ranks("sharded_loading", ["--spec", json.dumps(spec), "--out", str(out)], tmp_path)
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sharded_loading_equals_the_unsharded_build(tmp_path, dtype):
    tokenizer = vicuna_tokenizer(tmp_path / "tokenizer")  # 512 tokens: <image> becomes row 512 (uneven shards)
    llm = llama_folder(tmp_path / "llm", tokenizer)  # fp32 safetensors in several shards
    tower = clip_336_folder(tmp_path / "clip")  # a full CLIPModel folder: the text tower's tensors are skipped
    projector = mm_projector_bin(tmp_path / "mm_projector.bin", vision_width=32, text_width=64)
    spec = dict(
        preset=None,
        llm_path=str(llm),
        vision="hf",
        vision_name_or_path=str(tower),
        projector="mlp2x_gelu",
        projector_path=str(projector),
        dtype=dtype,  # the frozen base's dtype; adapters, routers and projector are fp32 masters either way
        train_new_token_rows=True,
    )
    result = run_workers(tmp_path, spec)
    meta = result["meta_parameters"]
    # the frozen LLM and tower were built on meta and read from the files; trained parts were built for real
    assert "language_model.lm_head.weight" in meta and "vision_tower.model.embeddings.patch_embedding.weight" in meta
    assert not any("lora_" in name or "router" in name or name.startswith("projector") for name in meta)
    assert result["dtensors"] > len(meta)
    assert result["different"] == [] and result["missing"] == []
    assert result["logits_equal"] and result["logits_finite"]
    assert result["rows"] == 513 and result["dtype"] == f"torch.{dtype}" and result["new_row_is_mean"]
