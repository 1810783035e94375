"""Training and decoding of LLaVA-1.5-7B shapes on one GPU: MoLE vs plain LoRA vs transformers + peft, in one run.

Every measurement uses random weights at the true shapes (no download): vicuna-7B (d 4096, 32 layers, 32 heads,
MLP 11008, vocabulary 32000) + CLIP ViT-L/14-336 (24 layers, width 1024, 576 tokens per image, feature layer -2) +
``mlp2x_gelu`` projector (1024 → 4096 → 4096), bf16 frozen weights, sdpa attention, activation checkpointing.

Sections (each skipped with a note once it would end after ``--budget-s``):

1. training step (forward, CE + MoLE aux loss, backward, AdamW, zero_grad) on B × T tokens with one image
   (576 image tokens) per sample, for MoLE K=3 r=32, our plain LoRA r=32 (K=1), and
   ``LlavaForConditionalGeneration`` + peft LoRA r=32 on the same targets (q/k/v/o/gate/up/down, projector trained)
   with peft's default fp32 adapters (``autocast_adapter_dtype=True``) and with bf16 adapters. Median step time,
   tokens/s, MFU (FLOPs of ``mole_lightning.training.throughput.training_flops`` over the bf16 dense peak, 989
   TFLOP/s for an H200 by default), peak memory (``torch.cuda.max_memory_allocated``). When the batch does not fit,
   it is halved until it does and the batch used is reported.
2. QLoRA (``--qlora``, needs ``bitsandbytes``): the frozen LLM projections stored as nf4 with double quantisation
   (the library's ``quantize="nf4"`` for ours, ``quantize_linears`` on the peft model); peak memory and step time
   against the bf16 rows. Never sharded: these rows run plain under torchrun too.
3. decoding with the KV cache (``generate``, greedy, a fixed number of new tokens): per-token latency at batch 1 and
   16, MoLE vs plain LoRA; per-token = (time for N new tokens − time for 1) / (N − 1), so the prompt is excluded.

The data-side option ``group_by_modality_length`` is measured by ``tools/bench_data.py``. Under ``torchrun`` (one
process) our models are sharded with FSDP2 (``fully_shard_llava_mole``) on a 1-rank mesh; otherwise they run plain.

Usage::

    python tools/bench_gpu.py --shapes llava-1.5-7b --out results.json [--qlora] [--budget-s 450]
    python tools/bench_gpu.py --tiny --out smoke.json          # reduced shapes, runs on CPU in about a minute
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

LLAMA_7B = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
CLIP_L14_336 = dict(
    model_type="clip_vision_model",
    image_size=336,
    patch_size=14,
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    projection_dim=768,
)
LLAMA_TINY = dict(
    LLAMA_7B,
    vocab_size=2000,
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=512,
)
CLIP_TINY = dict(
    CLIP_L14_336,
    image_size=64,
    patch_size=8,
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    projection_dim=128,
)

SHAPES: dict[str, dict[str, Any]] = {
    "llava-1.5-7b": dict(
        llm=LLAMA_7B,
        vision=CLIP_L14_336,
        batch=16,
        seq=2048,
        rank=32,
        alpha=64.0,
        warmup=2,
        steps=5,
        decode_batches=(1, 16),
        new_tokens=64,
        prompt_text=32,
        decode_repeats=3,
    ),
    "tiny": dict(
        llm=LLAMA_TINY,
        vision=CLIP_TINY,
        batch=2,
        seq=128,
        rank=8,
        alpha=16.0,
        warmup=1,
        steps=2,
        decode_batches=(1, 2),
        new_tokens=8,
        prompt_text=8,
        decode_repeats=1,
    ),
}
"""Model configs and run sizes. ``seq`` counts the image placeholders (one image per sample)."""

ATTN_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP_TARGETS = ["gate_proj", "up_proj", "down_proj"]
IMAGE_TOKEN_ID = 260  # ``<image>`` of the byte-level tokenizer our config-built models get; used by both families
PEAK_BF16_TFLOPS = 989.0  # NVIDIA H200 / H100 SXM, dense bf16 (datasheet)
TRAIN_VARIANTS = ("mole_k3", "lora_k1", "hf_peft_fp32", "hf_peft_bf16")


# ----------------------------------------------------------------------------------------------- run bookkeeping
def build_parser() -> argparse.ArgumentParser:
    """The command line of this tool (also parsed by the documented-commands test)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="llava-1.5-7b")
    parser.add_argument("--tiny", action="store_true", help="reduced shapes (same as --shapes tiny)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--batch", type=int, default=None, help="samples per step (default: the shape's, 16 at 7B)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sample, image included (default 2048)")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps per variant")
    parser.add_argument("--variants", default=",".join(TRAIN_VARIANTS), help="training variants, comma-separated")
    parser.add_argument("--qlora", action="store_true", help="also run nf4 double-quant bases")
    parser.add_argument("--no-decode", action="store_true", help="skip the decoding section")
    parser.add_argument("--peak-tflops", type=float, default=PEAK_BF16_TFLOPS, help="bf16 dense peak for MFU")
    parser.add_argument("--budget-s", type=float, default=450.0, help="skip what would end after this many seconds")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", default=None, help="write the raw results here (JSON)")
    return parser


def parse_args() -> argparse.Namespace:
    """The options of this run (``--tiny`` and the device default resolved)."""
    args = build_parser().parse_args()
    if args.tiny:
        args.shapes = "tiny"
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def within_budget(run: dict[str, Any], what: str, estimate_s: float) -> bool:
    """True if ``what`` (about ``estimate_s`` seconds) ends within the budget; otherwise print and record a note."""
    elapsed = time.perf_counter() - run["start"]
    if elapsed + estimate_s <= run["budget_s"]:
        return True
    note = f"skipped {what}: {elapsed:.0f} s elapsed + ~{estimate_s:.0f} s estimated > budget {run['budget_s']:.0f} s"
    print(note, flush=True)
    run["skipped"].append(note)
    return False


def setup_mesh(device: torch.device) -> Any:
    """A 1-rank FSDP2 mesh when launched by torchrun (``RANK`` set), else ``None`` (plain single-device runs)."""
    if "RANK" not in os.environ:
        return None
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if dist.get_world_size() != 1:
        raise SystemExit("bench_gpu.py measures one GPU: run torchrun with --nproc-per-node 1")
    return init_device_mesh(device.type, (1,), mesh_dim_names=("data_parallel",))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def allocated_gib(device: torch.device, peak: bool = False) -> float | None:
    if device.type != "cuda":
        return None
    value = torch.cuda.max_memory_allocated(device) if peak else torch.cuda.memory_allocated(device)
    return value / 2**30


# ------------------------------------------------------------------------------------------------------ inputs
def make_batch(shape: dict[str, Any], batch: int, seq: int, device: torch.device) -> dict[str, torch.Tensor]:
    """B samples of ``seq`` tokens: BOS, N image placeholders, random text; labels on the text; bf16 pixels."""
    vision = shape["vision"]
    num_image_tokens = (vision["image_size"] // vision["patch_size"]) ** 2
    generator = torch.Generator().manual_seed(0)
    text = torch.randint(300, shape["llm"]["vocab_size"], (batch, seq - 1 - num_image_tokens), generator=generator)
    input_ids = torch.cat(
        [torch.ones(batch, 1, dtype=torch.long), torch.full((batch, num_image_tokens), IMAGE_TOKEN_ID), text], dim=1
    )
    labels = input_ids.clone()
    labels[:, : 1 + num_image_tokens] = -100
    size = vision["image_size"]
    pixels = torch.randn(batch, 3, size, size, generator=generator)
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones_like(input_ids).to(device),
        "labels": labels.to(device),
        "pixel_values": pixels.to(device=device, dtype=torch.bfloat16),
    }


def image_tokens(shape: dict[str, Any]) -> int:
    return (shape["vision"]["image_size"] // shape["vision"]["patch_size"]) ** 2


# ------------------------------------------------------------------------------------------------------ models
def build_ours(
    shape: dict[str, Any], num_experts: int, device: torch.device, mesh: Any, qlora: bool = False
) -> tuple[torch.nn.Module, Callable[[dict[str, torch.Tensor]], torch.Tensor]]:
    """Our LlavaMoLE from configs (K experts on every MLP, K=1: plain LoRA), on the device, with its loss.

    ``qlora``: the LLM's linear layers (not the LM head) as nf4 with double quantisation through the library's
    ``quantize="nf4"`` (our layers run the packed base through ``bitsandbytes.matmul_4bit``); never sharded (FSDP2
    does not take a 4-bit base), so the row runs plain even under torchrun.
    """
    from mole_lightning.models import build_llava_mole
    from mole_lightning.peft import MoLEConfig

    torch.manual_seed(0)
    mole = MoLEConfig(
        num_experts=num_experts,
        rank=shape["rank"],
        alpha=shape["alpha"],
        dropout=0.0,
        balance_coef=0.01,
        attn_targets=ATTN_TARGETS,
        mlp_targets=MLP_TARGETS,
    )
    with torch.device(device):
        model = build_llava_mole(
            llm_config=dict(shape["llm"]),
            vision="hf",
            vision_config=dict(shape["vision"]),
            feature_layer=-2,
            projector="mlp2x_gelu",
            mole=mole,
            dtype=torch.bfloat16,
            attn_implementation="sdpa",
            quantize="nf4" if qlora else None,
        )
    model.to(device)
    model.gradient_checkpointing_enable()
    if mesh is not None and not qlora:
        from mole_lightning.training.strategies import fully_shard_llava_mole

        fully_shard_llava_mole(model, mesh)
    model.train()

    def loss_fn(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = model(**batch, return_routing_stats=False)
        return out.loss + out.aux_loss

    return model, loss_fn


def build_hf_peft(
    shape: dict[str, Any], device: torch.device, fp32_adapters: bool, qlora: bool = False
) -> tuple[torch.nn.Module, Callable[[dict[str, torch.Tensor]], torch.Tensor]]:
    """transformers' LlavaForConditionalGeneration (same configs, sdpa, bf16) + peft LoRA on the same targets, the
    projector trained (``modules_to_save``); ``fp32_adapters``: peft's default ``autocast_adapter_dtype=True``."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    vision = {k: v for k, v in shape["vision"].items() if k != "model_type"}
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**vision),
        text_config=LlamaConfig(**shape["llm"]),
        image_token_index=IMAGE_TOKEN_ID,
        image_seq_length=image_tokens(shape),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    with torch.device(device):
        base = LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa", dtype=torch.bfloat16)
    if qlora:
        from mole_lightning.peft.quantization import quantize_linears

        quantize_linears(base.model.language_model, "nf4", compute_dtype=torch.bfloat16)  # the same codes as ours
    base.to(device)
    enable_hf_checkpointing(base)
    lora = LoraConfig(
        r=shape["rank"],
        lora_alpha=shape["alpha"],
        lora_dropout=0.0,
        target_modules=r".*language_model.*\.(" + "|".join(ATTN_TARGETS + MLP_TARGETS) + ")",
        modules_to_save=["multi_modal_projector"],
    )
    model = get_peft_model(base, lora, autocast_adapter_dtype=fp32_adapters)
    model.train()

    def loss_fn(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**batch).loss

    return model, loss_fn


def enable_hf_checkpointing(model: torch.nn.Module) -> None:
    """Non-reentrant activation checkpointing of a transformers model (either method name)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def build_variant(
    variant: str, shape: dict[str, Any], device: torch.device, mesh: Any, qlora: bool = False
) -> tuple[torch.nn.Module, Callable[[dict[str, torch.Tensor]], torch.Tensor]]:
    if variant == "mole_k3":
        return build_ours(shape, 3, device, mesh, qlora)
    if variant == "lora_k1":
        return build_ours(shape, 1, device, mesh, qlora)
    if variant in ("hf_peft_fp32", "hf_peft_bf16"):
        return build_hf_peft(shape, device, fp32_adapters=variant == "hf_peft_fp32", qlora=qlora)
    raise ValueError(f"unknown variant {variant!r}; expected one of {TRAIN_VARIANTS}")


def step_flops(shape: dict[str, Any], variant: str, batch: int, seq: int) -> int:
    """Training FLOPs of one step (``training_flops``), counted on our model of the variant (transformers + peft:
    our plain LoRA, same shapes) built on the meta device."""
    from mole_lightning.models import build_llava_mole
    from mole_lightning.peft import MoLEConfig
    from mole_lightning.training.throughput import parameter_counts, training_flops

    mole = MoLEConfig(num_experts=3 if variant.startswith("mole") else 1, rank=shape["rank"], alpha=shape["alpha"])
    with torch.device("meta"):
        model = build_llava_mole(
            llm_config=dict(shape["llm"]),
            vision="hf",
            vision_config=dict(shape["vision"]),
            mole=mole,
            dtype=torch.bfloat16,
        )
    return training_flops(parameter_counts(model), tokens=batch * seq, images=batch, image_tokens=image_tokens(shape))


# ----------------------------------------------------------------------------------------------------- training
def train_step(loss_fn: Callable, optimizer: torch.optim.Optimizer, batch: dict, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    loss = loss_fn(batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    return time.perf_counter() - start


def measure_training(
    variant: str, shape: dict[str, Any], args: argparse.Namespace, run: dict[str, Any], qlora: bool = False
) -> dict[str, Any] | None:
    """Build a variant, find the largest batch (halving from the requested one) that fits, time its steps.

    Returns the row (median step, tokens/s, MFU, peak memory...) or ``None`` when skipped.
    """
    device, mesh = run["device"], run["mesh"]
    label = f"{variant}{' qlora' if qlora else ''}"
    if not within_budget(run, f"training {label}", run["estimate_train_s"]):
        return None
    began = time.perf_counter()
    free_memory(device)
    model, loss_fn = build_variant(variant, shape, device, mesh, qlora)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=device.type == "cuda" and mesh is None)
    weights_gib = allocated_gib(device)
    build_s = time.perf_counter() - began
    batch_size, seq = run["batch"], run["seq"]
    while True:
        batch = make_batch(shape, batch_size, seq, device)
        try:
            for _ in range(run["warmup"]):
                train_step(loss_fn, optimizer, batch, device)
            break
        except torch.OutOfMemoryError:
            del batch
            optimizer.zero_grad(set_to_none=True)
            free_memory(device)
            if batch_size == 1:
                print(f"{label}: batch 1 x {seq} does not fit", flush=True)
                del model, optimizer
                free_memory(device)
                return {"variant": label, "error": "out of memory at batch 1"}
            batch_size //= 2
            print(f"{label}: out of memory, retrying with batch {batch_size}", flush=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = [train_step(loss_fn, optimizer, batch, device) for _ in range(run["steps"])]
    median = statistics.median(times)
    flops = step_flops(shape, variant, batch_size, seq)
    row = {
        "variant": label,
        "batch": batch_size,
        "seq": seq,
        "tokens_per_step": batch_size * seq,
        "median_step_s": median,
        "min_step_s": min(times),
        "max_step_s": max(times),
        "step_times_s": times,
        "tokens_per_s": batch_size * seq / median,
        "flops_per_step": flops,
        "tflops_per_s": flops / median / 1e12,
        "mfu": flops / median / (run["peak_tflops"] * 1e12),
        "weights_gib": weights_gib,
        "peak_memory_gib": allocated_gib(device, peak=True),
        "trainable_params": sum(p.numel() for p in trainable),
        "trainable_dtypes": sorted({str(p.dtype) for p in trainable}),
        "build_s": build_s,
        "fsdp2": mesh is not None and not variant.startswith("hf") and not qlora,
    }
    print(f"  {label}: batch {batch_size} x {seq}, median step {median:.3f} s, build {build_s:.0f} s", flush=True)
    del model, optimizer, loss_fn, batch
    free_memory(device)
    run["estimate_train_s"] = max(run["estimate_train_s"], time.perf_counter() - began)
    return row


# ----------------------------------------------------------------------------------------------------- decoding
def decode_prompt(shape: dict[str, Any], batch: int, device: torch.device) -> dict[str, torch.Tensor]:
    """B prompts of BOS + N image placeholders + ``prompt_text`` random text tokens, one image each."""
    prompt = make_batch(shape, batch, 1 + image_tokens(shape) + shape["prompt_text"], device)
    return {k: prompt[k] for k in ("input_ids", "attention_mask", "pixel_values")}


def time_generate(model: torch.nn.Module, prompt: dict, new_tokens: int, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    out = model.generate(
        prompt["pixel_values"],
        prompt["input_ids"],
        prompt["attention_mask"],
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        use_cache=True,
        pad_token_id=0,
    )
    synchronize(device)
    elapsed = time.perf_counter() - start
    if out.shape[1] != prompt["input_ids"].shape[1] + new_tokens:
        raise RuntimeError(f"generate returned {out.shape[1]} ids, expected prompt + {new_tokens}")
    return elapsed


def measure_decoding(variant: str, shape: dict[str, Any], run: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-token latency with the KV cache at each decode batch: (t(N new) − t(1 new)) / (N − 1), medians."""
    device, new_tokens = run["device"], shape["new_tokens"]
    if not within_budget(run, f"decoding {variant}", run["estimate_decode_s"]):
        return []
    began = time.perf_counter()
    free_memory(device)
    model, _ = build_variant(variant, shape, device, run["mesh"])
    model.gradient_checkpointing_disable()
    model.eval()
    rows = []
    for batch in shape["decode_batches"]:
        prompt = decode_prompt(shape, batch, device)
        time_generate(model, prompt, new_tokens, device)  # warm-up
        prefill = [time_generate(model, prompt, 1, device) for _ in range(shape["decode_repeats"])]
        full = [time_generate(model, prompt, new_tokens, device) for _ in range(shape["decode_repeats"])]
        per_token = (statistics.median(full) - statistics.median(prefill)) / (new_tokens - 1)
        rows.append(
            {
                "variant": variant,
                "batch": batch,
                "prompt_tokens": int(prompt["input_ids"].shape[1]),
                "new_tokens": new_tokens,
                "median_prefill_plus_one_s": statistics.median(prefill),
                "median_generate_s": statistics.median(full),
                "per_token_ms": per_token * 1e3,
                "peak_memory_gib": allocated_gib(device, peak=True),
            }
        )
        print(f"  decode {variant} batch {batch}: {per_token * 1e3:.2f} ms per token", flush=True)
    del model
    free_memory(device)
    run["estimate_decode_s"] = max(run["estimate_decode_s"], time.perf_counter() - began)
    return rows


# ------------------------------------------------------------------------------------------------------- report
def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    """The ratios the targets are stated in (``None`` where a row is missing)."""
    train = {row["variant"]: row for row in results["train"] if "median_step_s" in row}
    decode = {(row["variant"], row["batch"]): row for row in results["decode"]}
    same_batch = len({row["batch"] for row in train.values()}) <= 1

    def get(variant: str, key: str) -> float | None:
        return train.get(variant, {}).get(key)

    best_peft = max(
        (get(v, "tokens_per_s") for v in ("hf_peft_fp32", "hf_peft_bf16") if get(v, "tokens_per_s")), default=None
    )
    summary: dict[str, Any] = {
        "same_batch_for_all_variants": same_batch,
        "mole_step_over_lora_step": ratio(get("mole_k3", "median_step_s"), get("lora_k1", "median_step_s")),
        "mole_tokens_per_s_over_best_hf_peft": ratio(get("mole_k3", "tokens_per_s"), best_peft),
        "mole_mfu": get("mole_k3", "mfu"),
        "lora_mfu": get("lora_k1", "mfu"),
        "mole_qlora_peak_over_bf16": ratio(get("mole_k3 qlora", "peak_memory_gib"), get("mole_k3", "peak_memory_gib")),
        "hf_peft_qlora_peak_over_bf16": ratio(
            get("hf_peft_fp32 qlora", "peak_memory_gib"), get("hf_peft_fp32", "peak_memory_gib")
        ),
    }
    for ours in ("mole_k3", "lora_k1"):
        for peft_variant in ("hf_peft_fp32", "hf_peft_bf16"):
            key = f"{ours.split('_')[0]}_tokens_per_s_over_{peft_variant}"
            summary[key] = ratio(get(ours, "tokens_per_s"), get(peft_variant, "tokens_per_s"))
    for (variant, batch), row in decode.items():
        if variant == "mole_k3" and ("lora_k1", batch) in decode:
            summary[f"decode_mole_over_lora_batch{batch}"] = ratio(
                row["per_token_ms"], decode[("lora_k1", batch)]["per_token_ms"]
            )
    return summary


def fmt(value: Any, spec: str = ".3f") -> str:
    return "–" if value is None else format(value, spec)


def print_report(results: dict[str, Any]) -> None:
    config = results["config"]
    print()
    print(
        f"{config['shapes']} on {config['device_name']}, bf16 frozen weights, sdpa, activation checkpointing, "
        f"{'FSDP2 1-rank mesh (ours)' if config['fsdp2'] else 'no FSDP'}; MFU over {config['peak_tflops']:.0f} TFLOP/s"
    )
    print("| variant | batch × seq | median step (s) | tokens/s | TFLOP/s | MFU | weights GiB | peak GiB | trainable |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in results["train"]:
        if "error" in row:
            print(f"| {row['variant']} | {row['error']} | | | | | | | |")
            continue
        print(
            f"| {row['variant']} | {row['batch']} × {row['seq']} | {row['median_step_s']:.3f} | "
            f"{row['tokens_per_s']:,.0f} | {row['tflops_per_s']:.1f} | {100 * row['mfu']:.1f} % | "
            f"{fmt(row['weights_gib'], '.1f')} | {fmt(row['peak_memory_gib'], '.1f')} | {row['trainable_params']:,} |"
        )
    if results["qlora_note"]:
        print(results["qlora_note"])
    if results["decode"]:
        print()
        print("| decode variant | batch | prompt tokens | new tokens | per-token ms | peak GiB |")
        print("|---|---|---|---|---|---|")
        for row in results["decode"]:
            print(
                f"| {row['variant']} | {row['batch']} | {row['prompt_tokens']} | {row['new_tokens']} | "
                f"{row['per_token_ms']:.2f} | {fmt(row['peak_memory_gib'], '.1f')} |"
            )
    print()
    targets = {
        "mole_step_over_lora_step": "target ≤ 1.05",
        "mole_tokens_per_s_over_best_hf_peft": "target ≥ 1.3",
        "mole_mfu": "target ≥ 0.40",
    }
    for key, value in results["summary"].items():
        shown = value if isinstance(value, bool) else fmt(value)
        print(f"{key}: {shown}{'  (' + targets[key] + ')' if key in targets else ''}")
    for key in results["summary"]:
        if key.startswith("decode_"):
            print(f"({key}: target ≤ 1.2)")
            break
    print("group_by_modality_length (padding, data side): measured by tools/bench_data.py")
    for note in results["skipped"]:
        print(note)
    print(f"total {results['elapsed_s']:.0f} s")


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = SHAPES[args.shapes]
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    mesh = setup_mesh(device)
    import transformers

    import peft

    run: dict[str, Any] = {
        "start": time.perf_counter(),
        "budget_s": args.budget_s,
        "skipped": [],
        "device": device,
        "mesh": mesh,
        "batch": args.batch or shape["batch"],
        "seq": args.seq or shape["seq"],
        "warmup": shape["warmup"],
        "steps": args.steps or shape["steps"],
        "peak_tflops": args.peak_tflops,
        "estimate_train_s": 5.0 if args.shapes == "tiny" else 45.0,
        "estimate_decode_s": 5.0 if args.shapes == "tiny" else 30.0,
    }
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    results: dict[str, Any] = {
        "config": {
            "shapes": args.shapes,
            "llm": shape["llm"],
            "vision": shape["vision"],
            "rank": shape["rank"],
            "alpha": shape["alpha"],
            "image_tokens": image_tokens(shape),
            "device": str(device),
            "device_name": device_name,
            "peak_tflops": args.peak_tflops,
            "fsdp2": mesh is not None,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "threads": torch.get_num_threads(),
        },
        "train": [],
        "decode": [],
        "qlora_note": None,
        "skipped": run["skipped"],
    }
    print(f"section 1: training steps ({args.shapes}, {device_name})", flush=True)
    for variant in args.variants.split(","):
        row = measure_training(variant, shape, args, run)
        if row is not None:
            results["train"].append(row)

    print("section 2: QLoRA (nf4, double quant)", flush=True)
    if not args.qlora:
        results["qlora_note"] = "qlora: not requested (--qlora)"
    else:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            results["qlora_note"] = "skipped: bitsandbytes not installed"
        else:
            for variant in ("mole_k3", "hf_peft_fp32"):
                row = measure_training(variant, shape, args, run, qlora=True)
                if row is not None:
                    results["train"].append(row)
    if results["qlora_note"]:
        print(results["qlora_note"], flush=True)

    print("section 3: decoding with the KV cache", flush=True)
    if not args.no_decode:
        for variant in ("mole_k3", "lora_k1"):
            results["decode"].extend(measure_decoding(variant, shape, run))

    results["summary"] = summarise(results)
    results["elapsed_s"] = time.perf_counter() - run["start"]
    print_report(results)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
