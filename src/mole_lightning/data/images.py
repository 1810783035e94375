"""Image decoding and preprocessing for the vision tower, pixel for pixel as LLaVA-1.5 does it.

``aspect`` decides how a non-square image becomes the tower's square input ``S`` × ``S``:

* ``pad`` -- LLaVA-1.5 (``image_aspect_ratio pad``): :func:`expand_to_square` first, at the image's own resolution
  (LLaVA's ``expand2square``: the image pasted on a ``max(w, h)`` square of the mean colour
  ``int(mean × 255)``, offset ``(w − h) // 2`` on the short side), then the ``crop`` steps below, which on a square
  are a plain bicubic resize to ``S`` × ``S``.
* ``crop`` -- ``CLIPImageProcessor``: :func:`resize_shortest_side` (shortest side to ``S``, the other
  ``int(S · long / short)``, PIL bicubic), then :func:`center_crop` (offsets ``(w − S) // 2``, ``(h − S) // 2``).
* ``resize`` -- ``SiglipImageProcessor``: PIL bicubic resize straight to ``S`` × ``S`` (aspect ratio not kept).

Resampling is PIL's ``Image.resize(..., BICUBIC)``, the call transformers' image processors make, so the uint8
pixels are the ones LLaVA's pipeline computes (tested against ``CLIPImageProcessor`` / ``SiglipImageProcessor``).
Normalisation ``(x / 255 − mean) / std`` runs on the model's device (:mod:`mole_lightning.pixels`).

Images become RGB with PIL's ``convert("RGB")``, as LLaVA's ``Image.open(path).convert("RGB")``: alpha is dropped
(not composited), CMYK/YCbCr/L/1/P are converted. The one departure: 16-bit and float images (``I;16``, ``I``,
``F``), which ``convert`` clips at 255, are rescaled to 8 bit. JPEGs are decoded at full size unless ``jpeg_draft``
asks for PIL's reduced-scale decoding (faster on large photos, not LLaVA's pixels).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from mole_lightning.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from mole_lightning.pixels import normalize_pixels

ASPECTS = ("pad", "resize", "crop")

BICUBIC = Image.Resampling.BICUBIC
"""Resampling of CLIP's and SigLIP's image processors (``resample=3``)."""


def to_rgb(image: Image.Image) -> Image.Image:
    """Converts any PIL image to 8-bit RGB, as LLaVA's ``convert("RGB")`` does.

    Alpha is dropped, not composited (a transparent pixel keeps its colour), and a palette's transparency is
    ignored. 16-bit and float images, which ``convert`` would clip at 255, are rescaled to 8 bit instead: ``I;16``
    and ``I`` by 255 / 65535 when their peak exceeds 255, ``F`` by 255 when its values lie in [0, 1].

    Args:
        image: An image in any mode (RGB, RGBA, LA, P, L, 1, CMYK, YCbCr, I;16, I, F, ...).

    Returns:
        An ``RGB`` image of the same size.
    """
    mode = image.mode
    if mode == "RGB":
        return image
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
    if mode == "La":  # premultiplied LA: PIL converts it to LA only
        image = image.convert("LA")
    with warnings.catch_warnings():  # PIL warns on palettes with byte transparency; LLaVA converts them all the same
        warnings.filterwarnings("ignore", message="Palette images with Transparency", category=UserWarning)
        return image.convert("RGB")


def expand_to_square(image: Image.Image, fill: tuple[int, ...]) -> Image.Image:
    """LLaVA's ``expand2square``: ``image`` centred on a ``max(w, h)`` square of colour ``fill``.

    A wide image is pasted at ``(0, (w − h) // 2)``, a tall one at ``((h − w) // 2, 0)``; a square one is returned
    as is.
    """
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), fill)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def shortest_side_size(width: int, height: int, size: int) -> tuple[int, int]:
    """``(w, h)`` after resizing the shortest side to ``size``: the other side becomes ``int(size · long / short)``
    (truncated, as transformers' ``get_resize_output_image_size`` with ``default_to_square=False``)."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def resize_shortest_side(image: Image.Image, size: int) -> Image.Image:
    """Bicubic resize of the shortest side to ``size`` (:func:`shortest_side_size`), as ``CLIPImageProcessor``."""
    return image.resize(shortest_side_size(*image.size, size), resample=BICUBIC)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """The centre ``size`` × ``size`` window, at ``((w − size) // 2, (h − size) // 2)`` (transformers' offsets).

    Raises:
        ValueError: If the image is smaller than ``size`` on either side.
    """
    width, height = image.size
    if width < size or height < size:
        raise ValueError(f"center_crop needs an image of at least {size}x{size}, got {width}x{height}")
    left, top = (width - size) // 2, (height - size) // 2
    return image.crop((left, top, left + size, top + size))


class ImageProcessor:
    """Decodes image bytes into the tower's square input: uint8 pixels (:meth:`pixels`) or, normalized, a float tensor.

    Calling the processor gives the normalized ``(3, image_size, image_size)`` float32 tensor
    ``(x / 255 − mean) / std``; the training pipeline sends :meth:`pixels` (uint8) and the model normalizes on its
    device (:func:`mole_lightning.pixels.normalize_pixels`, the same formula). Size, mean and std come from the
    tower (the CLI links them from the model's :class:`~mole_lightning.models.vision.VisionGeometry`).

    Args:
        image_size: Side of the square tower input (336 for ViT-L/14-336, 384 for SigLIP-384).
        mean: Per-channel mean in [0, 1] (also the ``pad`` fill colour, ``int(mean × 255)``).
        std: Per-channel standard deviation.
        aspect: ``"pad"`` (LLaVA-1.5), ``"crop"`` (CLIP's processor) or ``"resize"`` (SigLIP's processor).
        jpeg_draft: Decode large JPEGs at a reduced scale (PIL ``draft``) that still leaves the target size: faster,
            but the pixels then differ from LLaVA's full decode (mean 0.8, max 14 grey levels on a 1400×1000
            photo). Off by default.
    """

    def __init__(
        self,
        image_size: int = 336,
        mean: Sequence[float] = OPENAI_CLIP_MEAN,
        std: Sequence[float] = OPENAI_CLIP_STD,
        aspect: str = "pad",
        jpeg_draft: bool = False,
    ) -> None:
        if aspect not in ASPECTS:
            raise ValueError(f"image aspect must be one of {ASPECTS}, got {aspect!r}")
        self.image_size = int(image_size)
        self.aspect = aspect
        self.jpeg_draft = bool(jpeg_draft)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.fill = tuple(int(m * 255) for m in self.mean)  # truncated, as LLaVA's expand2square

    def _draft_size(self, width: int, height: int) -> tuple[int, int]:
        """The smallest decoded size the aspect policy still needs (``draft`` keeps at least this)."""
        size = self.image_size
        if self.aspect == "resize":
            return size, size
        scale = size / max(width, height) if self.aspect == "pad" else size / min(width, height)
        return max(1, round(width * scale)), max(1, round(height * scale))

    def decode(self, data: bytes) -> Image.Image:
        """Decodes encoded image bytes (full size; reduced-scale JPEG decoding only with ``jpeg_draft``)."""
        image = Image.open(io.BytesIO(data))
        if self.jpeg_draft and image.format == "JPEG":
            image.draft("RGB", self._draft_size(*image.size))
        image.load()
        return image

    def to_square(self, image: Image.Image) -> torch.Tensor:
        """Applies :func:`to_rgb` and the aspect policy; returns the ``(3, image_size, image_size)`` uint8 pixels."""
        image = to_rgb(image)
        size = self.image_size
        if self.aspect == "resize":
            image = image.resize((size, size), resample=BICUBIC)
        else:
            if self.aspect == "pad":
                image = expand_to_square(image, self.fill)
            image = center_crop(resize_shortest_side(image, size), size)
        return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1)  # (3, S, S)

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
