"""Image decoding and preprocessing for the vision tower, as in LLaVA-1.5.

``aspect`` decides how a non-square image becomes the tower's square input:

* ``pad`` -- LLaVA-1.5's ``expand2square``: the image is centred on a square filled with the mean colour
  (``int(image_mean × 255)``, truncated as LLaVA does). Implemented as resize-then-pad, which equals
  pad-then-resize up to resampling at the border and is much cheaper for large images.
* ``resize`` -- squash to ``image_size`` × ``image_size`` (aspect ratio not kept).
* ``crop`` -- CLIP's default: shortest side to ``image_size``, then centre crop.

Any PIL mode becomes RGB first: alpha (RGBA, LA, PA, P with transparency) is composited on white, CMYK/YCbCr/L/1/P
are converted, and 16-bit or float images (``I;16``, ``I``, ``F``) are rescaled to 8 bit.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2.functional import InterpolationMode, resize

from mole_lightning.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from mole_lightning.pixels import normalize_pixels

ASPECTS = ("pad", "resize", "crop")


def to_rgb(image: Image.Image) -> Image.Image:
    """Converts any PIL image to 8-bit RGB.

    Args:
        image: An image in any mode (RGB, RGBA, LA, P, L, 1, CMYK, YCbCr, I;16, I, F, ...).

    Returns:
        An ``RGB`` image of the same size.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I") or mode == "F":
        values = np.asarray(image, dtype=np.float32)
        if values.ndim == 3:  # e.g. I;16 RGB variants decoded as (H, W, C)
            values = values[..., 0]
        peak = float(values.max()) if values.size else 0.0
        if mode == "F" and peak <= 1.0:
            values = values * 255.0
        elif peak > 255.0:
            values = values * (255.0 / 65535.0) if peak <= 65535.0 else values * (255.0 / peak)
        gray = Image.fromarray(np.clip(values + 0.5, 0, 255).astype(np.uint8), mode="L")
        return gray.convert("RGB")
    return image.convert("RGB")


class ImageProcessor:
    """Decodes image bytes into the tower's square input: uint8 pixels (:meth:`pixels`) or, normalized, a float tensor.

    Calling the processor gives the normalized ``(3, image_size, image_size)`` float32 tensor
    ``(x / 255 − mean) / std``; the training pipeline sends :meth:`pixels` (uint8) and the model normalizes on its
    device (:func:`mole_lightning.pixels.normalize_pixels`, the same formula).

    Args:
        image_size: Side of the square tower input (336 for ViT-L/14-336).
        mean: Per-channel mean in [0, 1] (also the ``pad`` fill colour).
        std: Per-channel standard deviation.
        aspect: ``"pad"``, ``"resize"`` or ``"crop"``.
    """

    def __init__(
        self,
        image_size: int = 336,
        mean: Sequence[float] = OPENAI_CLIP_MEAN,
        std: Sequence[float] = OPENAI_CLIP_STD,
        aspect: str = "pad",
    ) -> None:
        if aspect not in ASPECTS:
            raise ValueError(f"image aspect must be one of {ASPECTS}, got {aspect!r}")
        self.image_size = int(image_size)
        self.aspect = aspect
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.fill = tuple(int(m * 255) for m in self.mean)  # truncated, as LLaVA's expand2square

    def _target_size(self, width: int, height: int) -> tuple[int, int]:
        size = self.image_size
        if self.aspect == "resize":
            return size, size
        scale = size / max(width, height) if self.aspect == "pad" else size / min(width, height)
        return max(1, round(width * scale)), max(1, round(height * scale))

    def decode(self, data: bytes) -> Image.Image:
        """Decodes encoded image bytes (JPEG decoding is shrunk early with ``draft`` when the image is large)."""
        image = Image.open(io.BytesIO(data))
        if image.format == "JPEG":
            image.draft("RGB", self._target_size(*image.size))
        image.load()
        return image

    def to_square(self, image: Image.Image) -> torch.Tensor:
        """Applies ``to_rgb`` and the aspect policy; returns the ``(3, image_size, image_size)`` uint8 pixels.

        Resampling is bicubic with antialiasing on uint8 tensors (torchvision), which equals PIL's bicubic resize up
        to one grey level and is several times faster.
        """
        image = to_rgb(image)
        size = self.image_size
        width, height = image.size
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1)  # (3, H, W)
        target_w, target_h = self._target_size(width, height)
        if (target_w, target_h) != (width, height):
            pixels = resize(pixels, [target_h, target_w], interpolation=InterpolationMode.BICUBIC, antialias=True)
        if self.aspect == "pad" and (target_w, target_h) != (size, size):
            canvas = torch.tensor(self.fill, dtype=torch.uint8).view(3, 1, 1).repeat(1, size, size)  # (3, S, S)
            left, top = (size - target_w) // 2, (size - target_h) // 2
            canvas[:, top : top + target_h, left : left + target_w] = pixels
            pixels = canvas
        elif self.aspect == "crop" and (target_w, target_h) != (size, size):
            left, top = (target_w - size) // 2, (target_h - size) // 2
            pixels = pixels[:, top : top + size, left : left + size]
        return pixels

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(3, H, W)`` uint8 pixels → float32 tensor, ``(x / 255 - mean) / std``."""
        return normalize_pixels(pixels, self.mean, self.std)

    def pixels(self, image: bytes | Image.Image) -> torch.Tensor:
        """Encoded bytes or a PIL image → the ``(3, image_size, image_size)`` uint8 pixels (not normalized)."""
        if isinstance(image, (bytes, bytearray, memoryview)):
            image = self.decode(bytes(image))
        return self.to_square(image)

    def __call__(self, image: bytes | Image.Image) -> torch.Tensor:
        """Processes encoded bytes or a PIL image into the tower's normalized float32 input tensor."""
        return self.normalize(self.pixels(image))
