"""Trainable new token rows under FSDP2 (2 CPU processes, gloo): only the added rows may change."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.models.conftest import llama_config_kwargs, word_tokenizer
from tests.ranks import run_ranks

WORKER = Path(__file__).with_name("token_rows_fsdp2_worker.py")
ROOT = WORKER.parents[2]


@pytest.mark.slow
def test_new_token_rows_stay_the_only_trained_rows_under_fsdp2(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = word_tokenizer(False)  # 44 words: <image> will be added as row 44
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**llama_config_kwargs(len(tokenizer)))).save_pretrained(tmp_path / "llm")
    tokenizer.save_pretrained(tmp_path / "llm")
    out = tmp_path / "result.json"
    run_ranks(WORKER, ["--llm", str(tmp_path / "llm"), "--out", str(out)], tmp_path)
    result = json.loads(out.read_text())
    assert result["sharded"] and result["start"] == 44 and result["rows"] == 45
    # the sharded gradient reaches the frozen rows (the model's autograd hooks cannot see it) ...
    assert result["old_grad_before_mask"]
    # ... and zero_frozen_token_row_grads masks exactly those rows on every rank's shard
    assert not result["old_grad_after_mask"] and result["new_grad_kept"]
    assert not result["old_rows_changed"] and result["new_rows_changed"]
