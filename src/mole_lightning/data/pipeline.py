"""Webdataset streaming pipelines: weighted mixing of resampled sources for training, finite per-source validation.

Training (:class:`MixedTrainingStream`), run inside each DataLoader worker::

    per source: resampled shards (seeded by seed, rank, worker, epoch) → tar samples (webdataset)
    → weighted random choice of a source per sample (weights, or from the frequencies λ_m: data.sources)
    → shuffle buffer → decode + template + tokenize + image processing
    → batches (consecutive, or grouped by modality and length) → ``with_epoch``-style limit

Every worker yields exactly ``batches_per_worker`` batches, so every rank yields the same number of batches (no DDP
hang at epoch end). The mixing is ``wds.RandomMix``'s over resampled per-source streams, with a seeded generator and
one difference: a source whose shards are all unreadable is dropped with a warning (RandomMix would end the epoch);
when every source is dead a ``RuntimeError`` names them. Node and worker splitting are explicit: resampling is
seeded per (rank, worker), which makes every rank/worker draw its own shard sequence; finite validation streams are
split by ``(rank, worker)`` over shards, or over samples when there are fewer shards than readers.

Bad samples are skipped and counted per ``kind/source`` inside the worker; each batch carries the counts since the
previous batch under ``"skipped"``. :class:`CountingLoader` pops them in the main process and accumulates them in a
:class:`SkipTally` (this works with any ``num_workers`` because counts travel with the batches).
"""

from __future__ import annotations

import math
import random
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from mole_lightning.data.collate import Collator
from mole_lightning.data.templates import BadSampleError

SKIPPED_KEY = "skipped"
"""Batch key holding ``{"kind/source": count}`` of samples skipped since the previous batch of the same worker."""


class SkipCounter:
    """Per-process counter of skipped samples and unreadable shards, keyed ``"kind/source"``."""

    def __init__(self) -> None:
        self._pending: Counter[str] = Counter()

    def add(self, kind: str, source: str, count: int = 1) -> None:
        """Counts ``count`` skipped items of ``kind`` from ``source``."""
        self._pending[f"{kind}/{source}"] += count

    def pop_delta(self) -> dict[str, int]:
        """Returns the counts since the last call and resets them."""
        delta, self._pending = dict(self._pending), Counter()
        return delta


class SkipTally:
    """Main-process accumulator of the ``"skipped"`` deltas carried by batches."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def update(self, delta: dict[str, int] | None) -> None:
        """Adds a batch's delta."""
        if delta:
            self.counts.update(delta)

    def as_dict(self) -> dict[str, int]:
        """The accumulated counts, ``{"kind/source": count}``."""
        return dict(sorted(self.counts.items()))


def worker_position() -> tuple[int, int]:
    """``(worker_id, num_workers)`` of the current DataLoader worker; ``(0, 1)`` in the main process."""
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class _TailRecorder:
    """Stream wrapper remembering the last 512 bytes read (to check for the tar end-of-archive zero block)."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.head = b""
        self.tail = b""

    def read(self, *args: Any) -> bytes:
        data = self.stream.read(*args)
        if data:
            if len(self.head) < 8:
                self.head = (self.head + data)[:8]
            self.tail = (self.tail + data)[-512:]
        return data

    def ended_cleanly(self) -> bool:
        """Whether the data ends with a zero block (tar files end with zero blocks); compressed tars pass."""
        if self.head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd")):
            return True
        return len(self.tail) == 512 and not self.tail.strip(b"\0")

    def close(self) -> None:
        try:
            self.stream.close()
        except Exception:  # a failed curl pipe raises on close; the failure is reported already
            pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def read_shard(url: str, source: str, counter: SkipCounter) -> Iterator[dict[str, Any]]:
    """Yields the raw samples of one shard; an unreadable or truncated shard is warned about, counted and left.

    Samples completed before a problem are kept; the one being read when it happened is dropped, and so is the
    last sample of a shard that ends without the tar end-of-archive block (a shard truncated at a file boundary).
    """
    errors: list[BaseException] = []

    def remember(error: BaseException) -> bool:
        errors.append(error)
        return False  # stop reading this shard

    try:
        stream = _TailRecorder(wds.gopen(url))
    except Exception as error:
        stream = None
        errors.append(error)
    if stream is not None:
        files = tar_file_expander(iter([{"url": url, "stream": stream}]), handler=remember)
        pending = None
        for sample in group_by_keys(files, handler=remember):
            if errors:
                break  # emitted after the error: possibly incomplete
            if pending is not None:
                yield pending
            pending = sample
        if not errors and pending is not None and not stream.ended_cleanly():
            errors.append(EOFError("no tar end-of-archive block: truncated shard?"))
        stream.close()
        if not errors and pending is not None:
            yield pending
    if errors:
        counter.add("unreadable_shard", source)
        warnings.warn(f"skipping the rest of shard {url} ({source}): {errors[0]!r}", RuntimeWarning, stacklevel=2)


def resampled_samples(source: str, urls: Sequence[str], rng: random.Random, counter: SkipCounter) -> Iterator[Any]:
    """Endless raw samples of one source from shards drawn with replacement.

    Returns (ends) only when the source is dead: every distinct URL was tried since the last sample and none
    yielded a sample.
    """
    failed_since_success: set[str] = set()
    distinct = set(urls)
    while True:
        url = rng.choice(urls)
        produced = False
        for sample in read_shard(url, source, counter):
            produced = True
            yield sample
        if produced:
            failed_since_success.clear()
        else:
            failed_since_success.add(url)
            if failed_since_success >= distinct:
                warnings.warn(f"source {source!r}: no shard could be read, dropping it", RuntimeWarning, stacklevel=2)
                return


def mix_sources(
    streams: dict[str, Iterator[Any]], weights: dict[str, float], rng: random.Random
) -> Iterator[tuple[str, Any]]:
    """Yields ``(source, sample)``, choosing the source of each sample with probability ∝ its weight.

    A stream that ends is dropped and the remaining weights renormalized.

    Raises:
        RuntimeError: When every stream has ended (all sources dead).
    """
    names = list(streams)
    active = [name for name in names if weights[name] > 0]
    while active:
        name = rng.choices(active, weights=[weights[n] for n in active])[0]
        try:
            yield name, next(streams[name])
        except StopIteration:
            active.remove(name)
    raise RuntimeError(
        f"no training source could be read (all shards of {names} failed); check the urls, paths and network"
    )


def encode_samples(
    raw_samples: Iterator[tuple[str, Any]], encoder: Callable[[dict, str], dict], counter: SkipCounter
) -> Iterator[dict[str, Any]]:
    """Encodes ``(source, raw)`` pairs, skipping and counting :class:`BadSampleError` per kind and source."""
    for source, raw in raw_samples:
        try:
            yield encoder(raw, source)
        except BadSampleError as error:
            counter.add(error.kind, source)


def consecutive_groups(examples: Iterator[dict[str, Any]], batch_size: int) -> Iterator[list[dict[str, Any]]]:
    """Consecutive groups of ``batch_size`` examples, in stream order; the last group may be smaller."""
    group: list[dict[str, Any]] = []
    for example in examples:
        group.append(example)
        if len(group) == batch_size:
            yield group
            group = []
    if group:
        yield group


def example_length(example: dict[str, Any]) -> int:
    """Tokens of an encoded example (image placeholders included)."""
    return len(example["input_ids"])


def has_image(example: dict[str, Any]) -> bool:
    """Whether an encoded example carries an image."""
    return example.get("pixel_values") is not None


class ModalityLengthGrouper:
    """Groups examples into batches of one modality (image or text-only) and similar length (LLaVA's
    ``group_by_modality_length``, over a stream instead of an index list).

    Examples collect in a buffer of ``batch_size · group_batches`` (both modalities together). When it is full, each
    modality's examples are sorted by length (stable, so equal lengths keep their shuffled order) and cut into full
    batches, which leave in random order, so the modalities and the length ranges interleave; the newest
    ``count mod batch_size`` examples of each modality stay for the next round, so a rare modality waits only until
    it fills one batch. Because the buffer fills in the proportions of the stream, the examples held when a worker's
    epoch is cut off are a sample of the mixture (plus fewer than ``batch_size`` of each modality), and the source
    and modality proportions of the emitted batches are those of the stream. At most ``batch_size · group_batches``
    examples are held. A finite stream ends by emitting everything (the last batch of each modality may be smaller).

    Padding: a batch pads every row to its longest one, pad tokens = Σ_rows (max length − length); sorting a buffer
    makes each batch a run of neighbouring lengths, so the padding shrinks as the buffer grows.

    Args:
        group_batches: Batches per buffer (N); larger buffers pad less and hold more examples.
        rng: Random generator for the batch order (seeded per worker and epoch, so grouping is reproducible).
    """

    def __init__(self, group_batches: int, rng: random.Random) -> None:
        if group_batches < 1:
            raise ValueError(f"group_batches must be at least 1, got {group_batches}")
        self.group_batches = group_batches
        self.rng = rng

    @staticmethod
    def sorted_batches(
        examples: list[dict[str, Any]], batch_size: int, keep_remainder: bool = True
    ) -> tuple[list[list[dict[str, Any]]], list[dict[str, Any]]]:
        """Per modality, the examples sorted by length and cut into batches of ``batch_size``.

        Returns:
            ``(batches, kept)``: with ``keep_remainder`` the newest ``count mod batch_size`` examples of each
            modality are kept (in arrival order) instead of forming a smaller batch.
        """
        batches: list[list[dict[str, Any]]] = []
        kept: list[dict[str, Any]] = []
        for image in (True, False):
            same = [example for example in examples if has_image(example) == image]
            count = len(same) - len(same) % batch_size if keep_remainder else len(same)
            batches.extend(consecutive_groups(iter(sorted(same[:count], key=example_length)), batch_size))
            kept.extend(same[count:])
        return batches, kept

    def __call__(self, examples: Iterator[dict[str, Any]], batch_size: int) -> Iterator[list[dict[str, Any]]]:
        """Yields the batches (lists of examples) of ``examples``."""
        capacity = batch_size * self.group_batches
        buffer: list[dict[str, Any]] = []
        for example in examples:
            buffer.append(example)
            if len(buffer) < capacity:
                continue
            batches, buffer = self.sorted_batches(buffer, batch_size)
            self.rng.shuffle(batches)
            yield from batches
        batches, _ = self.sorted_batches(buffer, batch_size, keep_remainder=False)
        self.rng.shuffle(batches)
        yield from batches


def batch_examples(
    examples: Iterator[dict[str, Any]],
    batch_size: int,
    collate_fn: Callable[[list[dict[str, Any]]], dict[str, Any]],
    counter: SkipCounter,
    max_batches: int | None = None,
    partial: bool = True,
    grouper: Callable[[Iterator[dict[str, Any]], int], Iterator[list[dict[str, Any]]]] = consecutive_groups,
) -> Iterator[dict[str, Any]]:
    """Groups examples into collated batches with the skip-count delta under ``"skipped"``.

    Args:
        examples: Encoded examples.
        batch_size: Examples per batch.
        collate_fn: Collation function.
        counter: The worker's skip counter.
        max_batches: Stop after this many batches (the per-worker epoch length).
        partial: Yield smaller batches at the end of a finite stream (else drop them); then, if samples were
            skipped after the last batch, yield a count-only ``{"skipped": ...}`` item (dropped by
            :class:`CountingLoader`).
        grouper: ``(examples, batch_size) → lists of examples``: :func:`consecutive_groups` (stream order) or a
            :class:`ModalityLengthGrouper`.
    """
    produced = 0
    if max_batches is not None and max_batches <= 0:
        return
    for group in grouper(examples, batch_size):
        if len(group) < batch_size and not partial:
            continue
        batch = collate_fn(group)
        batch[SKIPPED_KEY] = counter.pop_delta()
        yield batch
        produced += 1
        if max_batches is not None and produced >= max_batches:
            return
    delta = counter.pop_delta()
    if delta:
        yield {SKIPPED_KEY: delta}


def stream_seed(*parts: object) -> str:
    """A deterministic seed string from its parts (``random.Random`` hashes strings with SHA-512)."""
    return "-".join(str(p) for p in parts)


class MixedTrainingStream(IterableDataset):
    """Endless weighted mixture of resampled sources, cut to ``batches_per_worker`` collated batches per worker.

    Args:
        sources: ``{name: {"urls": [...], "weight": float}}`` with URLs already expanded.
        encoder: Turns raw samples into examples (runs in the workers).
        collate_fn: Collation function (training: right padding).
        batch_size: Samples per batch.
        batches_per_worker: Batches each worker yields per epoch.
        num_workers: DataLoader workers (for ``__len__``; 0 counts as 1).
        shuffle_buffer: Raw samples held in the shuffle buffer after mixing (0 disables shuffling).
        seed: Base seed.
        rank: Global rank of this process.
        world_size: Number of ranks.
        group_by_modality_length: Batch within one modality and similar lengths (:class:`ModalityLengthGrouper`)
            instead of consecutive examples.
        group_batches: Batches per grouping buffer.
    """

    def __init__(
        self,
        sources: dict[str, dict[str, Any]],
        encoder: Callable[[dict, str], dict],
        collate_fn: Callable[[list[dict[str, Any]]], dict[str, Any]],
        batch_size: int,
        batches_per_worker: int,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        group_by_modality_length: bool = False,
        group_batches: int = 32,
    ) -> None:
        super().__init__()
        self.sources = {name: {"urls": list(c["urls"]), "weight": float(c["weight"])} for name, c in sources.items()}
        self.encoder = encoder
        self.collate_fn = collate_fn
        self.batch_size = batch_size
        self.batches_per_worker = batches_per_worker
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.group_by_modality_length = group_by_modality_length
        self.group_batches = group_batches
        if group_by_modality_length and group_batches < 1:
            raise ValueError(f"group_batches must be at least 1, got {group_batches}")
        self.epoch = 0  # bumped by CountingLoader in the main process before workers start
        self._iterations = 0  # bumped in the worker's copy (persistent workers)

    def __len__(self) -> int:
        return self.batches_per_worker * max(1, self.num_workers)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, _ = worker_position()
        self._iterations += 1
        base = stream_seed(self.seed, self.rank, worker, self.epoch, self._iterations)
        counter = SkipCounter()
        streams = {
            name: resampled_samples(name, config["urls"], random.Random(stream_seed(base, name)), counter)
            for name, config in self.sources.items()
        }
        weights = {name: config["weight"] for name, config in self.sources.items()}
        mixed = mix_sources(streams, weights, random.Random(stream_seed(base, "mix")))
        if self.shuffle_buffer > 1:
            mixed = wds.filters._shuffle(
                mixed, bufsize=self.shuffle_buffer, initial=self.shuffle_buffer, rng=random.Random(base)
            )
        examples = encode_samples(mixed, self.encoder, counter)
        grouper = consecutive_groups
        if self.group_by_modality_length:
            grouper = ModalityLengthGrouper(self.group_batches, random.Random(stream_seed(base, "group")))
        yield from batch_examples(
            examples,
            self.batch_size,
            self.collate_fn,
            counter,
            max_batches=self.batches_per_worker,
            partial=False,
            grouper=grouper,
        )


def split_for_reader(urls: Sequence[str], reader: int, num_readers: int) -> tuple[list[str], int, int]:
    """Assigns shards (or samples) to one of ``num_readers`` readers (rank × workers).

    Returns:
        ``(urls_to_read, sample_stride, sample_offset)``: with at least as many shards as readers each reader gets
        every ``num_readers``-th shard and keeps all its samples (stride 1); otherwise every reader reads all
        shards and keeps every ``num_readers``-th sample.
    """
    if len(urls) >= num_readers:
        return list(urls[reader::num_readers]), 1, 0
    return list(urls), num_readers, reader


class SourceEvalStream(IterableDataset):
    """One source, read once in order (no resampling, no shuffling), split over ranks and workers.

    Args:
        source: Source name.
        urls: Expanded shard URLs.
        encoder: Turns raw samples into examples.
        collate_fn: Collation function.
        batch_size: Samples per batch (the last batch may be smaller).
        rank: Global rank of this process.
        world_size: Number of ranks.
    """

    def __init__(
        self,
        source: str,
        urls: Sequence[str],
        encoder: Callable[[dict, str], dict],
        collate_fn: Callable[[list[dict[str, Any]]], dict[str, Any]],
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__()
        self.source = source
        self.urls = list(urls)
        self.encoder = encoder
        self.collate_fn = collate_fn
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size

    def raw_samples(self, counter: SkipCounter) -> Iterator[tuple[str, Any]]:
        """This reader's share of the raw samples, as ``(source, sample)``."""
        worker, num_workers = worker_position()
        reader = self.rank * num_workers + worker
        urls, stride, offset = split_for_reader(self.urls, reader, self.world_size * num_workers)
        index = 0
        for url in urls:
            for sample in read_shard(url, self.source, counter):
                if index % stride == offset:
                    yield self.source, sample
                index += 1

    def __iter__(self) -> Iterator[dict[str, Any]]:
        counter = SkipCounter()
        examples = encode_samples(self.raw_samples(counter), self.encoder, counter)
        yield from batch_examples(examples, self.batch_size, self.collate_fn, counter, partial=True)


class CountingLoader(DataLoader):
    """``DataLoader`` (``batch_size=None``: the dataset yields batches) that collects skip counts in the main process.

    Each batch's ``"skipped"`` delta is popped and added to ``tally``; count-only items are not yielded. Before each
    epoch the dataset's ``epoch`` attribute (if any) is bumped so that non-persistent workers reseed.

    Args:
        dataset: A stream yielding collated batches.
        tally: Where skip counts accumulate.
        num_workers: Worker processes.
        **kwargs: Further ``DataLoader`` arguments (``pin_memory``, ``persistent_workers``, ``prefetch_factor``...).
    """

    def __init__(self, dataset: IterableDataset, tally: SkipTally, num_workers: int = 0, **kwargs: Any) -> None:
        kwargs.pop("batch_size", None)
        kwargs.pop("shuffle", None)
        if num_workers == 0:
            kwargs.pop("persistent_workers", None)
            kwargs.pop("prefetch_factor", None)
        super().__init__(dataset, batch_size=None, shuffle=False, num_workers=num_workers, **kwargs)
        self.tally = tally

    def __iter__(self) -> Iterator[Any]:
        if hasattr(self.dataset, "epoch"):
            self.dataset.epoch += 1
        for batch in super().__iter__():
            if isinstance(batch, dict) and SKIPPED_KEY in batch:
                self.tally.update(batch.pop(SKIPPED_KEY))
                if "input_ids" not in batch:
                    continue
            yield batch


def batches_per_worker(samples_per_epoch: int, batch_size: int, world_size: int, num_workers: int) -> int:
    """Batches each worker yields so that an epoch covers at least ``samples_per_epoch`` samples over all ranks."""
    batches = math.ceil(samples_per_epoch / (batch_size * world_size))
    return max(1, math.ceil(batches / max(1, num_workers)))


def make_collator(pad_token_id: int, generation: bool = False) -> Collator:
    """Collator with right padding for training or left padding for generation."""
    return Collator(pad_token_id, "left" if generation else "right")


__all__ = [
    "SKIPPED_KEY",
    "CountingLoader",
    "MixedTrainingStream",
    "ModalityLengthGrouper",
    "SkipCounter",
    "SkipTally",
    "SourceEvalStream",
    "batches_per_worker",
    "consecutive_groups",
    "mix_sources",
    "read_shard",
    "resampled_samples",
    "split_for_reader",
]
