"""One rank of the FSDP2 new-token-rows check (two ranks started by ``tests/training/test_token_rows_fsdp2.py``,
gloo on CPU).

Builds a tiny LLaVA-MoLE whose added ``<image>`` row of the LM head trains (``token_rows.output``), shards it with
``fully_shard_llava_mole``, runs one backward and one SGD step, and writes what changed to ``--out`` (rank 0).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mole_lightning.models import build_llava_mole  # noqa: E402
from mole_lightning.peft import MoLEConfig  # noqa: E402
from mole_lightning.training.strategies import fully_shard_llava_mole  # noqa: E402
from tests.tiny_models import clip_config_kwargs, tiny_batch  # noqa: E402
from tests.workers import end_process_group  # noqa: E402


def full(weight: torch.Tensor) -> torch.Tensor:
    return weight.full_tensor() if hasattr(weight, "full_tensor") else weight


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--llm", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    from torch.distributed.device_mesh import init_device_mesh

    torch.manual_seed(0)
    mole = MoLEConfig(num_experts=3, rank=4, alpha=8.0, dropout=0.0, balance_coef=0.01)
    model = build_llava_mole(
        llm_path=args.llm, vision_config=clip_config_kwargs(), mole=mole, train_new_token_rows=True
    ).train()
    start = model.token_row_start
    fully_shard_llava_mole(model, init_device_mesh("cpu", (dist.get_world_size(),)))
    head = model.language_model.get_output_embeddings().weight
    rows = model.token_rows["output"]
    before, rows_before = full(head).detach().clone(), full(rows).detach().clone()
    batch = tiny_batch(model.image_token_id)
    batch["labels"][0, -1] = model.image_token_id  # the new head row gets a gradient
    model(**batch).total_loss.backward()
    grad = full(rows.grad).detach().clone()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0).step()
    head_after, rows_after = full(head).detach(), full(rows).detach()  # collectives: on every rank
    if dist.get_rank() == 0:
        result = {
            "sharded": hasattr(rows, "full_tensor"),
            "start": start,
            "rows": int(before.shape[0]),
            "trained_rows": list(rows_after.shape),
            "frozen_weights_have_grad": head.requires_grad or head.grad is not None,
            "head_changed": bool((head_after != before).any()),
            "new_row_grad": bool(grad.any()),
            "new_row_step": bool(torch.equal(rows_after, rows_before - grad)),  # SGD, lr 1
        }
        Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()  # returns with the model freed
    end_process_group()
