"""Pixel normalisation shared by the data workers and the model.

Workers send images as uint8 pixels (0..255, after resizing and padding to a square), a quarter of the bytes of
float32; the model normalises them on its device, where they enter the vision tower::

    x_norm[c] = (x[c] / 255 − mean[c]) / std[c]        for each channel c

computed in float32 as one fused multiply-add, ``x · 1 / (255 · std) − mean / std``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def normalize_pixels(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 pixels ``(..., 3, H, W)`` → float32 ``(x / 255 − mean) / std`` per channel, on the pixels' device.

    Raises:
        ValueError: If ``pixels`` is not uint8 or has no channel axis of size 3 before ``(H, W)``.
    """
    if pixels.dtype != torch.uint8:
        raise ValueError(f"normalize_pixels expects uint8 pixels (0..255), got {pixels.dtype}")
    if pixels.ndim < 3 or pixels.shape[-3] != 3:
        raise ValueError(f"pixels must have shape (..., 3, H, W), got {tuple(pixels.shape)}")
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], device=pixels.device).view(3, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(mean, std)], device=pixels.device).view(3, 1, 1)
    return torch.addcmul(shift, pixels.float(), scale)
