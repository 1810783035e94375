"""Trainable new token rows under FSDP2 (2 CPU processes, gloo): only the added rows may change."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.models.conftest import llama_config_kwargs, word_tokenizer

WORKER = Path(__file__).with_name("token_rows_fsdp2_worker.py")
ROOT = WORKER.parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_new_token_rows_stay_the_only_trained_rows_under_fsdp2(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = word_tokenizer(False)  # 44 words: <image> will be added as row 44
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**llama_config_kwargs(len(tokenizer)))).save_pretrained(tmp_path / "llm")
    tokenizer.save_pretrained(tmp_path / "llm")
    port, out = free_port(), tmp_path / "result.json"
    processes = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        env["OMP_NUM_THREADS"] = "1"
        command = [sys.executable, str(WORKER), "--llm", str(tmp_path / "llm"), "--out", str(out)]
        log = open(tmp_path / f"log{rank}.txt", "w")  # noqa: SIM115 (closed below)
        processes.append((subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    for process, log in processes:
        code = process.wait(timeout=300)
        log.close()
        assert code == 0, (tmp_path / "log0.txt").read_text()[-3000:] + (tmp_path / "log1.txt").read_text()[-3000:]
    result = json.loads(out.read_text())
    assert result["sharded"] and result["start"] == 44 and result["rows"] == 45
    # the sharded gradient reaches the frozen rows (the model's autograd hooks cannot see it) ...
    assert result["old_grad_before_mask"]
    # ... and zero_frozen_token_row_grads masks exactly those rows on every rank's shard
    assert not result["old_grad_after_mask"] and result["new_grad_kept"]
    assert not result["old_rows_changed"] and result["new_rows_changed"]
