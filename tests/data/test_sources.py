"""Shard specs: brace patterns, ``::`` lists, folders and URLs expanded; sample counts only for local shards."""

from __future__ import annotations

from mole_lightning.data.sources import count_samples, expand_urls


def test_expand_urls_handles_braces_lists_directories_and_double_colons(tmp_path):
    for name in ("a-000000.tar", "a-000001.tar"):
        (tmp_path / name).write_bytes(b"")
    assert expand_urls("x-{000000..000002}.tar") == ["x-000000.tar", "x-000001.tar", "x-000002.tar"]
    assert expand_urls(["http://h/a.tar", "pipe:cat b.tar"]) == ["http://h/a.tar", "pipe:cat b.tar"]
    assert expand_urls("p.tar::q.tar") == ["p.tar", "q.tar"]
    assert expand_urls(str(tmp_path)) == [str(tmp_path / "a-000000.tar"), str(tmp_path / "a-000001.tar")]
    assert count_samples(["http://h/a.tar"]) is None
