"""Multimodal variant of the data-conflict study on the demo image domains (``general``, ``doc``, ``med``).

The three demo sources share questions ("What is in the image?") whose answers follow the domain, which is told by
the image's style (coloured shapes, rendered text, tissue textures). Everything goes through the project's stack:
`mole_lightning.data.make_demo_data` and `MixedInstructionDataModule` (per-source validation), the
`MoLELightningModule` (LM + aux loss, per-source validation loss and routing) under a Lightning ``Trainer``, and
`mole_lightning.eval.GenerationEvalCallback` (generated answers scored per source, routing counts per source).

Differences from the text study, stated in the report: there is no stage 0 (the base is the ``tiny`` preset's
random Llama, as in ``configs/demo.yaml``; only adapters, routers and the projector train), the module takes one
`MoLEConfig`, so the parameter-matched ``dense`` baseline has rank K*r on attention too, exact match is measured
once at the end (generation), and "token" routing is MI(token type image/text; expert).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from experiments.conflict_study.methods import (
    MethodSpec,
    adapter_counts,
    make_methods,
    parse_source_variants,
    parse_variants,
)
from mole_lightning.data import MixedInstructionDataModule, make_demo_data
from mole_lightning.data.demo import DEMO_SOURCES, DemoData
from mole_lightning.eval import GenerationEvalCallback
from mole_lightning.peft import MoLEConfig
from mole_lightning.training import ModelSpec, MoLELightningModule, WarmupCosineLR
from mole_lightning.training.callbacks import logged_source_metrics

MM_LLM = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": False,
    "initializer_range": 0.15,  # as configs/demo.yaml: a frozen random head at the default scale stalls near ln(V)
}


def _demo(cache_dir: str, per_source: int, val: int) -> Any:
    """Demo shards with ``per_source`` training samples per source (cached by their settings)."""
    root = os.path.join(cache_dir, f"mm-demo-n{per_source}-v{val}")
    marker = os.path.join(root, "done")
    if not os.path.exists(marker):
        data = make_demo_data(root, train=per_source, val=val, seed=0, maxcount=max(per_source, val))
        with open(marker, "w") as f:
            f.write("ok\n")
        return data
    pattern = {s: f"{{split}}/{s}-000000.tar" for s in DEMO_SOURCES}
    return DemoData(
        root=root,
        tokenizer=os.path.join(root, "tokenizer"),
        train={s: os.path.join(root, p.format(split="train")) for s, p in pattern.items()},
        val={s: os.path.join(root, p.format(split="val")) for s, p in pattern.items()},
    )


def run_mm_job(job: dict[str, Any]) -> dict[str, Any]:
    """Train one method on one seed (one source for ``single``) with the Lightning stack; returns a result dict
    in the text study's format (``loss`` curves per source, final ``em``, routing tables)."""
    torch.set_num_threads(1)
    start = time.perf_counter()
    method: MethodSpec = job["method"]
    seed, per_source, batch = job["seed"], job["per_source"], job["batch"]
    data, tokenizer = job["data"], job["tokenizer"]
    sources = list(DEMO_SOURCES) if job["source"] is None else [job["source"]]
    n = per_source * method.data_mult
    steps_per_epoch = len(sources) * n // batch
    max_steps = steps_per_epoch * job["epochs"] * method.epoch_mult
    val_every = max(1, len(sources) * per_source // (batch * job["evals_per_epoch"]))

    rank = method.mlp_rank
    mole = MoLEConfig(
        num_experts=method.num_experts,
        rank=rank,
        alpha=2.0 * rank,
        gate=method.gate,
        balance=method.balance,
        balance_coef=method.balance_coef,
        z_loss_coef=method.z_loss_coef,
        source_routing_coef=method.source_routing_coef,
        # a map over domain indices names the demo sources in their order; without one, source i -> expert i
        source_expert_map=None if method.source_map is None else dict(zip(DEMO_SOURCES, method.source_map)),
    )
    lr = job["lr"] if method.lr is None else method.lr
    module = MoLELightningModule(
        architecture=ModelSpec(preset="tiny", llm_config=dict(MM_LLM)),
        mole=mole,
        tokenizer=tokenizer,
        optimizer=lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.98)),
        scheduler=lambda opt: WarmupCosineLR(opt, warmup_ratio=0.05, min_lr_ratio=0.1, total_steps=max_steps),
        projector_lr=lr,
        model_seed=seed,
    )
    geometry = module.vision_geometry
    datamodule = MixedInstructionDataModule(
        sources={s: {"urls": data[method.data_mult]["train"][s], "weight": 1.0} for s in sources},
        val_sources={s: {"urls": data[1]["val"][s]} for s in sources},
        tokenizer=tokenizer,
        num_image_tokens=geometry.num_image_tokens,
        image_size=geometry.image_size,
        image_mean=geometry.image_mean,
        image_std=geometry.image_std,
        batch_size=batch,
        val_batch_size=64,
        num_workers=0,
        max_length=256,
        shuffle_buffer=200,
        samples_per_epoch=len(sources) * n,
        seed=seed,
    )

    curve: list[tuple[int, dict[str, float]]] = []

    class _Curve(Callback):
        def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            losses, _ = logged_source_metrics(trainer.callback_metrics, "val")
            curve.append((trainer.global_step, losses))

    gen_eval = GenerationEvalCallback(
        every_n_steps=None,
        max_samples_per_source=job["eval_per_source"],
        max_new_tokens=16,
        at_train_end=True,
        on_validate=False,
        on_test=False,
        log_routing=True,
        routing_figures=False,
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        max_epochs=-1,
        val_check_interval=val_every,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=1.0,
        callbacks=[_Curve(), gen_eval],
        default_root_dir=job["root"],
    )
    pl.seed_everything(seed, verbose=False)
    trainer.validate(module, datamodule=datamodule, verbose=False)
    trainer.fit(module, datamodule=datamodule)
    if not curve or curve[-1][0] != trainer.global_step:
        trainer.validate(module, datamodule=datamodule, verbose=False)

    samples = [step * batch // len(sources) for step, _ in curve]
    loss = np.array([[losses.get(s, np.nan) for s in sources] for _, losses in curve])  # (P, D_eval)
    em = np.full_like(loss, np.nan)
    results = gen_eval.last_results
    em[-1] = [results.get(f"{s}/score", np.nan) for s in sources]
    routing: list[dict[str, np.ndarray]] = []
    counts = gen_eval.last_routing
    if method.routed and counts is not None and len(sources) > 1:
        order = [counts.sources.index(s) for s in sources]
        full = counts.counts.numpy()[order]  # (S, L, 2, K)
        for li in range(full.shape[1]):
            routing.append(
                {
                    "domain": full[:, li].sum(1),  # (S, K) all prompt tokens
                    "domain_answer": full[:, li, 1],  # (S, K) text tokens
                    "token": full[:, li].sum(0),  # (2, K) token type (image, text) x expert
                }
            )
    trainable, activated = adapter_counts(module.model, method)  # includes the projector
    return {
        "seed": seed,
        "method": method.name,
        "domain": None if job["source"] is None else DEMO_SOURCES.index(job["source"]),
        "samples": samples,
        "steps": [step for step, _ in curve],
        "loss": loss.tolist(),
        "em": em.tolist(),
        "domains": [DEMO_SOURCES.index(s) for s in sources],
        "params": trainable,
        "activated": activated,
        "routing": [{k: np.asarray(v).tolist() for k, v in layer.items()} for layer in routing],
        "seconds": time.perf_counter() - start,
    }


def run_multimodal_study(args: argparse.Namespace) -> dict[str, Any]:
    """The text study's comparison on the demo image domains; returns the payload for the report."""
    per_source = args.mm_per_source
    val = args.mm_eval_per_source
    demo1 = _demo(args.cache_dir, per_source, val)
    demo2 = _demo(args.cache_dir, 2 * per_source, val)
    data = {
        1: {"train": demo1.train, "val": demo1.val},
        2: {"train": demo2.train, "val": demo1.val},
    }
    kinds = [k.strip() for k in args.methods.split(",") if k.strip()]
    source_variants = parse_source_variants(args.source_variants)
    specs = make_methods(
        kinds, args.rank, args.experts, parse_variants(args.mole_variants), args.z_loss, source_variants
    )
    seeds = list(range(args.seed_offset, args.seed_offset + args.mm_seeds))
    jobs = []
    for seed in seeds:
        for spec in specs:
            for source in DEMO_SOURCES if spec.kind == "single" else [None]:
                jobs.append(
                    {
                        "method": spec,
                        "seed": seed,
                        "source": source,
                        "per_source": per_source,
                        "batch": args.mm_batch,
                        "epochs": args.mm_epochs,
                        "evals_per_epoch": args.evals_per_epoch,
                        "eval_per_source": val,
                        "lr": args.mm_lr,
                        "data": data,
                        "tokenizer": demo2.tokenizer,
                        "root": os.path.join(args.out, "lightning"),
                    }
                )
    jobs.sort(key=lambda j: -(j["method"].data_mult * j["method"].epoch_mult * (3 if j["source"] is None else 1)))
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=mp.get_context("spawn")) as pool:
        results = []
        for job, res in zip(jobs, pool.map(run_mm_job, jobs)):
            final = np.nanmean(res["loss"][-1])
            print(
                f"[mm] seed{job['seed']}:{job['method'].name}/{job['source']}: val loss {final:.3f}, "
                f"{res['seconds']:.0f}s",
                flush=True,
            )
            results.append(res)
    return {
        "config": {
            "task": {"setting": "multimodal demo", "num_domains": 3, "num_symbols": 0, "length": 0},
            "train": {
                "num_experts": args.experts,
                "rank": args.rank,
                "per_domain": per_source,
                "epochs": args.mm_epochs,
                "batch": args.mm_batch,
                "lr": args.mm_lr,
            },
            "workers": args.workers,
            "threshold": args.threshold,
            "seeds": seeds,
            "multimodal": True,
            "command": " ".join(sys.argv),
        },
        "methods": [s.name for s in specs],
        "stage0": [],
        "results": results,
        "seconds": time.perf_counter() - start,
    }
