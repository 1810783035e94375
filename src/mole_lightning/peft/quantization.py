"""4-bit frozen bases (QLoRA) through bitsandbytes: the quantized base matmul of the adapter layers, and the
conversion of a model's frozen ``nn.Linear`` layers to ``bitsandbytes.nn.Linear4bit``.

A quantized (d_out, d_in) weight is a uint8 ``Params4bit`` of shape (d_out * d_in / 2, 1): two 4-bit codes (nf4 or
fp4) per byte, one absmax per block of 64 weights, itself quantized to 8 bits with one fp32 absmax per 256 blocks
(double quantisation): 4 + 8/64 + 32/(64 * 256) = 4.127 bits per weight. ``quant_state`` holds the statistics and
the original shape; the weight is dequantized block by block inside ``bitsandbytes.matmul_4bit`` and never stored
at full precision.

bitsandbytes is optional (``pip install 'mole_lightning[qlora]'``); it is imported only by
:func:`require_bitsandbytes`, and everything else here works on plain tensors without it.
"""

from __future__ import annotations

import math
from typing import Any, Literal, get_args

import torch
from torch import nn

Quantize = Literal["nf4", "fp4"]
QUANTIZE_TYPES: tuple[str, ...] = get_args(Quantize)
"""4-bit data types of ``quantize``: ``"nf4"`` (NormalFloat, QLoRA's) and ``"fp4"``."""

NOT_QUANTIZED: tuple[str, ...] = ("lm_head",)
"""Module-name components never quantized by :func:`quantize_linears` (transformers also keeps the output
embeddings in full precision)."""


def check_quantize(quantize: str | None) -> str | None:
    """``quantize`` itself when it is ``None`` or one of :data:`QUANTIZE_TYPES`.

    Raises:
        ValueError: any other value.
    """
    if quantize is not None and quantize not in QUANTIZE_TYPES:
        raise ValueError(
            f"quantize must be None or one of {QUANTIZE_TYPES} (a bitsandbytes 4-bit base), got {quantize!r}"
        )
    return quantize


def require_bitsandbytes() -> Any:
    """The ``bitsandbytes`` module (the one place it is imported).

    Raises:
        ImportError: naming the install command when it is missing.
    """
    try:
        import bitsandbytes  # optional dependency (the qlora extra)
    except ImportError as err:
        raise ImportError(
            "a 4-bit base (quantize='nf4'/'fp4') needs bitsandbytes: pip install bitsandbytes "
            "(or pip install 'mole_lightning[qlora]')"
        ) from err
    return bitsandbytes


def is_4bit(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a quantized bitsandbytes ``Params4bit`` (packed codes with a ``quant_state``)."""
    return bool(getattr(tensor, "bnb_quantized", False)) and getattr(tensor, "quant_state", None) is not None


def is_quantized(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a 4-bit ``Params4bit``."""
    return any(is_4bit(p) for p in model.parameters())


def logical_numel(tensor: torch.Tensor) -> int:
    """Number of weights a parameter stands for: the original shape's for a 4-bit one, ``numel()`` otherwise."""
    return math.prod(tensor.quant_state.shape) if is_4bit(tensor) else tensor.numel()


def linear_4bit(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``x W^T + b`` for a 4-bit ``weight``, as ``bitsandbytes.nn.Linear4bit.forward`` computes it.

    Shapes: x (..., d_in), weight the packed (d_out * d_in / 2, 1) codes of a (d_out, d_in) matrix -> (..., d_out).
    The matmul runs in ``compute_dtype`` (``None``: x's dtype) and returns x's dtype; gradients flow to x (and to a
    trainable bias), never to the frozen codes.
    """
    bnb = require_bitsandbytes()
    dtype = compute_dtype or x.dtype
    if bias is not None:
        bias = bias.to(dtype)
    out = bnb.matmul_4bit(x.to(dtype), weight.t(), bias=bias, quant_state=weight.quant_state)
    return out.to(x.dtype)


def dequantized_weight(weight: torch.Tensor) -> torch.Tensor:
    """The (d_out, d_in) matrix a 4-bit ``weight`` stands for, in its original dtype (a plain weight: itself)."""
    if not is_4bit(weight):
        return weight
    return require_bitsandbytes().functional.dequantize_4bit(weight.data, weight.quant_state)


def quantize_linears(
    model: nn.Module,
    quantize: str = "nf4",
    *,
    compute_dtype: torch.dtype | None = None,
    skip: tuple[str, ...] = NOT_QUANTIZED,
) -> int:
    """Replace every plain ``nn.Linear`` of ``model`` by a frozen 4-bit ``bitsandbytes.nn.Linear4bit``, in place.

    What ``from_pretrained(..., quantization_config=BitsAndBytesConfig(...))`` (``models.builders``) does while
    loading, for a model already built (e.g. from a config): the same codes (double quantisation, blocksize 64),
    quantized on the weight's device. Layers named like ``skip`` (a module-name component) and the output embeddings
    stay as they are. Call it on the language model only (the vision tower and projector are never quantized).

    Returns:
        The number of layers replaced.

    Raises:
        ValueError: a bad ``quantize``, or a layer on the meta device (nothing to quantize yet).
    """
    check_quantize(quantize)
    bnb = require_bitsandbytes()
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Linear and module is not output and not any(p in skip for p in name.split("."))
    ]
    for name, linear in targets:
        if linear.weight.is_meta:
            raise ValueError(f"quantize_linears: {name} is on the meta device; load its weights first")
        layer = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=compute_dtype,
            compress_statistics=True,
            quant_type=quantize,
            device="meta",
        )
        codes = bnb.nn.Params4bit(
            linear.weight.data, requires_grad=False, compress_statistics=True, quant_type=quantize, module=layer
        )
        layer.weight = codes.to(linear.weight.device)  # quantizes: (d_out * d_in / 2, 1) uint8 + quant_state
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.data, requires_grad=False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
    return len(targets)


__all__ = [
    "NOT_QUANTIZED",
    "QUANTIZE_TYPES",
    "Quantize",
    "check_quantize",
    "dequantized_weight",
    "is_4bit",
    "is_quantized",
    "linear_4bit",
    "logical_numel",
    "quantize_linears",
    "require_bitsandbytes",
]
