"""Error bounds for a matmul, derived from the dtype its kernel rounds to: tolerances that follow the kernel that runs.

CPUs differ in the kernel a library picks for the same call (bitsandbytes' fused bf16 4-bit kernel on AVX-512-BF16
Intel CPUs, a dequantize + fp32 ``F.linear`` elsewhere), so a test compares against the exact product in float64 and
allows what that kernel's rounding can add, never a number measured on one machine.
"""

from __future__ import annotations

import torch


def unit_roundoff(dtype: torch.dtype) -> float:
    """``u``: the largest relative error of rounding one real number to ``dtype`` (half its machine epsilon)."""
    return torch.finfo(dtype).eps / 2


def bnb_kernel_dtype(weight: torch.Tensor, compute_dtype: torch.dtype = torch.float32) -> torch.dtype:
    """The dtype bitsandbytes' CPU backend multiplied a 4-bit ``weight`` in, read off the weight after the forward.

    On CPUs with AVX-512-BF16, ``Linear4bit.forward`` in eval mode without grad repacks the weight for its fused
    kernel (``quant_state.packing_format_for_cpu``), which rounds the input, the block absmax and the output to bf16
    and accumulates in fp32. Otherwise it dequantizes to ``compute_dtype`` and calls ``F.linear``."""
    return torch.bfloat16 if getattr(weight.quant_state, "packing_format_for_cpu", False) else compute_dtype


def linear_error_bound(
    x: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype, roundings: int, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Bound on ``|y - (x W^T + b)|`` for ``y`` computed by a kernel that rounds to ``dtype`` with fp32 accumulation.

    Each product ``x_k w_jk`` carries ``roundings`` relative roundings to ``dtype`` (input, weight, its scale, the
    product...): ``(1 + u)^roundings - 1`` of ``|x| |W|^T``; summing ``K`` terms in fp32 adds ``gamma_K = K u32 /
    (1 - K u32)`` of the same; rounding the output (and a bias add) to ``dtype`` adds ``2 u |x W^T + b|``.
    Shapes: x (..., K), weight (N, K), bias (N,) -> (..., N), float64."""
    u, u32 = unit_roundoff(dtype), unit_roundoff(torch.float32)
    x, weight = x.double(), weight.double()
    exact = x @ weight.T + (bias.double() if bias is not None else 0)
    gamma = weight.shape[1] * u32 / (1 - weight.shape[1] * u32)
    magnitude = x.abs() @ weight.abs().T + (bias.double().abs() if bias is not None else 0)
    return ((1 + u) ** roundings - 1 + gamma) * magnitude + 2 * u * exact.abs()


def assert_linear_within_rounding(y, x, weight, dtype, roundings, bias=None, name=""):
    """``y`` equals ``x W^T + b`` up to :func:`linear_error_bound` everywhere."""
    exact = x.double() @ weight.double().T + (bias.double() if bias is not None else 0)
    excess = (y.double() - exact).abs() - linear_error_bound(x, weight, dtype, roundings, bias)
    assert excess.max() <= 0, (name, dtype, excess.max().item())
