"""Shard files: writing ``<source>-%06d.tar`` shards with ``sizes.json``, LLaVA JSON conversion, URL specs.

A shard is a tar file of samples; the files of one sample share a key (``000000042.json``, ``000000042.jpg``).
``sizes.json`` beside the shards maps each shard file name to its sample count (the open_clip convention) and is used
to size epochs.
"""

from __future__ import annotations

import glob
import io
import json
import os
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import braceexpand

SIZES_FILE = "sizes.json"


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


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """Expands a shard spec into a list of URLs.

    Accepts one string or a list; each entry may be a brace pattern (``a-{000000..000009}.tar``), several entries
    joined by ``::``, a local directory (all ``*.tar`` in it), a glob with ``*``, an ``http(s)://`` URL or a
    ``pipe:`` command.
    """
    entries = [urls] if isinstance(urls, str) else list(urls)
    expanded: list[str] = []
    for entry in entries:
        for part in str(entry).split("::"):
            part = part.strip()
            if not part:
                continue
            if os.path.isdir(part):
                expanded.extend(sorted(glob.glob(os.path.join(part, "*.tar"))))
            elif "*" in part and "://" not in part and not part.startswith("pipe:"):
                expanded.extend(sorted(glob.glob(part)))
            else:
                expanded.extend(braceexpand.braceexpand(part))
    return expanded


def is_local(url: str) -> bool:
    """Whether ``url`` is a local file path (or ``file:`` URL)."""
    return url.startswith("file:") or ("://" not in url and not url.startswith("pipe:"))


def local_path(url: str) -> str:
    """Strips a ``file:`` prefix (``file:///x`` or ``file:x``)."""
    if url.startswith("file://"):
        return url[len("file://") :]
    return url[len("file:") :] if url.startswith("file:") else url


def count_samples(urls: Sequence[str]) -> int | None:
    """Total samples of local shards from the ``sizes.json`` beside them; ``None`` if any count is unknown."""
    total = 0
    cache: dict[str, dict[str, int]] = {}
    for url in urls:
        if not is_local(url):
            return None
        path = local_path(url)
        directory = os.path.dirname(os.path.abspath(path))
        if directory not in cache:
            sizes_path = os.path.join(directory, SIZES_FILE)
            if not os.path.exists(sizes_path):
                return None
            with open(sizes_path) as handle:
                cache[directory] = json.load(handle)
        count = cache[directory].get(os.path.basename(path))
        if count is None:
            return None
        total += int(count)
    return total


IMAGE_FIELD_BY_SUFFIX = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp", ".bmp": "bmp", ".gif": "gif"}


@dataclass
class ConversionReport:
    """Result of :func:`convert_llava_records`.

    Attributes:
        written: Records written.
        skipped: ``[{"index": i, "id": ..., "reason": kind, "detail": ...}]`` for every record not written.
        sizes: Shard file name → samples.
        brace_spec: Brace spec of the written shards.
    """

    written: int = 0
    skipped: list[dict[str, Any]] = field(default_factory=list)
    sizes: dict[str, int] = field(default_factory=dict)
    brace_spec: str = ""

    def skipped_by_reason(self) -> dict[str, int]:
        """Skipped record counts per reason."""
        counts: dict[str, int] = {}
        for entry in self.skipped:
            counts[entry["reason"]] = counts.get(entry["reason"], 0) + 1
        return counts


def load_llava_json(path: str) -> list[Any]:
    """Reads a LLaVA JSON list (``.json``) or one record per line (``.jsonl``)."""
    with open(path, encoding="utf-8") as handle:
        if path.endswith(".jsonl"):
            return [json.loads(line) for line in handle if line.strip()]
        data = json.load(handle)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records")
    return data


def convert_llava_records(
    records: Iterable[Any],
    images_dir: str,
    out_dir: str,
    source: str,
    maxcount: int = 10000,
    verify_images: bool = False,
    progress: bool = False,
    total: int | None = None,
) -> ConversionReport:
    """Writes LLaVA-format records (``id``, ``image``, ``conversations``) as shards of one source.

    Each record becomes ``{__key__: <9-digit index>, <ext>: image bytes (unchanged), json: record + source}``.
    Records are skipped (and reported, never silently) for: ``bad_record`` (not an object / no conversations
    list), conversation problems (``wrong_roles``, ``empty_text``, ``no_assistant_turn``,
    ``bad_image_placeholder``), ``missing_image`` (``image`` file not found, or ``<image>`` without ``image``),
    ``multiple_images`` (an ``image`` list of more than one path; a one-element list is read as its path) and, with
    ``verify_images``, ``corrupt_image``.

    Args:
        records: Parsed JSON records.
        images_dir: Folder that ``image`` paths are relative to.
        out_dir: Output folder for ``<source>-%06d.tar`` and ``sizes.json``.
        source: Source name (written into every json as ``source``).
        maxcount: Samples per shard.
        verify_images: Decode every image to catch corrupt files (slower).
        progress: Show a tqdm progress bar.
        total: Number of records, for the progress bar.

    Returns:
        The conversion report.
    """
    from tqdm import tqdm

    from mole_lightning.constants import DEFAULT_IMAGE_TOKEN
    from mole_lightning.data.templates import BadSampleError, normalize_conversation

    report = ConversionReport()
    iterator = tqdm(records, total=total, desc=f"{source} → shards", unit="rec", disable=not progress)
    with ShardWriter(out_dir, source, maxcount) as writer:
        for index, record in enumerate(iterator):
            record_id = record.get("id", index) if isinstance(record, dict) else index

            def skip(reason: str, detail: str = "", _index: int = index, _id: Any = record_id) -> None:
                report.skipped.append({"index": _index, "id": _id, "reason": reason, "detail": detail})

            if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
                skip("bad_record", "not an object with a 'conversations' list")
                continue
            try:
                normalize_conversation(record["conversations"])
            except BadSampleError as error:
                skip(error.kind, str(error))
                continue
            sample: dict[str, Any] = {"__key__": f"{index:09d}"}
            image = record.get("image")
            if isinstance(image, (list, tuple)):  # LLaVA-style lists: one image per sample is supported
                if len(image) > 1:
                    skip("multiple_images", f"{len(image)} images; one image per sample is supported")
                    continue
                image = image[0] if image else None
                record = {**record, "image": image}
            if image:
                path = os.path.join(images_dir, str(image))
                if not os.path.isfile(path):
                    skip("missing_image", path)
                    continue
                with open(path, "rb") as handle:
                    data = handle.read()
                if verify_images and not _decodes(data):
                    skip("corrupt_image", path)
                    continue
                suffix = os.path.splitext(path)[1].lower()
                sample[IMAGE_FIELD_BY_SUFFIX.get(suffix, suffix.lstrip(".") or "jpg")] = data
            elif any(DEFAULT_IMAGE_TOKEN in str(t.get("value", "")) for t in record["conversations"]):
                skip("missing_image", "<image> in text but no 'image' field")
                continue
            sample["json"] = {**record, "id": str(record_id), "source": source}
            writer.write(sample)
            report.written += 1
    report.sizes = dict(writer.sizes)
    report.brace_spec = writer.brace_spec
    return report


def _decodes(data: bytes) -> bool:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
        return True
    except Exception:
        return False
