"""End-to-end training-step benchmark on CPU: MoLE (K=3) vs plain LoRA (K=1) vs HF LLaVA + peft LoRA.

The same model for all three: Llama (d=512, 8 layers, 8 heads, FFN 1408, vocabulary 8000) + CLIP vision tower
(64 px, patch 8 → 64 image tokens, width 256, 4 layers) + ``mlp2x_gelu`` projector; LoRA rank 8 (alpha 16) on
q/k/v/o and, per expert, on gate/up/down; projector trainable. A step is forward + loss (+ MoLE aux loss) + backward
+ AdamW step + zero_grad on a batch of B samples of T tokens with one image each.

Timing: the variants are run interleaved (one step of each per round, after warm-up) and the median per variant is
reported. Peak memory: each variant runs alone in a fresh subprocess; the peak RSS growth over the built model
(``ru_maxrss`` minus the RSS before the first step) is reported.

Usage::

    python tools/bench_train.py [--rounds 15] [--batch 4] [--seq 256] [--threads 2] [--impl auto] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

import torch

LLM = dict(
    vocab_size=8000,
    hidden_size=512,
    intermediate_size=1408,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=8,
    max_position_embeddings=1024,
    tie_word_embeddings=False,
)
VISION = dict(
    model_type="clip_vision_model",
    image_size=64,
    patch_size=8,
    hidden_size=256,
    intermediate_size=1024,
    num_hidden_layers=4,
    num_attention_heads=4,
)
RANK, ALPHA = 8, 16.0
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = ("mole_k3", "lora_k1", "hf_peft_lora")


def make_batch(batch: int, seq: int, image_token_id: int, num_image_tokens: int) -> dict[str, torch.Tensor]:
    """B samples of T tokens: BOS, the image placeholders, random text; labels on the text."""
    generator = torch.Generator().manual_seed(0)
    text = torch.randint(10, 250, (batch, seq - 1 - num_image_tokens), generator=generator)
    input_ids = torch.cat(
        [torch.ones(batch, 1, dtype=torch.long), torch.full((batch, num_image_tokens), image_token_id), text], dim=1
    )
    labels = input_ids.clone()
    labels[:, : 1 + num_image_tokens] = -100
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": labels,
        "pixel_values": torch.randn(batch, 3, VISION["image_size"], VISION["image_size"], generator=generator),
    }


def build_mole(num_experts: int, impl: str) -> tuple[torch.nn.Module, Any]:
    """Our LlavaMoLE with MoLE (K experts; K=1 is plain LoRA) and a step function."""
    from mole_lightning.models import build_llava_mole
    from mole_lightning.peft import MoLEConfig

    torch.manual_seed(0)
    mole = MoLEConfig(num_experts=num_experts, rank=RANK, alpha=ALPHA, balance_coef=0.01, impl=impl)
    model = build_llava_mole(llm_config=dict(LLM), vision="hf", vision_config=dict(VISION), mole=mole)
    model.train()

    def loss_fn(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = model(**batch, return_routing_stats=False)
        return out.loss + out.aux_loss

    return model, loss_fn


def build_hf_peft() -> tuple[torch.nn.Module, Any]:
    """transformers' LlavaForConditionalGeneration (same configs) with peft LoRA on the LLM and the projector."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from mole_lightning.models import tiny_tokenizer
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    image_token_id = tiny_tokenizer().convert_tokens_to_ids("<image>")
    vision = {k: v for k, v in VISION.items() if k != "model_type"}
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**vision),
        text_config=LlamaConfig(**LLM),
        image_token_index=image_token_id,
        image_seq_length=(VISION["image_size"] // VISION["patch_size"]) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    base = LlavaForConditionalGeneration(config)
    lora = LoraConfig(
        r=RANK,
        lora_alpha=ALPHA,
        lora_dropout=0.0,
        target_modules=r".*language_model.*\.(" + "|".join(TARGETS) + ")",
        modules_to_save=["multi_modal_projector"],
    )
    model = get_peft_model(base, lora)
    model.train()

    def loss_fn(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**batch).loss

    return model, loss_fn


def build(variant: str, impl: str) -> tuple[torch.nn.Module, Any, torch.optim.Optimizer]:
    """Model, loss function and AdamW over the trainable parameters of a variant."""
    if variant == "mole_k3":
        model, loss_fn = build_mole(3, impl)
    elif variant == "lora_k1":
        model, loss_fn = build_mole(1, impl)
    else:
        model, loss_fn = build_hf_peft()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, loss_fn, torch.optim.AdamW(params, lr=1e-4)


def train_step(loss_fn: Any, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor]) -> tuple[float, float]:
    """One full step; returns its wall time and the process CPU time in seconds (CPU time is less sensitive to
    other jobs on a shared machine; with one thread it equals the compute time)."""
    start, start_cpu = time.perf_counter(), time.process_time()
    loss = loss_fn(batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start, time.process_time() - start_cpu


def current_rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def memory_probe(variant: str, args: argparse.Namespace) -> dict[str, float]:
    """Run in a fresh process: peak RSS growth during 3 steps over the RSS of the built model."""
    torch.set_num_threads(args.threads)
    model, loss_fn, optimizer = build(variant, args.impl)
    batch = make_batch(args.batch, args.seq, 260, (VISION["image_size"] // VISION["patch_size"]) ** 2)
    before = current_rss_mib()
    for _ in range(3):
        train_step(loss_fn, optimizer, batch)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"model_rss_mib": before, "step_peak_growth_mib": peak - before, "trainable_params": trainable}


def build_parser() -> argparse.ArgumentParser:
    """The command line of this tool (also parsed by the documented-commands test)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds (one step of each variant per round)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256, help="tokens per sample (64 of them image tokens)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: stable on a shared machine)")
    parser.add_argument("--impl", default="auto", help="MoLEConfig.impl of the MoLE variants")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    return parser


def main() -> None:
    args = build_parser().parse_args()

    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe, args)))
        return

    torch.set_num_threads(args.threads)
    variants = args.variants.split(",")
    batch = make_batch(args.batch, args.seq, 260, (VISION["image_size"] // VISION["patch_size"]) ** 2)
    built = {v: build(v, args.impl) for v in variants}
    times: dict[str, list[float]] = {v: [] for v in variants}
    cpu_times: dict[str, list[float]] = {v: [] for v in variants}
    for round_index in range(args.warmup + args.rounds):
        for variant in variants:
            _, loss_fn, optimizer = built[variant]
            elapsed, cpu = train_step(loss_fn, optimizer, batch)
            if round_index >= args.warmup:
                times[variant].append(elapsed)
                cpu_times[variant].append(cpu)
    del built

    results: dict[str, Any] = {
        "config": {"batch": args.batch, "seq": args.seq, "threads": args.threads, "impl": args.impl, "llm": LLM},
        "variants": {},
    }
    for variant in variants:
        probe = subprocess.run(
            [sys.executable, __file__, "--memory-probe", variant, "--batch", str(args.batch), "--seq", str(args.seq)]
            + ["--threads", str(args.threads), "--impl", args.impl],
            capture_output=True,
            text=True,
            check=True,
        )
        memory = json.loads(probe.stdout.strip().splitlines()[-1])
        results["variants"][variant] = {
            "median_step_s": statistics.median(times[variant]),
            "median_step_cpu_s": statistics.median(cpu_times[variant]),
            "min_step_s": min(times[variant]),
            "max_step_s": max(times[variant]),
            **memory,
        }
    base = results["variants"].get("lora_k1", {})
    print(f"batch {args.batch} x {args.seq} tokens, {args.threads} threads, impl={args.impl}, {args.rounds} rounds")
    print(
        "| variant | median step wall (s) | min | max | median step CPU (s) | wall vs LoRA K=1 | CPU vs LoRA K=1 "
        "| peak step memory (MiB) | trainable params |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for variant, row in results["variants"].items():
        ratio = row["median_step_s"] / base["median_step_s"] if base else float("nan")
        cpu_ratio = row["median_step_cpu_s"] / base["median_step_cpu_s"] if base else float("nan")
        row["ratio_vs_lora_k1"], row["cpu_ratio_vs_lora_k1"] = ratio, cpu_ratio
        print(
            f"| {variant} | {row['median_step_s']:.3f} | {row['min_step_s']:.3f} | {row['max_step_s']:.3f} | "
            f"{row['median_step_cpu_s']:.3f} | {ratio:.3f} | {cpu_ratio:.3f} | {row['step_peak_growth_mib']:.0f} | "
            f"{row['trainable_params']:,} |"
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
