"""Streaming pipelines: mixing proportions, equal batch counts per rank, HTTP shards, bad samples and shards."""

from __future__ import annotations

import functools
import http.server
import json
import os
import random
import threading
from collections import Counter

import pytest
import torch

from mole_lightning.data.collate import Collator
from mole_lightning.data.pipeline import (
    CountingLoader,
    MixedTrainingStream,
    ModalityLengthGrouper,
    SkipTally,
    SourceEvalStream,
    batches_per_worker,
    split_for_reader,
)
from mole_lightning.data.samples import SampleEncoder
from mole_lightning.data.sources import expand_urls
from tests.conftest import DEMO_TRAIN, DEMO_VAL
from tests.data.conftest import IMAGE_SIZE, NUM_IMAGE_TOKENS, image_bytes, record, write_source


def encoder(demo, **overrides) -> SampleEncoder:
    options = dict(tokenizer=demo.tokenizer, num_image_tokens=NUM_IMAGE_TOKENS, image_size=IMAGE_SIZE)
    options.update(overrides)
    return SampleEncoder(**options)


def training_stream(
    demo, sources, batches, batch_size=8, rank=0, world_size=1, num_workers=0, shuffle_buffer=50, **grouping
):
    expanded = {name: {"urls": expand_urls(c["urls"]), "weight": c["weight"]} for name, c in sources.items()}
    return MixedTrainingStream(
        expanded,
        encoder(demo),
        Collator(pad_token_id=3),
        batch_size=batch_size,
        batches_per_worker=batches,
        num_workers=num_workers,
        shuffle_buffer=shuffle_buffer,
        seed=0,
        rank=rank,
        world_size=world_size,
        **grouping,
    )


def eval_loader(demo, source, urls, tally, num_workers=0, batch_size=8, **overrides):
    stream = SourceEvalStream(source, expand_urls(urls), encoder(demo, **overrides), Collator(3), batch_size)
    return CountingLoader(stream, tally, num_workers=num_workers)


def test_mixing_proportions_follow_the_weights(demo):
    weights = {"general": 1.0, "doc": 2.0, "med": 1.0}
    stream = training_stream(demo, demo.sources("train", weights), batches=100, batch_size=32, num_workers=2)
    counts = Counter()
    for batch in CountingLoader(stream, SkipTally(), num_workers=2):
        counts.update(batch["source"])
    total = sum(counts.values())
    assert total == 2 * 100 * 32
    for name, expected in {"general": 0.25, "doc": 0.5, "med": 0.25}.items():
        assert abs(counts[name] / total - expected) < 0.03, counts


@pytest.mark.parametrize("grouped", [False, True], ids=["consecutive", "grouped"])
def test_every_rank_yields_the_same_number_of_batches_with_two_workers(demo, grouped):
    per_worker = batches_per_worker(samples_per_epoch=100, batch_size=4, world_size=2, num_workers=2)
    assert per_worker == 7  # ceil(ceil(100 / (4 * 2)) / 2)
    seen_ids = []
    for rank in (0, 1):
        stream = training_stream(
            demo,
            demo.sources("train"),
            per_worker,
            batch_size=4,
            rank=rank,
            world_size=2,
            num_workers=2,
            group_by_modality_length=grouped,
            group_batches=2,
        )
        loader = CountingLoader(stream, SkipTally(), num_workers=2)
        batches = list(loader)
        assert len(batches) == len(loader) == 14
        assert all(len(b["id"]) == 4 for b in batches)
        seen_ids.append([i for b in batches for i in b["id"]])
    assert seen_ids[0] != seen_ids[1]  # ranks draw different samples


def test_training_stream_is_reproducible_for_a_seed(demo):
    def ids():
        return [i for b in training_stream(demo, demo.sources("train"), batches=3) for i in b["id"]]

    assert ids() == ids()


def toy_example(index: int, length: int, image: bool) -> dict:
    """An encoded example of ``length`` tokens, with a 1-pixel image or text-only."""
    pixels = torch.zeros(3, 1, 1, dtype=torch.uint8) if image else None
    return {"input_ids": torch.zeros(length, dtype=torch.long), "pixel_values": pixels, "id": index}


def expected_groups(examples: list[dict], batch_size: int, group_batches: int) -> list[tuple]:
    """Reference grouping by rounds: whenever ``batch_size · group_batches`` examples are pending, each modality's
    oldest whole batches' worth of examples, sorted by (length, arrival), are cut into batches and the rest stays
    pending; the stream's end cuts everything (last batches smaller)."""

    def cut(pending: list[dict], whole: bool) -> tuple[list[tuple], list[dict]]:
        groups, kept = [], []
        for image in (True, False):
            same = [e for e in pending if (e["pixel_values"] is not None) == image]
            count = len(same) - len(same) % batch_size if whole else len(same)
            ordered = sorted(same[:count], key=lambda e: (len(e["input_ids"]), e["id"]))
            groups += [tuple(e["id"] for e in ordered[i : i + batch_size]) for i in range(0, count, batch_size)]
            kept += same[count:]
        return groups, kept

    groups, pending = [], []
    for example in examples:
        pending.append(example)
        if len(pending) == batch_size * group_batches:
            done, pending = cut(pending, whole=True)
            groups += done
    return groups + cut(pending, whole=False)[0]


def test_grouper_emits_sorted_single_modality_batches_of_each_buffer():
    rng = random.Random(0)
    examples = [toy_example(i, rng.randint(1, 500), rng.random() < 0.7) for i in range(203)]
    grouper = ModalityLengthGrouper(group_batches=3, rng=random.Random(1))
    groups = list(grouper(iter(examples), 4))
    assert sorted(tuple(e["id"] for e in g) for g in groups) == sorted(expected_groups(examples, 4, 3))
    assert all(len({e["pixel_values"] is None for e in g}) == 1 for g in groups)
    images = [any(e["pixel_values"] is not None for e in g) for g in groups]
    assert images != sorted(images) and images != sorted(images, reverse=True)  # modalities interleave


def test_grouper_holds_a_bounded_number_of_examples():
    batch_size, group_batches = 4, 3
    consumed = 0

    def stream():
        nonlocal consumed
        rng = random.Random(0)
        for index in range(2000):
            consumed += 1
            yield toy_example(index, rng.randint(1, 500), rng.random() < 0.9)

    emitted, most_held = 0, 0
    for group in ModalityLengthGrouper(group_batches, random.Random(1))(stream(), batch_size):
        most_held = max(most_held, consumed - emitted)
        emitted += len(group)
    assert emitted == consumed == 2000
    assert most_held <= batch_size * group_batches


def test_grouper_rejects_an_empty_buffer():
    with pytest.raises(ValueError, match="group_batches must be at least 1"):
        ModalityLengthGrouper(group_batches=0, rng=random.Random(0))


def padding_fraction(batches: list[dict]) -> float:
    """Pad tokens / all tokens of the batches."""
    masks = [b["attention_mask"] for b in batches]
    return 1 - sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)


def varied_sources(directory: str) -> dict:
    """Three sources of 60 samples with 1-60 word questions: images only, text only, and half of each."""
    rng = random.Random(0)
    kinds = {"image": lambda i: True, "text": lambda i: False, "both": lambda i: i % 2 == 0}
    sources = {}
    for name, image in kinds.items():
        samples = [record(i, " ".join(["what"] * rng.randint(1, 60)), "a cat", image=image(i)) for i in range(60)]
        sources[name] = {"urls": write_source(directory, name, samples, maxcount=20)}
    return sources


def test_grouped_stream_keeps_the_weights_and_pads_less(demo, tmp_path):
    weights = {"image": 6.0, "text": 1.0, "both": 1.0}  # text-only samples: 1/8 + 1/16 of the stream, a minority
    sources = {name: dict(config, weight=weights[name]) for name, config in varied_sources(str(tmp_path)).items()}
    runs = {}
    for grouped in (False, True):
        stream = training_stream(
            demo, sources, batches=150, batch_size=8, group_by_modality_length=grouped, group_batches=8
        )
        runs[grouped] = list(CountingLoader(stream, SkipTally()))
    batches = runs[True]
    assert len(batches) == 150 and all(len(b["id"]) == 8 for b in batches)
    assert all(b["has_image"].all() or not b["has_image"].any() for b in batches)
    counts = Counter(s for b in batches for s in b["source"])
    total = sum(counts.values())
    shares = {name: counts[name] / total for name in weights}
    shares["text-only"] = 1 - sum(int(b["has_image"].sum()) for b in batches) / total
    for name, expected in {"image": 0.75, "text": 0.125, "both": 0.125, "text-only": 0.1875}.items():
        standard_error = (expected * (1 - expected) / total) ** 0.5  # binomial, 1200 samples
        assert abs(shares[name] - expected) < 3 * standard_error, (name, shares)
    assert padding_fraction(batches) < padding_fraction(runs[False]) / 2


def test_split_for_reader_covers_every_item_once():
    assert split_for_reader(["a", "b", "c", "d", "e"], 1, 2) == (["b", "d"], 1, 0)
    assert split_for_reader(["a", "b"], 3, 4) == (["a", "b"], 4, 3)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_validation_reads_each_sample_exactly_once(demo, num_workers):
    ids = Counter()
    for batch in eval_loader(demo, "doc", demo.val["doc"], SkipTally(), num_workers=num_workers):
        ids.update(batch["id"])
    assert ids == Counter({f"doc-val-{i}": 1 for i in range(DEMO_VAL)})


def test_validation_is_split_over_ranks_without_overlap(demo):
    seen = []
    for rank in (0, 1):
        stream = SourceEvalStream("med", expand_urls(demo.train["med"]), encoder(demo), Collator(3), 16, rank, 2)
        seen.append({i for b in CountingLoader(stream, SkipTally(), num_workers=2) for i in b["id"]})
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == {f"med-train-{i}" for i in range(DEMO_TRAIN)}


@pytest.fixture()
def http_server(demo):
    """Serves the demo's training shard folder on 127.0.0.1."""

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    directory = os.path.dirname(expand_urls(demo.train["general"])[0])
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=directory))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_streams_shards_over_http_and_skips_a_dead_url(demo, http_server):
    urls = [f"{http_server}/general-{{000000..000002}}.tar", f"{http_server}/missing-000000.tar"]
    tally = SkipTally()
    with pytest.warns(RuntimeWarning, match="missing-000000.tar"):
        ids = {i for b in eval_loader(demo, "general", urls, tally) for i in b["id"]}
    assert ids == {f"general-train-{i}" for i in range(DEMO_TRAIN)}
    assert tally.as_dict() == {"unreadable_shard/general": 1}

    stream = training_stream(demo, {"general": {"urls": urls[0], "weight": 1.0}}, batches=4)
    assert sum(len(b["id"]) for b in CountingLoader(stream, SkipTally())) == 32


def test_all_training_sources_dead_is_a_clear_error(demo, http_server):
    sources = {"a": {"urls": f"{http_server}/nothing-000000.tar", "weight": 1.0}}
    stream = training_stream(demo, sources, batches=2)
    with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError, match="no training source could be read"):
        list(CountingLoader(stream, SkipTally()))


def test_dead_source_is_dropped_and_the_others_continue(demo, http_server):
    sources = {
        "dead": {"urls": f"{http_server}/nothing-000000.tar", "weight": 5.0},
        "general": {"urls": demo.train["general"], "weight": 1.0},
    }
    with pytest.warns(RuntimeWarning, match="dead"):
        batches = list(CountingLoader(training_stream(demo, sources, batches=3), SkipTally()))
    assert len(batches) == 3 and {s for b in batches for s in b["source"]} == {"general"}


def test_truncated_shard_is_skipped_with_a_warning(demo, tmp_path):
    samples = [record(i, "What is it?", f"answer {i}") for i in range(30)]
    spec = write_source(str(tmp_path), "cut", samples)
    path = expand_urls(spec)[0]
    with open(path, "r+b") as handle:
        handle.truncate(os.path.getsize(path) // 2)
    tally = SkipTally()
    with pytest.warns(RuntimeWarning, match="skipping the rest of shard"):
        ids = [i for b in eval_loader(demo, "cut", spec, tally) for i in b["id"]]
    assert 0 < len(ids) < 30 and ids == [f"r{i}" for i in range(len(ids))]
    assert tally.as_dict() == {"unreadable_shard/cut": 1}  # no half-read sample reached the encoder


def bad_samples() -> list[dict]:
    """One good sample, then one sample per bad kind, then another good one."""
    good = record(0, "What is it?", "a cat")
    bad_json = {"__key__": "000000001", "json": b"{not json", "png": image_bytes()}
    missing_image = record(2, "What is it?", "x")
    del missing_image["png"]
    corrupt_image = record(3, "What is it?", "x")
    corrupt_image["png"] = b"\x89PNG broken"
    no_assistant = {"__key__": "000000004", "json": json.dumps({"conversations": [{"from": "human", "value": "q"}]})}
    wrong_roles = {
        "__key__": "000000005",
        "json": json.dumps({"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]}),
    }
    empty_text = record(6, "What is it?", "")
    long_first_turn = {
        "__key__": "000000007",
        "json": json.dumps(
            {
                "conversations": [
                    {"from": "human", "value": "tell me " * 40},
                    {"from": "gpt", "value": "ok"},
                    {"from": "human", "value": "<image>\nAnd this?"},
                    {"from": "gpt", "value": "a dog"},
                ]
            }
        ),
        "png": image_bytes(),
    }
    return [
        good,
        bad_json,
        missing_image,
        corrupt_image,
        no_assistant,
        wrong_roles,
        empty_text,
        long_first_turn,
        record(8, "What is it?", "a bird"),
    ]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_each_bad_sample_kind_is_skipped_and_counted_per_source(demo, tmp_path, num_workers):
    spec = write_source(str(tmp_path), "bad", bad_samples(), maxcount=5)  # two shards: both workers read one
    tally = SkipTally()
    batches = list(eval_loader(demo, "bad", spec, tally, num_workers=num_workers, batch_size=1, max_length=80))
    assert sorted(i for b in batches for i in b["id"]) == ["r0", "r8"]
    assert tally.as_dict() == {
        "bad_json/bad": 1,
        "missing_image/bad": 1,
        "corrupt_image/bad": 1,
        "no_assistant_turn/bad": 1,
        "wrong_roles/bad": 1,
        "empty_text/bad": 1,
        "image_tokens_truncated/bad": 1,
    }


def test_skip_counts_travel_with_training_batches_from_workers(demo, tmp_path):
    spec = write_source(str(tmp_path), "bad", bad_samples(), maxcount=5)
    stream = training_stream(demo, {"bad": {"urls": spec, "weight": 1.0}}, batches=3, batch_size=2, num_workers=2)
    stream.encoder = encoder(demo, max_length=80)
    tally = SkipTally()
    batches = list(CountingLoader(stream, tally, num_workers=2))
    assert len(batches) == 6 and all("skipped" not in b for b in batches)
    counts = tally.as_dict()
    # Bad and good samples are drawn 7:2, so at least 12 good samples imply several skips of each worker's kinds.
    assert sum(counts.values()) >= 12 and set(counts) <= {
        "bad_json/bad",
        "missing_image/bad",
        "corrupt_image/bad",
        "no_assistant_turn/bad",
        "wrong_roles/bad",
        "empty_text/bad",
        "image_tokens_truncated/bad",
    }
