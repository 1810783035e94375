"""Benchmark one MoLE MLP block against plain LoRA, peft LoRA and the frozen base, side by side in one process.

Every variant of a group sees the same inputs, base weights and router; repetitions are interleaved (A B C A B C ...)
and medians reported, with every ratio to our plain LoRA of the same rank. Training shape: forward + backward of a
Llama MLP (gate/up/down) with the input requiring grad; decode shape: forward only, T = 1..16 tokens.

Memory: bytes of activations saved for backward (any device), and peak allocated memory on CUDA. Besides wall-clock
medians, the table gives the ratio of minima and of median process CPU time, which other load on the machine
disturbs less than wall-clock time.

    python tools/bench_mole.py                       # CPU grid of the docs (about 10 minutes on 2 cores)
    python tools/bench_mole.py --quick               # K=3, r=32, balanced only
    python tools/bench_mole.py --device cuda --dtype bfloat16 --hidden 4096 --ffn 11008 --tokens 8192
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from mole_lightning.peft import MoLEConfig, MoLELinear, apply_mole
from mole_lightning.peft.layers import select_impl

ROUTINGS = ("balanced", "skewed", "one_expert")


@dataclass
class Result:
    group: str
    variant: str
    median_ms: float
    min_ms: float
    cpu_median_ms: float
    p10_ms: float
    p90_ms: float
    saved_mib: float
    peak_mib: float | None
    ratio_to_lora: float | None = None


def make_mlp(hidden: int, ffn: int, device: torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=ffn, hidden_act="silu", mlp_bias=False)
    mlp = LlamaMLP(config).to(device=device, dtype=dtype)
    for p in mlp.parameters():
        p.requires_grad_(False)
    return mlp


def randomize_b(model: nn.Module) -> None:
    """Non-zero B so timings include real values (zeros could take fast paths); seeded, same in every variant."""
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_b" in name.lower():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def set_routing(model: nn.Module, routing: str) -> None:
    """balanced: random router; skewed: Zipf-like expert preference; one_expert: every token to expert 0."""
    gen = torch.Generator().manual_seed(1)
    for module in model.modules():
        if type(module).__name__ != "MoLERouter":
            continue
        k, d = module.weight.shape
        with torch.no_grad():
            module.weight.copy_(torch.randn(k, d, generator=gen) * (0.5 / d**0.5))
            if routing == "balanced":
                module.bias.zero_()
            elif routing == "skewed":
                module.bias.copy_(-1.2 * torch.log(torch.arange(1, k + 1, dtype=torch.float32)))
            else:
                module.bias.zero_()
                module.bias[0] = 50.0


def build_variants(base: nn.Module, num_experts: int, rank: int, routing: str, with_peft: bool) -> dict[str, nn.Module]:
    variants: dict[str, nn.Module] = {"base": base}
    lora = apply_mole(copy.deepcopy(base), MoLEConfig(num_experts=1, rank=rank, alpha=2.0 * rank))
    variants["lora"] = lora
    if with_peft:
        import peft  # optional dependency (the dev extra)

        config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["gate_proj", "up_proj", "down_proj"])
        # peft's default upcasts the adapters of a bf16/fp16 base to fp32 (autocast_adapter_dtype=True); the second
        # variant keeps them in the base dtype. Ours: fp32 master weights computed in the input's dtype.
        variants["peft_lora"] = peft.get_peft_model(copy.deepcopy(base), config)
        if next(base.parameters()).dtype != torch.float32:
            variants["peft_lora_base_dtype"] = peft.get_peft_model(
                copy.deepcopy(base), config, autocast_adapter_dtype=False
            )
    if num_experts > 1:
        matched = num_experts * rank
        variants[f"lora_r{matched}"] = apply_mole(
            copy.deepcopy(base), MoLEConfig(num_experts=1, rank=matched, alpha=2.0 * matched)
        )
        cfg = MoLEConfig(num_experts=num_experts, rank=rank, alpha=2.0 * rank, impl="loop")
        mole = apply_mole(copy.deepcopy(base), cfg)
        for impl in ("loop", "dense_masked", "grouped", "auto"):  # identical weights, only the compute path differs
            variants[f"mole_{impl}"] = copy.deepcopy(mole)
            for module in variants[f"mole_{impl}"].modules():
                if isinstance(module, MoLELinear):
                    module.impl = impl
        variants["soft_dense"] = apply_mole(
            copy.deepcopy(base), MoLEConfig(num_experts=num_experts, rank=rank, alpha=2.0 * rank, gate="soft")
        )
    for model in variants.values():
        randomize_b(model)
        set_routing(model, routing)
    return variants


def saved_bytes(step: Callable[[], None]) -> int:
    """Bytes of tensors autograd saves for backward during one forward (unique storages)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


def time_group(
    group: str,
    steps: dict[str, Callable[[], None]],
    device: torch.device,
    repeats: int,
    iters: int,
    warmup: int = 2,
    forward_only: bool = False,
) -> list[Result]:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for step in steps.values():
        for _ in range(warmup):
            step()
    sync()
    times: dict[str, list[float]] = {name: [] for name in steps}
    cpu_times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():  # interleaved: every variant once per round
            sync()
            start, cpu_start = time.perf_counter(), time.process_time()
            for _ in range(iters):
                step()
            sync()
            times[name].append((time.perf_counter() - start) * 1000 / iters)
            cpu_times[name].append((time.process_time() - cpu_start) * 1000 / iters)
    results = []
    for name, step in steps.items():
        peak = None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            step()
            sync()
            peak = torch.cuda.max_memory_allocated(device) / 2**20
        saved = 0.0 if forward_only else saved_bytes(step) / 2**20
        ts = sorted(times[name])
        results.append(
            Result(
                group=group,
                variant=name,
                median_ms=statistics.median(ts),
                min_ms=ts[0],
                cpu_median_ms=statistics.median(cpu_times[name]),
                p10_ms=ts[max(0, int(0.1 * len(ts)))],
                p90_ms=ts[min(len(ts) - 1, int(0.9 * len(ts)))],
                saved_mib=saved,
                peak_mib=peak,
            )
        )
    lora_ms = next(r.median_ms for r in results if r.variant == "lora")
    for r in results:
        r.ratio_to_lora = r.median_ms / lora_ms
    return results


def training_steps(variants: dict[str, nn.Module], x: torch.Tensor, grad_out: torch.Tensor):
    def make(model: nn.Module) -> Callable[[], None]:
        def step() -> None:
            inp = x.detach().requires_grad_(True)
            out = model(inp)
            out.backward(grad_out)
            for p in model.parameters():
                p.grad = None

        return step

    return {name: make(model) for name, model in variants.items()}


def decode_steps(variants: dict[str, nn.Module], x: torch.Tensor):
    def make(model: nn.Module) -> Callable[[], None]:
        def step() -> None:
            with torch.inference_mode():
                model(x)

        return step

    return {name: make(model) for name, model in variants.items()}


def resolved_auto_impl(model: nn.Module, x: torch.Tensor) -> str:
    """The compute path ``impl="auto"`` picks for the block's first projection and these inputs."""
    proj = next(m for m in model.modules() if isinstance(m, MoLELinear))
    return select_impl("auto", x, proj.lora_A, proj.lora_B, dense=False)


def check_impls_agree(variants: dict[str, nn.Module], x: torch.Tensor, grad_out: torch.Tensor) -> str:
    """Largest deviation of each MoLE impl from the loop reference (outputs and input grads), relative to scale."""
    if "mole_loop" not in variants:
        return ""
    outputs = {}
    for name in ("mole_loop", "mole_dense_masked", "mole_grouped", "mole_auto"):
        inp = x.detach().requires_grad_(True)
        out = variants[name](inp)
        out.backward(grad_out)
        outputs[name] = (out.detach().float(), inp.grad.float())
        for p in variants[name].parameters():
            p.grad = None
    ref_out, ref_grad = outputs.pop("mole_loop")
    parts = []
    for name, (out, grad) in outputs.items():
        dev_out = ((out - ref_out).abs().max() / ref_out.abs().max()).item()
        dev_grad = ((grad - ref_grad).abs().max() / ref_grad.abs().max()).item()
        parts.append(f"{name}: out {dev_out:.1e}, grad {dev_grad:.1e}")
    return "max |impl - loop| / max |loop|: " + "; ".join(parts)


def print_results(title: str, results: list[Result]) -> None:
    print(f"\n### {title}")
    print(
        "| variant | median ms | p10–p90 ms | × plain LoRA | min × plain LoRA | CPU-time × plain LoRA "
        "| saved act. MiB | peak MiB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    lora = next(r for r in results if r.variant == "lora")
    for r in results:
        peak = "–" if r.peak_mib is None else f"{r.peak_mib:.0f}"
        print(
            f"| {r.variant} | {r.median_ms:.2f} | {r.p10_ms:.2f}–{r.p90_ms:.2f} | {r.ratio_to_lora:.3f} "
            f"| {r.min_ms / lora.min_ms:.3f} | {r.cpu_median_ms / lora.cpu_median_ms:.3f} "
            f"| {r.saved_mib:.1f} | {peak} |"
        )


SUMMARY_COLUMNS = (
    "base",
    "peft_lora",
    "peft_lora_base_dtype",
    "lora_matched",
    "mole_loop",
    "mole_dense_masked",
    "mole_grouped",
    "mole_auto",
)


def summary_table(results: list[Result]) -> str:
    """One row per group: every variant's median time as a ratio to plain LoRA (lora_matched = rank K*r)."""
    groups: dict[str, dict[str, float]] = {}
    for r in results:
        name = "lora_matched" if r.variant.startswith("lora_r") else r.variant
        groups.setdefault(r.group, {})[name] = r.ratio_to_lora
    columns = (*SUMMARY_COLUMNS, "soft_dense")
    lines = ["| group | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for group, ratios in groups.items():
        cells = [f"{ratios[c]:.2f}" if c in ratios else "–" for c in columns]
        lines.append(f"| {group} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The command line of this tool (also parsed by the documented-commands test)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    parser.add_argument("--hidden", type=int, default=None, help="d (CPU default 1024, CUDA default 4096)")
    parser.add_argument("--ffn", type=int, default=None, help="MLP width (CPU default 2816, CUDA default 11008)")
    parser.add_argument("--tokens", type=int, default=None, help="T = batch x sequence (CPU 2048, CUDA 8192)")
    parser.add_argument("--experts", type=int, nargs="+", default=[1, 3, 8])
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 32, 128])
    parser.add_argument("--routings", nargs="+", default=list(ROUTINGS), choices=ROUTINGS)
    parser.add_argument("--decode-tokens", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--iters", type=int, default=None, help="iterations per timed repeat")
    parser.add_argument("--no-peft", action="store_true", help="skip the peft LoRA reference")
    parser.add_argument("--quick", action="store_true", help="K=3, r=32, balanced routing, decode T=1 and 16")
    parser.add_argument("--json", default=None, help="also write all results to this JSON file")
    return parser


def main() -> None:
    args = build_parser().parse_args()

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    hidden = args.hidden or (4096 if cuda else 1024)
    ffn = args.ffn or (11008 if cuda else 2816)
    tokens = args.tokens or (8192 if cuda else 2048)
    iters = args.iters or (10 if cuda else 1)
    if args.quick:
        args.experts, args.ranks, args.routings, args.decode_tokens = [3], [32], ["balanced"], [1, 16]

    device_name = torch.cuda.get_device_name(device) if cuda else f"{platform.processor() or 'cpu'}"
    print(f"# bench_mole: {device_name}, torch {torch.__version__}, threads {torch.get_num_threads()}, {dtype}")
    print(f"# MLP d={hidden}, ffn={ffn}, T={tokens}; repeats={args.repeats} x {iters} iters, interleaved; medians")
    base = make_mlp(hidden, ffn, device, dtype)
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(tokens, hidden, generator=gen).to(device=device, dtype=dtype)
    grad_out = torch.randn(tokens, hidden, generator=gen).to(device=device, dtype=dtype)
    everything: list[Result] = []
    for rank in args.ranks:
        for k in args.experts:
            for routing in args.routings if k > 1 else ["-"]:
                variants = build_variants(base, k, rank, routing if k > 1 else "balanced", not args.no_peft)
                group = f"train K={k} r={rank} routing={routing}"
                agreement = check_impls_agree(variants, x, grad_out)
                results = time_group(group, training_steps(variants, x, grad_out), device, args.repeats, iters)
                if "mole_auto" in variants:
                    print(f"auto resolves to: {resolved_auto_impl(variants['mole_auto'], x)}")
                print_results(group, results)
                if agreement:
                    print(agreement)
                everything += results
    decode_k = 3 if 3 in args.experts else max(args.experts)
    decode_r = 32 if 32 in args.ranks else args.ranks[0]
    for t in args.decode_tokens:
        variants = build_variants(base, decode_k, decode_r, "balanced", not args.no_peft)
        xt = x[:t].contiguous()
        group = f"decode fwd-only T={t} K={decode_k} r={decode_r}"
        results = time_group(group, decode_steps(variants, xt), device, args.repeats, 20 * iters, forward_only=True)
        print_results(group, results)
        everything += results
    print("\n### Summary: median time / plain-LoRA median time")
    print(summary_table(everything))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.__dict__ for r in everything], f, indent=1)


if __name__ == "__main__":
    main()
