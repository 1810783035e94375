"""Source specs: shard URL lists (brace patterns, ``::`` lists, folders, globs, URLs, ``pipe:``), their local files
and sample counts, and the ``{name: {"urls", "weight" | "frequency"}}`` source dicts of the DataModule resolved to
URL lists and mixing weights.

Two ways to say how sources mix, one per spec:

* ``weight`` w_m: the probability that a training sample comes from source m is w_m / Σ_k w_k, whatever the
  sources' sizes.
* ``frequency`` λ_m (the LLaVA-MoLE paper's per-dataset sampling frequency): the mixture is D_mix = Σ_m λ_m D_m, every
  sample of D_m counted λ_m times (λ = 1: the plain concatenation; λ = 2: the source twice). A sample then comes
  from m with probability λ_m N_m / Σ_k λ_k N_k, so ``frequency`` resolves to the weight w_m = λ_m N_m / Σ_k λ_k N_k,
  N_m being the source's sample count from the ``sizes.json`` beside its shards. An epoch of D_mix holds
  Σ_m λ_m N_m samples (``mix_samples`` of each resolved source: λ_m N_m).

A source giving both is an error, and so are specs mixing the two kinds (a weight is not comparable to λ_m N_m)."""

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
    """Expands each source's ``urls``; drops missing local shards (warning) and sources left without shards; turns
    frequencies into weights (module docstring).

    Returns:
        ``{name: {"urls": [...], "weight": w}}``; with frequencies also ``"frequency"`` λ_m, ``"samples"`` N_m and
        ``"mix_samples"`` λ_m N_m, the weights then summing to 1.

    Raises:
        ValueError: On malformed source entries: no ``urls``, a negative weight or frequency, both ``weight`` and
            ``frequency``, frequencies for some sources only, or a frequency for shards without ``sizes.json``.
        FileNotFoundError: If no source has a readable shard.
    """
    with_frequency = [name for name, config in sources.items() if isinstance(config, dict) and "frequency" in config]
    if with_frequency and len(with_frequency) != len(sources):
        others = [name for name in sources if name not in with_frequency]
        raise ValueError(
            f"{kind} sources {with_frequency} give a frequency and {others} do not: give every source a frequency "
            "(per-dataset lambda_m) or none (per-sample weights)"
        )
    resolved: dict[str, dict[str, Any]] = {}
    for name, config in sources.items():
        if not isinstance(config, dict) or "urls" not in config:
            raise ValueError(
                f"{kind} source {name!r} must be a dict with 'urls' (and 'weight' or 'frequency'), got {config!r}"
            )
        if "frequency" in config and "weight" in config:
            raise ValueError(f"{kind} source {name!r} gives both 'weight' and 'frequency'; give one")
        urls = expand_urls(config["urls"])
        missing = [u for u in urls if is_local(u) and not os.path.exists(local_path(u))]
        if missing:
            warnings.warn(f"{kind} source {name!r}: {len(missing)} missing shard(s), e.g. {missing[0]}", stacklevel=2)
        urls = [u for u in urls if u not in missing]
        if not urls:
            warnings.warn(f"{kind} source {name!r} has no shards left, dropping it", stacklevel=2)
            continue
        if "frequency" in config:
            resolved[name] = {"urls": urls, **frequency_entry(name, kind, float(config["frequency"]), urls)}
            continue
        weight = float(config.get("weight", 1.0))
        if weight < 0:
            raise ValueError(f"{kind} source {name!r} has a negative weight {weight}")
        resolved[name] = {"urls": urls, "weight": weight}
    if sources and not resolved:
        raise FileNotFoundError(f"none of the {kind} sources {list(sources)} has a readable shard")
    if with_frequency:
        total = sum(config["mix_samples"] for config in resolved.values())
        if total <= 0:
            raise ValueError(f"{kind} sources: every frequency is 0 (or every source is empty)")
        for config in resolved.values():
            config["weight"] = config["mix_samples"] / total  # w_m = λ_m N_m / Σ_k λ_k N_k
    return resolved


def frequency_entry(name: str, kind: str, frequency: float, urls: Sequence[str]) -> dict[str, Any]:
    """``{"frequency": λ_m, "samples": N_m, "mix_samples": λ_m N_m}`` of one source (N_m from ``sizes.json``).

    Raises:
        ValueError: A negative frequency, or shards whose count ``sizes.json`` does not give.
    """
    if frequency < 0:
        raise ValueError(f"{kind} source {name!r} has a negative frequency {frequency}")
    samples = count_samples(urls)
    if samples is None:
        raise ValueError(
            f"{kind} source {name!r}: a frequency needs the source's sample count, and sizes.json beside its "
            "shards does not give it (write the shards with mole-convert, or give a weight instead)"
        )
    return {"frequency": frequency, "samples": samples, "mix_samples": frequency * samples}
