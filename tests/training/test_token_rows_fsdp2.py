"""Trainable new token rows under FSDP2 (2 CPU processes, gloo): the sharded ``token_rows`` parameter of the added
row gets the gradient and the step; the frozen embedding matrices get neither."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import run_ranks
from tests.tiny_models import llama_config_kwargs, word_tokenizer


@pytest.mark.slow
def test_new_token_rows_stay_the_only_trained_rows_under_fsdp2(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = word_tokenizer(False)  # 44 words: <image> will be added as row 44
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**llama_config_kwargs(len(tokenizer)))).save_pretrained(tmp_path / "llm")
    tokenizer.save_pretrained(tmp_path / "llm")
    out = tmp_path / "result.json"
    run_ranks("token_rows_fsdp2", ["--llm", str(tmp_path / "llm"), "--out", str(out)], tmp_path)
    result = json.loads(out.read_text())
    assert result["sharded"] and result["start"] == 44 and result["rows"] == 45
    assert result["trained_rows"] == [1, llama_config_kwargs(45)["hidden_size"]]  # only the added row is trained
    assert not result["frozen_weights_have_grad"] and not result["head_changed"]
    assert result["new_row_grad"] and result["new_row_step"]
