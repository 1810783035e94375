"""Stage 0 of the data-conflict study: a tiny Llama pretrained (all weights) to read fonts and copy, cached on disk.

The cache file name is a hash of everything that determines the weights (model shape, task format, optimiser
settings, steps, seed), so a rerun with the same settings loads it instead of training again.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from experiments.conflict_study.tasks import TaskConfig, make_samples

BASE_CACHE_VERSION = 1


@dataclass(frozen=True)
class BaseConfig:
    """Tiny Llama shape and its stage-0 pretraining schedule.

    Attributes:
        hidden: model width d.
        layers: decoder layers.
        heads: attention heads (no grouped-query attention).
        ffn: MLP inner width.
        steps: stage-0 optimiser steps (fresh random samples each step).
        batch: stage-0 batch size.
        lr: stage-0 peak learning rate (AdamW, warmup then cosine).
    """

    hidden: int = 96
    layers: int = 4
    heads: int = 4
    ffn: int = 192
    steps: int = 1200
    batch: int = 64
    lr: float = 3e-3


def llama_config(task: TaskConfig, base: BaseConfig) -> LlamaConfig:
    """The HF config of the tiny Llama for ``task``'s vocabulary and length."""
    config = LlamaConfig(
        vocab_size=task.vocab_size,
        hidden_size=base.hidden,
        intermediate_size=base.ffn,
        num_hidden_layers=base.layers,
        num_attention_heads=base.heads,
        num_key_value_heads=base.heads,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=3,
    )
    config._attn_implementation = "sdpa"
    return config


def base_key(task: TaskConfig, base: BaseConfig, seed: int) -> str:
    """Cache key of a stage-0 model: only the settings that change its weights (not the number of domains)."""
    fields = {
        "version": BASE_CACHE_VERSION,
        "setting": task.setting,
        "num_symbols": task.num_symbols,
        "num_fonts": task.num_fonts,
        "length": task.length,
        "base": asdict(base),
        "seed": seed,
    }
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
    return f"base-{task.setting}-s{seed}-{digest}"


def lr_factor(step: int, total: int, warmup_frac: float = 0.05, floor: float = 0.1) -> float:
    """Linear warmup to 1 over ``warmup_frac`` of the steps, then cosine decay to ``floor``."""
    warmup = max(1, int(round(warmup_frac * total)))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def pretrain_base(task: TaskConfig, base: BaseConfig, seed: int, cache_dir: str) -> dict:
    """Load the stage-0 model for ``seed`` from ``cache_dir`` or train and save it.

    Returns:
        ``{"path", "cached", "copy_em", "seconds"}``: the checkpoint path, whether it was already there, the exact
        match of the copy task on fresh samples and the training time.
    """
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, base_key(task, base, seed) + ".pt")
    if os.path.exists(path):
        info = torch.load(path, map_location="cpu", weights_only=True)
        return {"path": path, "cached": True, "copy_em": float(info["copy_em"]), "seconds": 0.0}
    start = time.perf_counter()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(task, base))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=base.lr, weight_decay=0.01, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(10_000 + seed)
    for step in range(base.steps):
        for group in opt.param_groups:
            group["lr"] = base.lr * lr_factor(step, base.steps)
        batch = make_samples(task, None, None, base.batch, gen)
        loss = model(input_ids=batch.input_ids, labels=batch.labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()
    with torch.no_grad():
        probe = make_samples(task, None, None, 512, gen)
        logits = model(input_ids=probe.input_ids).logits[:, :-1]  # (N, S-1, V)
        target = probe.labels[:, 1:]
        scored = target != -100
        correct = (logits.argmax(-1) == target) | ~scored
        copy_em = float(correct.all(-1).float().mean())
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tmp = path + f".tmp{os.getpid()}"
    torch.save({"state_dict": state, "copy_em": copy_em}, tmp)
    os.replace(tmp, path)
    return {"path": path, "cached": False, "copy_em": copy_em, "seconds": time.perf_counter() - start}


def load_base(task: TaskConfig, base: BaseConfig, path: str) -> LlamaForCausalLM:
    """A fresh tiny Llama with the stage-0 weights from ``path``."""
    model = LlamaForCausalLM(llama_config(task, base))
    info = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(info["state_dict"])
    return model


def pretrain_job(args: tuple[TaskConfig, BaseConfig, int, str]) -> dict:
    """`pretrain_base` on one thread, for a worker process; ``args`` = (task, base, seed, cache_dir)."""
    torch.set_num_threads(1)
    return pretrain_base(*args)
