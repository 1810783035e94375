"""Image processing: every PIL mode becomes RGB as ``convert("RGB")`` does, pad/resize/crop geometry, normalization.

Pixel parity with LLaVA-1.5 and transformers' image processors is in ``test_llava_pixels.py``.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from mole_lightning.data.images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageProcessor, to_rgb
from mole_lightning.pixels import normalize_pixels

MEAN = torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1)
STD = torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)


def normalized(rgb: tuple[int, int, int]) -> torch.Tensor:
    """Hand-computed normalization of one RGB colour, shape (3,)."""
    return ((torch.tensor(rgb, dtype=torch.float32) / 255).view(3, 1, 1) - MEAN).div(STD).flatten()


@pytest.mark.parametrize(
    ("image", "expected_rgb"),
    [
        (Image.new("RGBA", (4, 4), (10, 20, 30, 255)), (10, 20, 30)),
        (Image.new("RGBA", (4, 4), (10, 20, 30, 0)), (10, 20, 30)),  # alpha dropped, as convert("RGB")
        (Image.new("LA", (4, 4), (100, 0)), (100, 100, 100)),
        (Image.new("L", (4, 4), 77), (77, 77, 77)),
        (Image.new("1", (4, 4), 1), (255, 255, 255)),
        (Image.new("CMYK", (4, 4), (0, 0, 0, 0)), (255, 255, 255)),
        (Image.new("I;16", (4, 4), 65535), (255, 255, 255)),
        (Image.new("I;16", (4, 4), 32896), (128, 128, 128)),
        (Image.new("I", (4, 4), 65535), (255, 255, 255)),
        (Image.new("F", (4, 4), 0.5), (128, 128, 128)),
    ],
)
def test_any_mode_becomes_8bit_rgb(image, expected_rgb):
    rgb = to_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == image.size
    assert rgb.getpixel((1, 1)) == expected_rgb


@pytest.mark.parametrize("transparency", [0, b"\x00", None])
def test_palette_transparency_is_ignored_as_convert_rgb_does(transparency):
    image = Image.new("P", (4, 4), 0)
    image.putpalette([200, 0, 0] + [0, 0, 0] * 255)
    if transparency is not None:
        image.info["transparency"] = transparency
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no PIL warning per image in the data workers
        ours = to_rgb(image).getpixel((0, 0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert ours == (200, 0, 0) == image.convert("RGB").getpixel((0, 0))


@pytest.mark.parametrize(("height", "red_rows"), [(4, range(2, 6)), (5, range(1, 6))])
def test_pad_centres_a_wide_image_on_the_mean_colour(height, red_rows):
    red = Image.new("RGB", (8, height), (255, 0, 0))  # padded to 8×8 at row (8 − h) // 2; no resize at size 8
    pixels = ImageProcessor(8, aspect="pad")(red)
    assert pixels.shape == (3, 8, 8) and pixels.dtype == torch.float32
    fill = tuple(int(m * 255) for m in OPENAI_CLIP_MEAN)  # LLaVA: expand2square(img, tuple(int(x * 255) ...))
    for row in range(8):
        expected = normalized((255, 0, 0) if row in red_rows else fill)
        assert torch.allclose(pixels[:, row, :], expected.view(3, 1).expand(3, 8), atol=1e-5)
    tall = ImageProcessor(8, aspect="pad").pixels(red.transpose(Image.Transpose.TRANSPOSE))
    assert torch.equal(tall, ImageProcessor(8, aspect="pad").pixels(red).transpose(1, 2))  # columns, same offsets


def test_resize_squashes_and_crop_takes_the_centre():
    halves = Image.new("RGB", (60, 20), (0, 0, 255))
    halves.paste((0, 255, 0), (30, 0, 60, 20))  # left half blue, right half green
    squashed = ImageProcessor(6, aspect="resize")(halves)  # 10 input columns per output column
    assert torch.allclose(squashed[:, 3, 0], normalized((0, 0, 255)), atol=1e-5)
    assert torch.allclose(squashed[:, 3, 5], normalized((0, 255, 0)), atol=1e-5)
    bands = Image.new("RGB", (120, 20), (0, 0, 255))
    bands.paste((0, 255, 0), (40, 0, 80, 20))  # blue | green | blue
    cropped = ImageProcessor(6, aspect="crop")(bands)  # 36×6, then the middle 6 columns (all green)
    assert torch.allclose(cropped, normalized((0, 255, 0)).view(3, 1, 1).expand(3, 6, 6), atol=1e-5)


def test_bytes_input_large_jpeg_and_16bit_png_are_decoded():
    processor = ImageProcessor(16, aspect="pad")
    buffer = io.BytesIO()
    Image.new("RGB", (640, 480), (0, 128, 255)).save(buffer, format="JPEG", quality=95)
    pixels = processor(buffer.getvalue())
    assert pixels.shape == (3, 16, 16)
    assert torch.allclose(pixels[:, 8, 8], normalized((0, 128, 255)), atol=0.05)
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)).save(buffer, format="PNG")
    assert torch.allclose(processor(buffer.getvalue())[:, 8, 8], normalized((255, 255, 255)), atol=1e-5)


def test_invalid_aspect_and_corrupt_bytes_raise():
    with pytest.raises(ValueError, match="aspect"):
        ImageProcessor(8, aspect="stretch")
    with pytest.raises(Exception):  # noqa: B017 - PIL raises UnidentifiedImageError / OSError variants
        ImageProcessor(8)(b"not an image")


def test_workers_send_uint8_pixels_whose_normalization_is_the_float_path():
    gen = np.random.default_rng(1)
    buffer = io.BytesIO()
    Image.fromarray((gen.random((30, 50, 3)) * 255).astype(np.uint8)).save(buffer, format="PNG")
    processor = ImageProcessor(image_size=24, aspect="pad")
    pixels = processor.pixels(buffer.getvalue())
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 24, 24)
    by_hand = (pixels.double() / 255 - MEAN.double()) / STD.double()  # reference in float64
    ours = normalize_pixels(pixels, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), by_hand, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(processor(buffer.getvalue()).double(), by_hand, rtol=1e-6, atol=1e-6)  # float path


def test_normalize_pixels_rejects_float_input():
    with pytest.raises(ValueError, match="expects uint8 pixels"):
        normalize_pixels(torch.zeros(3, 2, 2), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
