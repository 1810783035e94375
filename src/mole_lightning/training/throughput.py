"""Training FLOPs of a LLaVA-MoLE batch, and Lightning's ``ThroughputMonitor`` counting tokens (MFU where known).

FLOPs of one training step (recomputation by activation checkpointing excluded; attention scores excluded)::

    2·P_llm·T            frozen LLM forward (every matmul weight, LM head included; embedding lookups excluded)
  + 2·P_llm·T            backward through the frozen LLM: input gradients only (no weight gradients)
  + 6·P_adapter·T        adapters: forward, input and weight gradients; one expert of K per token (+ routers)
  + 2·P_vision·M·N_v     frozen vision tower forward, no backward (N_v patches + class token per image)
  + 6·P_proj·M·N         projector forward and backward on the N image features of the M images

``T`` is the number of non-padding tokens of the batch (image placeholders included).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lightning.pytorch.callbacks import ThroughputMonitor

from mole_lightning.peft import LoRALinear, MoLELinear, MoLERouter
from mole_lightning.peft.quantization import logical_numel


@dataclass(frozen=True)
class ParameterCounts:
    """Parameters that take part in the matmuls of one token (``adapter``: the active expert of each MoLE block)."""

    llm: int
    adapter: int
    vision: int
    projector: int


def parameter_counts(model: Any) -> ParameterCounts:
    """Count the parameters of a ``LlavaMoLE`` by role (shapes only; works on sharded and meta tensors)."""
    embeddings = {id(w) for w in model.embedding_weights()[:1]}
    adapter = 0
    for module in model.language_model.modules():
        if isinstance(module, MoLELinear):
            adapter += (module.lora_A.numel() + module.lora_B.numel()) // module.num_experts
        elif isinstance(module, LoRALinear):
            adapter += module.lora_A.numel() + module.lora_B.numel()
        elif isinstance(module, MoLERouter):
            adapter += sum(p.numel() for p in module.parameters())
    frozen = (p for p in model.language_model.parameters() if not p.requires_grad and id(p) not in embeddings)
    llm = sum(logical_numel(p) for p in frozen)  # a 4-bit weight counts the weights it stands for
    vision = sum(p.numel() for p in model.vision_tower.parameters())
    projector = sum(p.numel() for p in model.projector.parameters())
    return ParameterCounts(llm=llm, adapter=adapter, vision=vision, projector=projector)


def training_flops(counts: ParameterCounts, tokens: int, images: int, image_tokens: int) -> int:
    """FLOPs of one training step on ``tokens`` non-padding tokens with ``images`` images (formula above)."""
    text = (4 * counts.llm + 6 * counts.adapter) * tokens
    vision = 2 * counts.vision * images * (image_tokens + 1) + 6 * counts.projector * images * image_tokens
    return int(text + vision)


def batch_tokens(batch: dict[str, Any]) -> int:
    """Non-padding tokens of a batch (image placeholders included)."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())


def batch_size(batch: dict[str, Any]) -> int:
    """Samples in a batch."""
    return int(batch["input_ids"].shape[0])


class TokenThroughputMonitor(ThroughputMonitor):
    """Lightning's ``ThroughputMonitor`` for LLaVA-MoLE batches: samples and tokens per second (``items`` are
    non-padding tokens) per device and over all devices, FLOPs/s from the module's ``flops_per_batch`` and MFU
    where Lightning knows the device's peak (CUDA); logged as ``train/device/items_per_sec``, ``train/items_per_sec``,
    ``train/device/flops_per_sec``, ``train/device/mfu``...

    Args:
        window_size: Batches averaged over.
    """

    def __init__(self, window_size: int = 20) -> None:
        super().__init__(batch_size_fn=batch_size, length_fn=batch_tokens, window_size=window_size)
