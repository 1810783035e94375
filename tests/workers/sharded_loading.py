"""One rank of the sharded-loading check (two ranks started by ``tests/training/test_sharded_loading.py``, gloo on CPU).

Builds the model of ``--spec`` through ``MoLELightningModule.configure_model`` with a device mesh (meta build,
``fully_shard``, per-rank reads of the folders' safetensors) and without one (the unsharded ``from_pretrained``
path), then compares every parameter's full tensor, every buffer and the logits on one batch; rank 0 writes the
result to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mole_lightning.peft import MoLEConfig  # noqa: E402
from mole_lightning.training import ModelSpec, MoLELightningModule  # noqa: E402
from tests.workers import end_process_group  # noqa: E402

MOLE = MoLEConfig(num_experts=3, rank=4, alpha=8.0, dropout=0.0, balance_coef=0.01)
SEED = 7


def batch(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Two samples: BOS, one image's placeholders, 20 random text tokens."""
    generator = torch.Generator().manual_seed(0)
    text = torch.randint(3, len(model.tokenizer) - 1, (2, 20), generator=generator)
    image = torch.full((2, model.num_image_tokens), model.image_token_id)
    input_ids = torch.cat([torch.ones(2, 1, dtype=torch.long), image, text], dim=1)
    size = model.vision_tower.image_size
    pixels = torch.randn(2, 3, size, size, generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values": pixels}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", required=True, help="ModelSpec fields as JSON")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    from torch.distributed.device_mesh import init_device_mesh

    spec = ModelSpec(**json.loads(args.spec))
    meta = MoLELightningModule(architecture=spec, mole=MOLE, model_seed=SEED).build_model(frozen_on_meta=True)
    meta_names = sorted(name for name, param in meta.named_parameters() if param.is_meta)
    del meta

    sharded = MoLELightningModule(architecture=spec, mole=MOLE, model_seed=SEED)
    sharded._device_mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    sharded.configure_model()
    reference = MoLELightningModule(architecture=spec, mole=MOLE, model_seed=SEED).build_model()

    expected = dict(reference.named_parameters())
    different, dtensors = [], 0
    for name, param in sharded.model.named_parameters():
        dtensors += hasattr(param, "full_tensor")
        full = param.full_tensor() if hasattr(param, "full_tensor") else param
        ref = expected.pop(name, None)
        if ref is None or full.dtype != ref.dtype or not torch.equal(full.detach(), ref.detach()):
            different.append(name)
    buffers = dict(reference.named_buffers())
    different += [n for n, b in sharded.model.named_buffers() if not torch.equal(b, buffers.pop(n, b.new_empty(0)))]
    inputs = batch(reference)
    with torch.no_grad():
        logits = sharded.model.eval()(**inputs).logits
        ref_logits = reference.eval()(**inputs).logits
    embeddings = reference.language_model.get_input_embeddings().weight
    first_new = int(reference.image_token_id)
    if dist.get_rank() == 0:
        result = {
            "meta_parameters": meta_names,
            "dtensors": dtensors,
            "different": different,
            "missing": sorted(expected) + sorted(buffers),
            "logits_equal": bool(torch.equal(logits, ref_logits)),
            "logits_finite": bool(torch.isfinite(logits).all()),
            "rows": int(embeddings.shape[0]),
            "new_row_is_mean": bool(
                torch.allclose(embeddings[first_new].float(), embeddings[:first_new].float().mean(0), atol=1e-2)
            ),
            "dtype": str(embeddings.dtype),
        }
        Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
    end_process_group()
