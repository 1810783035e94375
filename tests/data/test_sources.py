"""Shard specs: brace patterns, ``::`` lists, folders and URLs expanded; sample counts only for local shards;
per-dataset frequencies λ_m turned into weights λ_m N_m / Σ λ_k N_k."""

from __future__ import annotations

import os

import pytest

from mole_lightning.data.shard_writer import SIZES_FILE
from mole_lightning.data.sources import count_samples, expand_urls, resolve_sources
from tests.data.conftest import record, write_source


def test_expand_urls_handles_braces_lists_directories_and_double_colons(tmp_path):
    for name in ("a-000000.tar", "a-000001.tar"):
        (tmp_path / name).write_bytes(b"")
    assert expand_urls("x-{000000..000002}.tar") == ["x-000000.tar", "x-000001.tar", "x-000002.tar"]
    assert expand_urls(["http://h/a.tar", "pipe:cat b.tar"]) == ["http://h/a.tar", "pipe:cat b.tar"]
    assert expand_urls("p.tar::q.tar") == ["p.tar", "q.tar"]
    assert expand_urls(str(tmp_path)) == [str(tmp_path / "a-000000.tar"), str(tmp_path / "a-000001.tar")]
    assert count_samples(["http://h/a.tar"]) is None


def text_shards(directory, source: str, count: int, maxcount: int) -> str:
    """``count`` text-only samples of ``source`` in shards of ``maxcount`` (with their sizes.json)."""
    return write_source(str(directory), source, [record(i, "q?", "a.", image=False) for i in range(count)], maxcount)


def test_frequencies_resolve_to_weights_proportional_to_frequency_times_size(tmp_path):
    big = text_shards(tmp_path / "big", "big", 30, maxcount=20)  # N = 30 in two shards (20 + 10)
    small = text_shards(tmp_path / "small", "small", 10, maxcount=20)  # N = 10
    resolved = resolve_sources(
        {"big": {"urls": big, "frequency": 1.0}, "small": {"urls": small, "frequency": 2.0}}, "t"
    )
    # D_mix = 1 x D_big + 2 x D_small: 30 + 20 = 50 samples, 30/50 from big, 20/50 from small
    assert {name: c["samples"] for name, c in resolved.items()} == {"big": 30, "small": 10}
    assert {name: c["mix_samples"] for name, c in resolved.items()} == {"big": 30.0, "small": 20.0}
    assert resolved["big"]["weight"] == pytest.approx(30 / 50) and resolved["small"]["weight"] == pytest.approx(20 / 50)
    assert len(resolved["big"]["urls"]) == 2

    weights = resolve_sources({"big": {"urls": big, "weight": 1.0}, "small": {"urls": small, "weight": 2.0}}, "t")
    assert {name: c["weight"] for name, c in weights.items()} == {"big": 1.0, "small": 2.0}  # weights stay as given


def test_frequency_errors_name_the_problem(tmp_path):
    spec = text_shards(tmp_path / "a", "a", 4, maxcount=4)
    with pytest.raises(ValueError, match="'a' gives both 'weight' and 'frequency'"):
        resolve_sources({"a": {"urls": spec, "weight": 1.0, "frequency": 1.0}}, "training")
    with pytest.raises(ValueError, match=r"sources \['a'\] give a frequency and \['b'\] do not"):
        resolve_sources({"a": {"urls": spec, "frequency": 1.0}, "b": {"urls": spec, "weight": 1.0}}, "training")
    with pytest.raises(ValueError, match="negative frequency"):
        resolve_sources({"a": {"urls": spec, "frequency": -1.0}}, "training")
    os.remove(tmp_path / "a" / SIZES_FILE)
    with pytest.raises(ValueError, match="'a': a frequency needs the source's sample count"):
        resolve_sources({"a": {"urls": spec, "frequency": 1.0}}, "training")
