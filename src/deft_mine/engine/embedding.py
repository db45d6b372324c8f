"""The embedding step: a listing's batches, each through one batch step (prepare → encode →
finish), run in-process here or by Ray (backends/ray_embed.py), into one parquet, with timings;
and its text twin: a text listing's sentences through a text tower, in-process."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from deft_mine.engine import tables
from deft_mine.engine.encoders import Encoder, TextEncoder
from deft_mine.engine.images import LoadFailure, decode_rgb, digest, read_bytes
from deft_mine.engine.listings import TEXT, Listing, filepaths_of
from deft_mine.engine.store import Shelf
from deft_mine.errors import DeftError
from deft_mine.events import Events
from deft_mine.schemas.results import EncoderIdentity

EMBEDDING_COLUMN = "embedding"
# A text embedding parquet's tokenizer settings (JSON), beside the identity they are no part of.
TEXT_SETTINGS_KEY = b"deft_mine.text"
_PREFETCH = 2  # batches decoded ahead of the encoder
_SKIPPED_EXAMPLES = 5
# Readers decode a whole row group at once (several times its size in Arrow memory), so row
# groups are sized by bytes of vectors, not rows: ~10k rows of 768-d float32.
_ROW_GROUP_BYTES = 32 << 20


def rows_per_group(dim: int) -> int:
    """An embedding parquet's rows per row group: about 32 MiB of vectors (the benchmarks write the same)."""
    return max(1024, _ROW_GROUP_BYTES // max(4 * dim, 1))


@dataclass
class BatchOutcome:
    """What one batch step did: rows in and written, vectors reused and made, unreadable images."""

    rows_in: int
    rows_out: int
    reused: int
    embedded: int
    seconds_saved: float
    failures: list[LoadFailure]
    timings: dict[str, float]


@dataclass
class EmbedStats:
    rows_in: int = 0
    rows_out: int = 0
    reused: int = 0  # rows whose vector came from the store
    embedded: int = 0  # rows the encoder ran on
    seconds_saved: float = 0.0  # what the reused rows cost when they were embedded
    corrupt_shards: list[str] = field(default_factory=list)
    skipped_by_reason: Counter = field(default_factory=Counter)
    skipped_examples: list[str] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=lambda: dict.fromkeys(
        ("read", "digest", "decode", "encode", "write", "total"), 0.0))

    def add(self, done: BatchOutcome, events: Events) -> None:
        """A finished batch counted (the one place the counts change), its skips told."""
        for name in ("rows_in", "rows_out", "reused", "embedded", "seconds_saved"):
            setattr(self, name, getattr(self, name) + getattr(done, name))
        for stage, seconds in done.timings.items():
            self.timings[stage] += seconds
        self.skipped_by_reason.update(failure.reason.split(" (")[0] for failure in done.failures)
        room = _SKIPPED_EXAMPLES - len(self.skipped_examples)
        self.skipped_examples += [f"{failure.filepath}: {failure.reason}" for failure in done.failures][:room]
        if done.failures:
            events.log("warning", f"skipped {len(done.failures)} unreadable image(s), e.g. "
                                  f"{done.failures[0].filepath}: {done.failures[0].reason}")


@dataclass
class Prepared:
    """A listing batch ready for the encoder; per row: a LoadFailure, pixels, or None (held by the
    store when prepared, or its vector in `encoded`), its digest, its seconds; `wall`: the batch's."""

    rows: list[LoadFailure | np.ndarray | None]
    digests: list[bytes | None]
    seconds: np.ndarray
    wall: float
    digest_seconds: float = 0.0
    encoded: dict[int, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class Preparer:
    """The prepare stage: each row read, digested, looked up in `held` (the store's sorted digests
    when the step began), else decoded and preprocessed."""

    images_root: Path
    held: np.ndarray
    preprocess: Callable[[list[Any]], np.ndarray]

    def row(self, filepath: str | None) -> tuple[LoadFailure | np.ndarray | None, bytes | None, float, float]:
        t0 = time.perf_counter()
        data = read_bytes(filepath, self.images_root)
        if isinstance(data, LoadFailure):
            return data, None, 0.0, 0.0
        t1 = time.perf_counter()
        found, digest_seconds = digest(data), time.perf_counter() - t1
        key = np.array([found], "S32")  # compared as the store compares them (Shelf.find)
        if (at := int(np.searchsorted(self.held, key)[0])) < len(self.held) and self.held[at] == key[0]:
            return None, found, 0.0, digest_seconds
        image = decode_rgb(data, str(filepath))
        pixels = image if isinstance(image, LoadFailure) else \
            np.ascontiguousarray(self.preprocess([image]), dtype=np.float32)
        return pixels, found, time.perf_counter() - t0, digest_seconds

    def again(self, filepath: str) -> np.ndarray:
        """A row the store held when prepared but has lost since: read and decoded now."""
        pixels = dataclasses.replace(self, held=np.zeros(0, "S32")).row(filepath)[0]
        if isinstance(pixels, LoadFailure):  # it read fine a moment ago
            raise DeftError("image_changed", f"{filepath} changed while it was being embedded ({pixels.reason})",
                            fix="run again once the images are no longer being written", path=str(filepath))
        return pixels

    def __call__(self, filepaths: list[str | None], mapper: Callable[..., Iterable[Any]] = map) -> Prepared:
        """The batch prepared row by row (`mapper`: a thread pool's map runs them side by side)."""
        t0 = time.perf_counter()
        rows, digests, seconds, digest_seconds = zip(*mapper(self.row, filepaths)) if filepaths else ((),) * 4
        return Prepared(list(rows), list(digests), np.array(seconds, np.float64), time.perf_counter() - t0,
                        sum(digest_seconds))


def encode(encoder: Encoder, pixels: list[np.ndarray]) -> np.ndarray:
    """The encode stage: the rows' vectors, (rows, dim) float32."""
    return np.asarray(encoder.encode(np.concatenate(pixels)), np.float32) if pixels else \
        np.zeros((0, encoder.dim), np.float32)


@dataclass
class Step:
    """An embedding step under way: the encoder, the store's shelf, the output, the counts."""

    encoder: Encoder
    shelf: Shelf | None
    preparer: Preparer
    events: Events
    schema: pa.Schema
    writer: "RowGroupWriter"
    stats: EmbedStats

    def finish(self, batch: pa.RecordBatch, prep: Prepared) -> BatchOutcome:
        """The finish stage: the store's vectors where it holds them now, the rest encoded (unless in
        `prep.encoded`); new vectors stored first (a killed run resumes past them), then written."""
        n = batch.num_rows
        hits, stored, saved = self._from_store(batch, prep)
        held = set(hits.tolist())
        todo = [i for i, r in enumerate(prep.rows) if isinstance(r, np.ndarray) and i not in held]
        t0 = time.perf_counter()
        vectors = np.zeros((n, self.encoder.dim), np.float32)
        vectors[todo] = encode(self.encoder, [prep.rows[i] for i in todo])
        encode_seconds = time.perf_counter() - t0
        vectors[hits] = stored if stored is not None else 0.0
        made_there = [i for i in prep.encoded if i not in held]
        for i in made_there:
            vectors[i] = prep.encoded[i]
        new = np.array(sorted([*todo, *made_there]), np.int64)
        keep = np.zeros(n, bool)
        keep[hits], keep[new] = True, True
        if self.shelf is not None and len(new):
            self.shelf.add(pa.array([prep.digests[i] for i in new], pa.binary(32)), vectors[new],
                           (prep.wall + encode_seconds) / len(new))
        t0 = time.perf_counter()
        kept = batch.filter(pa.array(keep)) if not keep.all() else batch
        columns = {name: kept.column(name) for name in kept.schema.names}
        columns[EMBEDDING_COLUMN] = tables.vector_array(vectors[keep])
        self.writer.write(pa.RecordBatch.from_arrays([columns[c] for c in self.schema.names], schema=self.schema))
        outcome = BatchOutcome(n, kept.num_rows, len(hits), len(new), saved,
                               [r for r in prep.rows if isinstance(r, LoadFailure)],
                               {"decode": prep.wall, "digest": prep.digest_seconds, "encode": encode_seconds,
                                "write": time.perf_counter() - t0})
        self.stats.add(outcome, self.events)
        return outcome

    def _from_store(self, batch: pa.RecordBatch, prep: Prepared) -> tuple[np.ndarray, np.ndarray | None, float]:
        """Rows the store holds now, their vectors and cost; a row whose shard was lost is prepared again."""
        while self.shelf is not None:
            where = self.shelf.find(prep.digests)
            hits = np.flatnonzero(where >= 0)
            lost = [i for i in np.flatnonzero(where < 0) if prep.rows[i] is None and i not in prep.encoded]
            for i in lost:  # rare: a shard set aside since
                prep.rows[i] = self.preparer.again(filepaths_of(batch)[i])
            vectors = self.shelf.vectors(where[hits]) if len(hits) else None
            if vectors is not None or not len(hits):
                return hits, vectors, self.shelf.seconds_saved(where[hits]) if len(hits) else 0.0
        return np.zeros(0, np.int64), None, 0.0


@contextlib.contextmanager
def embedding_step(listing: Listing, output_path: Path, encoder: Encoder, shelf: Shelf | None,
                   events: Events) -> Iterator[Step]:
    """An embedding step: the store's index read; the output written through a temp name (renamed
    only if the block finishes) in row groups sized for the vectors; the store compacted."""
    started = time.perf_counter()
    schema = output_schema(listing.schema, encoder.identity)
    stats = EmbedStats(columns=list(schema.names))
    held = shelf.load_index() if shelf is not None else np.zeros(0, "S32")
    with tables.atomic_output(output_path) as tmp, \
            RowGroupWriter(tmp, schema, rows_per_group(encoder.dim)) as writer:
        yield Step(encoder, shelf, Preparer(listing.images_root, held, encoder.preprocess), events, schema, writer,
                   stats)
    _close_shelf(shelf, stats, events)
    stats.timings["total"] = time.perf_counter() - started


def _close_shelf(shelf: Shelf | None, stats: EmbedStats, events: Events) -> None:
    """After the last batch: the store compacted, its set-aside shards counted, a failed write said."""
    if shelf is None:
        return
    shelf.compact()
    stats.corrupt_shards = list(shelf.corrupt)
    if shelf.write_error:
        events.log("warning", f"the embedding store could not be written ({shelf.write_error}); "
                              "this run's later vectors were not kept for reuse")


def embed_file(listing: Listing, output_path: Path, encoder: Encoder, *, batch_size: int, events: Events,
               shelf: Shelf | None = None) -> EmbedStats:
    """Embed `listing` into `output_path` in-process: batches prepared ahead (rows side by side in
    up to 8 threads), encoded and finished in order; what the `shelf` holds is not encoded again."""
    with ThreadPoolExecutor(min(8, (os.cpu_count() or 2)), thread_name_prefix="decode") as decoders, \
            ThreadPoolExecutor(1, thread_name_prefix="prepare") as preparer, \
            embedding_step(listing, output_path, encoder, shelf, events) as step:

        def finish(batch: pa.RecordBatch, prepared: Future[Prepared]) -> None:
            step.finish(batch, prepared.result())
            events.progress("embed", step.stats.rows_in, listing.rows,
                            f"{step.stats.reused} reused from the store" if shelf else "")

        events.progress("embed", 0, listing.rows)
        pending: deque[tuple[pa.RecordBatch, Future[Prepared]]] = deque()
        for batch in timed(listing.batches(batch_size), step.stats.timings):
            pending.append((batch, preparer.submit(step.preparer, filepaths_of(batch), decoders.map)))
            if len(pending) > _PREFETCH:
                finish(*pending.popleft())
        while pending:
            finish(*pending.popleft())
    return step.stats


def timed(batches: Iterator[pa.RecordBatch], timings: dict[str, float]) -> Iterator[pa.RecordBatch]:
    """The listing's batches, the time reading them counted as `read`."""
    while True:
        t0 = time.perf_counter()
        batch = next(batches, None)
        timings["read"] += time.perf_counter() - t0
        if batch is None:
            return
        yield batch


class RowGroupWriter:
    """Buffers encoder-sized batches into large row groups, so readers stream efficiently."""

    def __init__(self, path: Path, schema: pa.Schema, rows_per_group: int) -> None:
        self._writer = pq.ParquetWriter(path, schema)
        self.schema, self._limit = schema, rows_per_group
        self._pending: list[pa.RecordBatch] = []
        self._rows = 0

    def write(self, batch: pa.RecordBatch) -> None:
        self._pending.append(batch)
        self._rows += batch.num_rows
        if self._rows >= self._limit:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            self._writer.write_table(pa.Table.from_batches(self._pending, self.schema),
                                     row_group_size=max(self._rows, 1))
        self._pending, self._rows = [], 0

    def __enter__(self) -> "RowGroupWriter":
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.flush()
        self._writer.close()


def output_schema(schema: pa.Schema, identity: EncoderIdentity) -> pa.Schema:
    """Input columns unchanged and in order, `embedding` appended (or replaced in place)."""
    vector = pa.field(EMBEDDING_COLUMN, pa.list_(pa.float32()))
    fields = [vector if f.name == EMBEDDING_COLUMN else f for f in schema]
    if EMBEDDING_COLUMN not in schema.names:
        fields.append(vector)
    metadata = {k: v for k, v in (schema.metadata or {}).items() if k != b"pandas"}
    metadata[tables.IDENTITY_KEY] = json.dumps(identity.model_dump(mode="json"), sort_keys=True).encode()
    return pa.schema(fields, metadata=metadata)


def embed_texts(listing: Listing, output_path: Path, encoder: TextEncoder, *, batch_size: int, events: Events,
                shelf: Shelf | None = None) -> EmbedStats:
    """Embed a text listing's sentences into `output_path` (`text`, `embedding`, then the other input
    columns, as the container orders them), batch by batch through the text tower; null and blank
    texts are skipped and counted. The `shelf` keys each vector by SHA-256 of the UTF-8 text."""
    started = time.perf_counter()
    schema = text_schema(listing.schema, encoder)
    stats = EmbedStats(columns=list(schema.names))
    if shelf is not None:
        shelf.load_index()
    events.progress("embed", 0, listing.rows)
    with tables.atomic_output(output_path) as tmp, \
            RowGroupWriter(tmp, schema, rows_per_group(encoder.dim)) as writer:
        for batch in timed(listing.batches(batch_size), stats.timings):
            stats.add(_text_batch(batch, encoder, shelf, writer, stats), events)
            events.progress("embed", stats.rows_in, listing.rows, f"{stats.reused} reused from the store"
                            if shelf is not None else "")
    _close_shelf(shelf, stats, events)
    if sum(stats.skipped_by_reason.values()):
        events.log("warning", f"skipped {sum(stats.skipped_by_reason.values())} null or blank text(s), e.g. "
                              f"{stats.skipped_examples[0]}")
    stats.timings["total"] = time.perf_counter() - started
    return stats


def _text_batch(batch: pa.RecordBatch, encoder: TextEncoder, shelf: Shelf | None, writer: RowGroupWriter,
                stats: EmbedStats) -> BatchOutcome:
    """One batch of texts: the blank ones counted out, the store's vectors taken, the rest encoded
    (and stored), the kept rows written."""
    texts = batch.column(TEXT).to_pylist()
    keep = [i for i, text in enumerate(texts) if isinstance(text, str) and text.strip()]
    for i in sorted(set(range(len(texts))) - set(keep)):
        reason = "null text" if texts[i] is None else "empty text"
        stats.skipped_by_reason[reason] += 1
        if len(stats.skipped_examples) < _SKIPPED_EXAMPLES:
            stats.skipped_examples.append(f"row {stats.rows_in + i}: {reason}")
    digests = [digest(texts[i].encode("utf-8")) for i in keep]
    where = shelf.find(digests) if shelf is not None else np.full(len(keep), -1)
    stored = shelf.vectors(where[where >= 0]) if shelf is not None and (where >= 0).any() else None
    if stored is None:  # nothing held (or a shard lost meanwhile): encode them all
        where = np.full(len(keep), -1)
    todo = np.flatnonzero(where < 0)
    vectors = np.zeros((len(keep), encoder.dim), np.float32)
    t0 = time.perf_counter()
    vectors[todo] = encoder.encode([texts[keep[i]] for i in todo]) if len(todo) else 0.0
    seconds = time.perf_counter() - t0
    saved = 0.0
    if stored is not None:
        vectors[where >= 0] = stored
        saved = shelf.seconds_saved(where[where >= 0]) if shelf is not None else 0.0
    if shelf is not None and len(todo):
        shelf.add(pa.array([digests[i] for i in todo], pa.binary(32)), vectors[todo], seconds / len(todo))
    t0 = time.perf_counter()
    kept = batch.take(pa.array(keep, pa.int64()))
    columns = {name: kept.column(name) for name in kept.schema.names}
    columns[EMBEDDING_COLUMN] = tables.vector_array(vectors)
    writer.write(pa.RecordBatch.from_arrays([columns[c] for c in stats.columns], schema=writer.schema))
    return BatchOutcome(len(texts), len(keep), len(keep) - len(todo), len(todo), saved, [],
                        {"encode": seconds, "write": time.perf_counter() - t0})


def text_schema(schema: pa.Schema, encoder: TextEncoder) -> pa.Schema:
    """`text`, `embedding`, then every other input column in order; the identity and the tokenizer
    settings in the metadata."""
    base = output_schema(schema, encoder.identity)
    order = [TEXT, EMBEDDING_COLUMN, *(n for n in base.names if n not in (TEXT, EMBEDDING_COLUMN))]
    metadata = {**base.metadata, TEXT_SETTINGS_KEY: json.dumps(encoder.settings, sort_keys=True).encode()}
    return pa.schema([base.field(n) for n in order], metadata=metadata)
