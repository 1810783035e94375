"""Peak memory per rank while 2 CPU processes (gloo) load a LLaVA-MoLE model for FSDP2: unsharded vs sharded loading.

A stand-in Llama of about 0.5 B parameters (d = 2048, FFN 5632, 10 layers, random weights, bf16) is written as
sharded safetensors with ``save_pretrained(max_shard_size=...)``, with a byte-level tokenizer one token short of
its vocabulary (``<image>`` adds an embedding row, as with vicuna), plus a tiny Llama of the same kind. Each
configuration runs in 2 fresh processes that build the model through the recipe's path (``ModelSpec`` with
``llm_path``, a tiny random CLIP tower, ``mlp2x_gelu``, MoLE K = 3, r = 8, bf16):

- ``old``: ``MoLELightningModule.build_model()`` (``from_pretrained`` on every rank) then ``fully_shard_llava_mole``,
  what ``configure_model`` did before sharded loading;
- ``new``: ``MoLELightningModule.configure_model()`` with the device mesh (meta build, ``fully_shard``, each rank
  reads its rows of the files).

Each rank reports its peak RSS after loading (``VmHWM`` of ``/proc/self/status``: unlike ``ru_maxrss``, it does not
carry the launching process's peak across ``exec``). The ratio printed per path is
``(peak with the 0.5 B LLM - peak with the tiny LLM) / bytes of the 0.5 B LLM``, the largest over the ranks: the
part of the model a rank holds at its peak while loading (1/world + overhead at best).

Usage::

    python tools/bench_load.py [--dir /tmp/bench_load] [--layers 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BIG = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=16, num_key_value_heads=16)
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)
VISION = dict(model_type="clip_vision_model", image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
              num_hidden_layers=2, num_attention_heads=4)  # fmt: skip
MOLE = dict(num_experts=3, rank=8, alpha=16.0, dropout=0.0)


def write_llm(path: Path, fields: dict) -> int:
    """Write a random bf16 Llama folder (sharded safetensors + tokenizer); returns its parameter bytes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mole_lightning.models import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer) - 1, tie_word_embeddings=False, **fields)  # <image> is added
    if not (path / "config.json").exists():
        torch.manual_seed(0)
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(path, max_shard_size="200MB")
        tokenizer.save_pretrained(path)
        del model
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return sum(p.numel() for p in model.parameters()) * 2


def peak_rss() -> int:
    """This process's peak resident set size in bytes (``VmHWM``)."""
    with open("/proc/self/status") as handle:
        line = next(x for x in handle if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def worker(llm: str, path: str) -> None:
    """One rank: load, then report the peak RSS (bytes) of every rank as JSON on rank 0's stdout."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    sys.path.insert(0, str(ROOT / "src"))
    from mole_lightning.peft import MoLEConfig
    from mole_lightning.training import ModelSpec, MoLELightningModule
    from mole_lightning.training.strategies import fully_shard_llava_mole

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    spec = ModelSpec(preset=None, llm_path=llm, vision="hf", vision_config=VISION, dtype="bfloat16")
    module = MoLELightningModule(architecture=spec, mole=MoLEConfig(**MOLE))
    if path == "old":
        fully_shard_llava_mole(module.build_model(), mesh)
    else:
        module._device_mesh = mesh
        module.configure_model()
    peak = peak_rss()
    peaks: list = [None] * dist.get_world_size()
    dist.all_gather_object(peaks, peak)
    if dist.get_rank() == 0:
        print(json.dumps({"peaks": peaks}), flush=True)
    dist.barrier()
    del module
    gc.collect()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(llm: Path, path: str, world: int = 2) -> list[int]:
    """Peak RSS of each of ``world`` fresh processes loading ``llm`` through ``path``."""
    port, processes = free_port(), []
    for rank in range(world):
        env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))  # fmt: skip
        command = [sys.executable, __file__, "--worker", str(llm), path]
        processes.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL))
    outputs = [p.communicate(timeout=1800)[0].decode() for p in processes]
    if any(p.returncode for p in processes):
        raise RuntimeError(f"{path} load of {llm} failed: {[p.returncode for p in processes]}")
    line = next(x for x in outputs[0].splitlines() if x.startswith("{"))
    return json.loads(line)["peaks"]


def build_parser() -> argparse.ArgumentParser:
    """The command line of this tool (also parsed by the documented-commands test)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/tmp/bench_load", help="where the stand-in folders are written (kept)")
    parser.add_argument("--layers", type=int, default=10, help="decoder layers of the stand-in (10: 0.52 B)")
    parser.add_argument("--json", default=None, help="also write the numbers here")
    return parser


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3])
        return
    args = build_parser().parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    root = Path(args.dir)
    big_bytes = write_llm(root / f"llama-{args.layers}l", {**BIG, "num_hidden_layers": args.layers})
    write_llm(root / "llama-tiny", TINY)
    print(f"stand-in LLM: {big_bytes / 2 / 1e9:.3f} B parameters, {big_bytes / 2**30:.2f} GiB (bf16); 2 ranks, gloo")
    results = {"model_bytes": big_bytes}
    for path in ("old", "new"):
        tiny = run(root / "llama-tiny", path)
        big = run(root / f"llama-{args.layers}l", path)
        ratio = max((b - t) / big_bytes for b, t in zip(big, tiny, strict=True))
        results[path] = {"peak_tiny": tiny, "peak_big": big, "ratio": ratio}
        mib = ", ".join(f"{b / 2**20:.0f} - {t / 2**20:.0f} MiB" for b, t in zip(big, tiny, strict=True))
        print(f"{path:>4}: peak RSS growth per rank / model bytes = {ratio:.3f}   (ranks: {mib})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
