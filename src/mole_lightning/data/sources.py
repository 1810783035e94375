"""Source specs: shard URL lists (brace patterns, ``::`` lists, folders, globs, URLs, ``pipe:``), their local files
and sample counts, and the ``{name: {"urls", "weight"}}`` source dicts of the DataModule resolved to URL lists."""

from __future__ import annotations

import glob
import json
import os
import warnings
from collections.abc import Sequence
from typing import Any

import braceexpand

from mole_lightning.data.shard_writer import SIZES_FILE


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


def resolve_sources(sources: dict[str, dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    """Expands each source's ``urls``; drops missing local shards (warning) and sources left without shards.

    Raises:
        ValueError: On malformed source entries.
        FileNotFoundError: If no source has a readable shard.
    """
    resolved: dict[str, dict[str, Any]] = {}
    for name, config in sources.items():
        if not isinstance(config, dict) or "urls" not in config:
            raise ValueError(f"{kind} source {name!r} must be a dict with 'urls' (and 'weight'), got {config!r}")
        urls = expand_urls(config["urls"])
        missing = [u for u in urls if is_local(u) and not os.path.exists(local_path(u))]
        if missing:
            warnings.warn(f"{kind} source {name!r}: {len(missing)} missing shard(s), e.g. {missing[0]}", stacklevel=2)
        urls = [u for u in urls if u not in missing]
        if not urls:
            warnings.warn(f"{kind} source {name!r} has no shards left, dropping it", stacklevel=2)
            continue
        weight = float(config.get("weight", 1.0))
        if weight < 0:
            raise ValueError(f"{kind} source {name!r} has a negative weight {weight}")
        resolved[name] = {"urls": urls, "weight": weight}
    if sources and not resolved:
        raise FileNotFoundError(f"none of the {kind} sources {list(sources)} has a readable shard")
    return resolved
