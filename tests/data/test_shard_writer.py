"""Shard writing: numbered tar shards of at most ``maxcount`` samples, ``sizes.json`` and the brace spec."""

from __future__ import annotations

import json
import os
import tarfile

from mole_lightning.data.shard_writer import ShardWriter
from mole_lightning.data.sources import count_samples, expand_urls


def test_shard_writer_splits_by_maxcount_and_records_sizes(tmp_path):
    with ShardWriter(str(tmp_path), "src", maxcount=2) as writer:
        for index in range(5):
            writer.write({"__key__": f"{index:03d}", "json": {"i": index}, "txt": "hello"})
    assert sorted(os.listdir(tmp_path)) == ["sizes.json", "src-000000.tar", "src-000001.tar", "src-000002.tar"]
    assert json.loads((tmp_path / "sizes.json").read_text()) == {
        "src-000000.tar": 2,
        "src-000001.tar": 2,
        "src-000002.tar": 1,
    }
    with tarfile.open(tmp_path / "src-000001.tar") as tar:
        assert tar.getnames() == ["002.json", "002.txt", "003.json", "003.txt"]
        assert json.load(tar.extractfile("003.json")) == {"i": 3}
    assert writer.brace_spec == f"{tmp_path}/src-{{000000..000002}}.tar"
    assert count_samples(expand_urls(writer.brace_spec)) == 5
