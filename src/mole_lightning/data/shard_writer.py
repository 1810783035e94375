"""Writing webdataset shards: ``<source>-%06d.tar`` files of samples and the ``sizes.json`` beside them.

A shard is a tar file of samples; the files of one sample share a key (``000000042.json``, ``000000042.jpg``).
``sizes.json`` beside the shards maps each shard file name to its sample count (the open_clip convention) and is used
to size epochs (:func:`~mole_lightning.data.sources.count_samples`).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterable
from typing import Any

SIZES_FILE = "sizes.json"

IMAGE_FIELD_BY_SUFFIX = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp", ".bmp": "bmp", ".gif": "gif"}
"""Image file suffix → the sample field its bytes are written under."""


def image_field(path: str) -> str:
    """The sample field for the bytes of the image file ``path`` (by its suffix; ``jpg`` without one)."""
    suffix = os.path.splitext(path)[1].lower()
    return IMAGE_FIELD_BY_SUFFIX.get(suffix, suffix.lstrip(".") or "jpg")


IMAGE_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "jpg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BM", "bmp"),
)
"""Leading bytes of encoded images → the sample field their bytes are written under (WebP: ``RIFF....WEBP``)."""


def image_field_of_bytes(data: bytes) -> str | None:
    """The sample field for encoded image bytes without a file name (by their leading bytes); ``None`` if the bytes
    are no JPEG, PNG, GIF, BMP or WebP image."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    for magic, name in IMAGE_MAGIC:
        if data.startswith(magic):
            return name
    return None


def shard_pattern(out_dir: str, source: str) -> str:
    """Returns the ``printf`` pattern of a source's shards, ``<out_dir>/<source>-%06d.tar``."""
    return os.path.join(out_dir, f"{source}-%06d.tar")


def shard_brace_spec(out_dir: str, source: str, num_shards: int) -> str:
    """Returns a brace spec such as ``out/general-{000000..000003}.tar`` covering ``num_shards`` shards."""
    if num_shards == 1:
        return os.path.join(out_dir, f"{source}-000000.tar")
    return os.path.join(out_dir, f"{source}-{{000000..{num_shards - 1:06d}}}.tar")


class ShardWriter:
    """Writes samples into numbered tar shards of at most ``maxcount`` samples and records ``sizes.json``.

    Use as a context manager; ``sizes.json`` in ``out_dir`` is merged with an existing one (other sources).

    Args:
        out_dir: Output directory (created if missing).
        source: Source name; shards are ``<source>-%06d.tar``.
        maxcount: Maximum samples per shard.
    """

    def __init__(self, out_dir: str, source: str, maxcount: int = 10000) -> None:
        if maxcount < 1:
            raise ValueError("maxcount must be >= 1")
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir = out_dir
        self.source = source
        self.maxcount = maxcount
        self.sizes: dict[str, int] = {}
        self._writer: tarfile.TarFile | None = None
        self._current: str | None = None

    def write(self, sample: dict[str, Any]) -> None:
        """Writes one sample (``__key__`` plus fields: ``json`` dict/bytes, image bytes under their extension)."""
        if self._writer is None or self.sizes[self._current] >= self.maxcount:
            self._open_next()
        write_tar_sample(self._writer, sample)
        self.sizes[self._current] += 1

    def _open_next(self) -> None:
        self._close_current()
        self._current = os.path.basename(shard_pattern(self.out_dir, self.source) % len(self.sizes))
        self.sizes[self._current] = 0
        self._writer = tarfile.open(os.path.join(self.out_dir, self._current), "w", format=tarfile.GNU_FORMAT)

    def _close_current(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def close(self) -> None:
        """Closes the last shard and merges this source's counts into ``sizes.json``."""
        self._close_current()
        update_sizes_file(self.out_dir, self.sizes)

    @property
    def brace_spec(self) -> str:
        """Brace spec of the shards written so far."""
        return shard_brace_spec(self.out_dir, self.source, max(1, len(self.sizes)))

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def encode_field(value: Any) -> bytes:
    """Bytes of one sample field: bytes as-is, ``str`` as UTF-8, anything else as JSON."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    return json.dumps(value).encode("utf-8")


def write_tar_sample(tar: tarfile.TarFile, sample: dict[str, Any]) -> None:
    """Appends one sample to an open tar file as ``<__key__>.<field>`` members (webdataset layout)."""
    key = sample["__key__"]
    if "." in key or "/" in key:
        raise ValueError(f"sample key {key!r} must not contain '.' or '/'")
    for name, value in sample.items():
        if name.startswith("__"):
            continue
        data = encode_field(value)
        info = tarfile.TarInfo(f"{key}.{name}")
        info.size = len(data)
        info.mode = 0o444
        info.mtime = 0
        tar.addfile(info, io.BytesIO(data))


def update_sizes_file(out_dir: str, sizes: dict[str, int]) -> None:
    """Merges ``sizes`` (shard file name → samples) into ``out_dir/sizes.json``."""
    path = os.path.join(out_dir, SIZES_FILE)
    merged: dict[str, int] = {}
    if os.path.exists(path):
        with open(path) as handle:
            merged = json.load(handle)
    merged.update(sizes)
    with open(path, "w") as handle:
        json.dump(dict(sorted(merged.items())), handle, indent=1)


def write_samples(samples: Iterable[dict[str, Any]], out_dir: str, source: str, maxcount: int = 10000) -> str:
    """Writes samples of one source as shards; returns their brace spec."""
    with ShardWriter(out_dir, source, maxcount) as writer:
        for sample in samples:
            writer.write(sample)
    return writer.brace_spec
