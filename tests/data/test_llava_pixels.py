"""Pixel parity with LLaVA-1.5's image pipeline and with transformers' CLIP and SigLIP image processors.

The reference is LLaVA's ``LazySupervisedDataset.__getitem__`` re-implemented here: ``Image.open(path).convert("RGB")``,
``expand2square(image, tuple(int(x * 255) for x in processor.image_mean))`` (image pasted at ``(w − h) // 2`` on the
short side), then ``processor.preprocess(image)["pixel_values"][0]`` with transformers' own PIL-backed
``CLIPImageProcessorPil`` (the slow ``CLIPImageProcessor`` LLaVA ran) at openai/clip-vit-large-patch14-336's
``preprocessor_config.json`` values. Differences are stated in grey levels, ``|ours − reference| · std · 255``.

Measured on the 11 images of ``IMAGES`` (``pad``, every channel; mean / max per image):

* before (resize to the long side then pad, torchvision's uint8 bicubic, alpha composited on white, JPEG ``draft``
  by default): photos mean 0.09–3.4, max 11–114 (the 100×61 upscale worst); 1-px / 3-px checkerboards mean 0.84 /
  20.9, max 15 / 126; 1×500 and 500×1 lines max 56; RGBA mean 44.7, max 255; a 1400×1000 JPEG mean 0.83, max 15
  (``draft`` alone, with the new resize: mean 0.82, max 14).
* after (pad first, PIL bicubic as transformers calls it, ``convert("RGB")``, full JPEG decode): max 1.7e-5, mean
  ≤ 4e-6 grey levels (float32 rounding of the normalisation); the uint8 pixels are identical on every image.
* transformers 5's default (torchvision-backed) ``CLIPImageProcessor`` on the same padded squares differs from the
  PIL one LLaVA ran by at most 1 grey level (mean ≤ 0.005).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from mole_lightning.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, SIGLIP_MEAN_STD
from mole_lightning.data.images import ImageProcessor
from mole_lightning.data.samples import SampleEncoder
from mole_lightning.models.vision import vision_geometry

CLIP_336 = dict(  # openai/clip-vit-large-patch14-336 preprocessor_config.json
    size={"shortest_edge": 336},
    crop_size={"height": 336, "width": 336},
    do_resize=True,
    do_center_crop=True,
    resample=3,
    do_rescale=True,
    rescale_factor=1 / 255,
    do_normalize=True,
    image_mean=list(OPENAI_CLIP_MEAN),
    image_std=list(OPENAI_CLIP_STD),
    do_convert_rgb=True,
)
SIGLIP_384 = dict(  # google/siglip-so400m-patch14-384 preprocessor_config.json
    size={"height": 384, "width": 384},
    do_resize=True,
    resample=3,
    do_rescale=True,
    rescale_factor=1 / 255,
    do_normalize=True,
    image_mean=list(SIGLIP_MEAN_STD),
    image_std=list(SIGLIP_MEAN_STD),
)


# ------------------------------------------------------------------------------------------------- test images
def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Photo-like: smooth colour gradients plus Gaussian noise (σ = 12 grey levels)."""
    gen = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    u, v = x / max(width - 1, 1), y / max(height - 1, 1)
    base = np.stack([u, v, 0.5 + 0.5 * np.sin(6.0 * (u + v))], axis=-1) * 255.0
    noisy = base + gen.normal(0.0, 12.0, base.shape)
    return Image.fromarray(np.clip(noisy + 0.5, 0, 255).astype(np.uint8), mode="RGB")


def checkerboard(width: int, height: int, cell: int) -> Image.Image:
    """Black/white-ish squares of ``cell`` pixels (the highest frequencies a resize must filter)."""
    y, x = np.mgrid[0:height, 0:width]
    on = ((x // cell + y // cell) % 2).astype(bool)
    pixels = np.where(on[..., None], np.array([250, 240, 10]), np.array([5, 20, 230])).astype(np.uint8)
    return Image.fromarray(pixels, mode="RGB")


def rgba(width: int, height: int) -> Image.Image:
    """A photo with alpha varying from 0 (left) to 255 (right), plus random alpha in the bottom half."""
    gen = np.random.default_rng(3)
    alpha = np.tile(np.linspace(0, 255, width), (height, 1))
    alpha[height // 2 :] = gen.integers(0, 256, (height - height // 2, width))
    rgb = np.asarray(photo(width, height, seed=4))
    return Image.fromarray(np.dstack([rgb, alpha.astype(np.uint8)]), mode="RGBA")


IMAGES = {
    "photo_wide_640x480": lambda: photo(640, 480),
    "photo_tall_480x640": lambda: photo(480, 640, seed=1),
    "photo_odd_337x211": lambda: photo(337, 211, seed=2),
    "photo_upscaled_100x61": lambda: photo(100, 61, seed=5),
    "photo_square_336": lambda: photo(336, 336, seed=6),
    "line_1x500": lambda: photo(1, 500, seed=7),
    "line_500x1": lambda: photo(500, 1, seed=8),
    "checker_1px_500x333": lambda: checkerboard(500, 333, 1),
    "checker_3px_333x500": lambda: checkerboard(333, 500, 3),
    "rgba_300x200": lambda: rgba(300, 200),
    "grey_211x337": lambda: photo(211, 337, seed=9).convert("L"),
}


# ------------------------------------------------------------------------------ LLaVA-1.5, re-implemented
def llava_expand2square(image: Image.Image, background: tuple[int, ...]) -> Image.Image:
    width, height = image.size
    if width == height:
        return image
    if width > height:
        square = Image.new(image.mode, (width, width), background)
        square.paste(image, (0, (width - height) // 2))
    else:
        square = Image.new(image.mode, (height, height), background)
        square.paste(image, ((height - width) // 2, 0))
    return square


def llava_pixels(image: Image.Image, processor, aspect: str = "pad") -> np.ndarray:
    """``(3, S, S)`` float32 pixel values of LLaVA's ``__getitem__`` for an opened image."""
    image = image.convert("RGB")
    if aspect == "pad":
        image = llava_expand2square(image, tuple(int(x * 255) for x in processor.image_mean))
    return processor.preprocess(image, return_tensors="np")["pixel_values"][0]


def clip_processor():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(**CLIP_336)


def siglip_processor():
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    return SiglipImageProcessorPil(**SIGLIP_384)


def grey_levels(ours: torch.Tensor, reference: np.ndarray, std) -> np.ndarray:
    """``|ours − reference| · std · 255`` per element: the difference in 8-bit pixel units."""
    return np.abs(ours.numpy().astype(np.float64) - reference) * np.asarray(std).reshape(3, 1, 1) * 255.0


def uint8_of(reference: np.ndarray, mean, std) -> torch.Tensor:
    """The 8-bit pixels behind normalised values (``round((x · std + mean) · 255)``)."""
    values = (reference * np.asarray(std).reshape(3, 1, 1) + np.asarray(mean).reshape(3, 1, 1)) * 255.0
    return torch.from_numpy(np.rint(values).astype(np.uint8))


def assert_llava_equal(processor: ImageProcessor, image: Image.Image, reference: np.ndarray) -> None:
    ours = processor(image)
    assert ours.shape == reference.shape and ours.dtype == torch.float32
    assert grey_levels(ours, reference, processor.std).max() <= 1.0
    # both sides run PIL's bicubic resize on the same uint8 image, so the 8-bit pixels are the same ones
    assert torch.equal(processor.pixels(image), uint8_of(reference, processor.mean, processor.std))


# -------------------------------------------------------------------------------------------------- the tests
@pytest.fixture(scope="module")
def clip():
    return clip_processor()


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_pad_equals_llava_expand2square_then_clip_processor(clip, name):
    image = IMAGES[name]()
    processor = ImageProcessor(336, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, aspect="pad")
    assert processor.fill == (122, 116, 104)  # int(mean · 255), truncated as expand2square's argument
    assert_llava_equal(processor, image, llava_pixels(image, clip))


@pytest.mark.parametrize("name", ["photo_wide_640x480", "photo_odd_337x211", "checker_3px_333x500", "rgba_300x200"])
def test_crop_equals_clip_processor(clip, name):
    image = IMAGES[name]()
    processor = ImageProcessor(336, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, aspect="crop")
    assert_llava_equal(processor, image, llava_pixels(image, clip, aspect="crop"))


@pytest.mark.parametrize("aspect", ["resize", "pad"])
@pytest.mark.parametrize("name", ["photo_wide_640x480", "checker_1px_500x333", "line_500x1"])
def test_siglip_resize_and_pad_equal_siglip_processor(name, aspect):
    image = IMAGES[name]()
    processor = ImageProcessor(384, SIGLIP_MEAN_STD, SIGLIP_MEAN_STD, aspect=aspect)
    assert processor.fill == (127, 127, 127)
    assert_llava_equal(processor, image, llava_pixels(image, siglip_processor(), aspect=aspect))


def test_alpha_is_dropped_not_composited():
    image = Image.new("RGBA", (4, 2), (10, 20, 30, 0))  # fully transparent
    pixels = ImageProcessor(4, aspect="pad").pixels(image)
    fill = ImageProcessor(4).fill
    assert pixels[:, 1:3].flatten(1).unique(dim=1).tolist() == [[10], [20], [30]]  # colour kept, as convert("RGB")
    assert pixels[:, 0].flatten(1).unique(dim=1).flatten().tolist() == list(fill)  # row 0: expand2square's fill


def test_jpeg_bytes_decode_as_pil_full_decode_unless_draft_is_asked(clip):
    buffer = io.BytesIO()
    photo(1400, 1000, seed=10).save(buffer, format="JPEG", quality=90)
    data = buffer.getvalue()
    reference = llava_pixels(Image.open(io.BytesIO(data)), clip)  # LLaVA: Image.open(path).convert("RGB")
    processor = ImageProcessor(336, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, aspect="pad")
    assert processor.decode(data).size == (1400, 1000)
    assert_llava_equal(processor, Image.open(io.BytesIO(data)), reference)
    assert torch.equal(processor.pixels(data), uint8_of(reference, processor.mean, processor.std))

    drafted = ImageProcessor(336, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, aspect="pad", jpeg_draft=True)
    assert drafted.decode(data).size == (350, 250)  # 1/4 scale: the largest reduction keeping 336 × 240
    assert drafted.pixels(data).shape == (3, 336, 336)
    # the training encoder decodes in full unless the option is set
    assert not SampleEncoder("unused-tokenizer").image_processor.jpeg_draft
    assert SampleEncoder("unused-tokenizer", image_jpeg_draft=True).image_processor.jpeg_draft


@pytest.mark.parametrize(("kind", "aspect"), [("clip", "pad"), ("clip", "crop"), ("siglip", "resize")])
def test_the_tower_folder_configures_size_mean_and_std(real_folders, kind, aspect):
    """Geometry read from a hub-format tower folder gives its own ``preprocessor_config.json``'s pixels."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    folder = real_folders[kind]
    geometry = vision_geometry(kind="hf", name_or_path=str(folder), config=None)
    reference_cls = CLIPImageProcessorPil if kind == "clip" else SiglipImageProcessorPil
    reference = reference_cls.from_pretrained(folder)
    processor = ImageProcessor(geometry.image_size, geometry.image_mean, geometry.image_std, aspect=aspect)
    image = photo(337, 211, seed=11)
    assert_llava_equal(processor, image, llava_pixels(image, reference, aspect))
