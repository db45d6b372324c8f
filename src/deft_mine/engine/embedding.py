"""The embedding step: a listing's batches, each through one batch step (prepare → encode →
finish), run in-process here or by Ray (backends/ray_embed.py), into one parquet, with timings."""

from __future__ import annotations

import contextlib
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
from deft_mine.engine.encoders import Encoder
from deft_mine.engine.images import LoadFailure, decode_rgb, digest, read_bytes
from deft_mine.engine.listings import Listing, filepaths_of
from deft_mine.engine.store import Shelf
from deft_mine.errors import DeftError
from deft_mine.events import Events
from deft_mine.schemas.results import EncoderIdentity

EMBEDDING_COLUMN = "embedding"
_PREFETCH = 2  # batches decoded ahead of the encoder
_SKIPPED_EXAMPLES = 5
# Readers decode a whole row group at once (several times its size in Arrow memory), so row
# groups are sized by bytes of vectors, not rows: ~10k rows of 768-d float32.
_ROW_GROUP_BYTES = 32 << 20


def _rows_per_group(dim: int) -> int:
    return max(1024, _ROW_GROUP_BYTES // max(4 * dim, 1))


@dataclass
class BatchOutcome:
    """What one batch step did: its rows in and written, where their vectors came from, the
    images it could not read, and the seconds of each stage."""

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

    @property
    def skipped(self) -> int:
        return sum(self.skipped_by_reason.values())

    def add(self, outcome: BatchOutcome, events: Events) -> None:
        """A finished batch counted (the one place the counts change); its unreadable images
        counted by reason (the first few named) and told."""
        for name in ("rows_in", "rows_out", "reused", "embedded", "seconds_saved"):
            setattr(self, name, getattr(self, name) + getattr(outcome, name))
        for stage, seconds in outcome.timings.items():
            self.timings[stage] += seconds
        for failure in outcome.failures:
            self.skipped_by_reason[failure.reason.split(" (")[0]] += 1
            if len(self.skipped_examples) < _SKIPPED_EXAMPLES:
                self.skipped_examples.append(f"{failure.filepath}: {failure.reason}")
        if outcome.failures:
            first = outcome.failures[0]
            events.log("warning", f"skipped {len(outcome.failures)} unreadable image(s), e.g. "
                                  f"{first.filepath}: {first.reason}")


@dataclass
class Prepared:
    """One listing batch made ready for the encoder. Per row: a LoadFailure, the pixels to
    encode, or None (no pixels here: the store held its vector when prepared, or it is in
    `encoded` already, made where the batch was prepared); its digest (None: not read); the
    seconds it took. `wall`: the batch's preparing time as the step counts it."""

    rows: list[LoadFailure | np.ndarray | None]
    digests: list[bytes | None]
    seconds: np.ndarray
    wall: float
    digest_seconds: float = 0.0
    encoded: dict[int, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class Preparer:
    """The prepare stage: each row read, digested, looked up in the store (`held`), and unless
    held, decoded and preprocessed (the encoder's CPU half)."""

    images_root: Path
    held: Callable[[bytes], bool]
    preprocess: Callable[[list[Any]], np.ndarray]

    def row(self, filepath: str | None) -> tuple[LoadFailure | np.ndarray | None, bytes | None, float, float]:
        t0 = time.perf_counter()
        data = read_bytes(filepath, self.images_root)
        if isinstance(data, LoadFailure):
            return data, None, 0.0, 0.0
        t1 = time.perf_counter()
        found = digest(data)
        digest_seconds = time.perf_counter() - t1
        if self.held(found):
            return None, found, 0.0, digest_seconds
        return self.pixels(filepath, data), found, time.perf_counter() - t0, digest_seconds

    def pixels(self, filepath: object, data: bytes) -> np.ndarray | LoadFailure:
        image = decode_rgb(data, str(filepath))
        return image if isinstance(image, LoadFailure) else \
            np.ascontiguousarray(self.preprocess([image]), dtype=np.float32)

    def again(self, filepath: str) -> np.ndarray:
        """A row the store held when prepared but has lost since (its shard set aside): read and
        decoded now, for the encoder after all."""
        data = read_bytes(filepath, self.images_root)
        pixels = data if isinstance(data, LoadFailure) else self.pixels(filepath, data)
        if isinstance(pixels, LoadFailure):  # it read fine a moment ago
            raise DeftError("image_changed", f"{filepath} changed while it was being embedded ({pixels.reason})",
                            fix="run again once the images are no longer being written", path=str(filepath))
        return pixels

    def __call__(self, filepaths: list[str | None], mapper: Callable[..., Iterable[Any]] = map) -> Prepared:
        """The batch prepared, row by row (`mapper`: a thread pool's map runs them side by side)."""
        t0 = time.perf_counter()
        done = list(mapper(self.row, filepaths))
        return Prepared([d[0] for d in done], [d[1] for d in done], np.array([d[2] for d in done], np.float64),
                        time.perf_counter() - t0, sum(d[3] for d in done))


def held_in(index: np.ndarray) -> Callable[[bytes], bool]:
    """A lookup in a snapshot of the store's sorted digests (what a worker elsewhere holds)."""
    def held(found: bytes) -> bool:
        at = int(np.searchsorted(index, np.array([found], "S32"))[0])
        return at < len(index) and index[at] == found
    return held


def encode(encoder: Encoder, pixels: list[np.ndarray]) -> np.ndarray:
    """The encode stage: the rows' vectors, (rows, dim) float32."""
    if not pixels:
        return np.zeros((0, encoder.dim), np.float32)
    return np.asarray(encoder.encode(np.concatenate(pixels)), np.float32)


@dataclass
class Step:
    """One embedding step under way: the listing, the encoder, the store's shelf (None: off),
    the output being written and the counts. Each prepared batch goes through `finish`."""

    listing: Listing
    encoder: Encoder
    shelf: Shelf | None
    preparer: Preparer
    events: Events
    schema: pa.Schema
    writer: "RowGroupWriter"
    stats: EmbedStats

    def finish(self, batch: pa.RecordBatch, prep: Prepared) -> BatchOutcome:
        outcome = finish(self, batch, prep)
        self.stats.add(outcome, self.events)
        return outcome


@contextlib.contextmanager
def embedding_step(listing: Listing, output_path: Path, encoder: Encoder, shelf: Shelf | None,
                   events: Events) -> Iterator[Step]:
    """An embedding step from start to end: the output's schema, the store's index read; then
    the output written (atomically: only if the block finishes), the store compacted and its
    trouble counted and told."""
    started = time.perf_counter()
    schema = output_schema(listing.schema, encoder.identity)
    stats = EmbedStats(columns=list(schema.names))
    if shelf is not None:
        shelf.load_index()
    held = (lambda found: bool(shelf.find([found])[0] >= 0)) if shelf is not None else (lambda found: False)
    with output_writer(output_path, schema, encoder.dim) as writer:
        yield Step(listing, encoder, shelf, Preparer(listing.images_root, held, encoder.preprocess), events, schema,
                   writer, stats)
    if shelf is not None:
        shelf.compact()
        stats.corrupt_shards = list(shelf.corrupt)
        if shelf.write_error:
            events.log("warning", f"the embedding store could not be written ({shelf.write_error}); "
                                  "this run's later vectors were not kept for reuse")
    stats.timings["total"] = time.perf_counter() - started


def embed_file(listing: Listing, output_path: Path, encoder: Encoder, *, batch_size: int, events: Events,
               shelf: Shelf | None = None, workers: int | None = None) -> EmbedStats:
    """Embed every row's image of `listing` into `output_path` (written atomically), in-process:
    batches prepared ahead in a thread (rows side by side in `workers` threads), encoded and
    finished in order.

    With a `shelf` (the store's vectors for this encoder), an image whose bytes were embedded
    before is not decoded nor encoded again, and every finished batch is stored as it goes.
    Rows whose image cannot be read are left out of the output and counted by reason.
    """
    workers = workers or min(8, (os.cpu_count() or 2))
    with ThreadPoolExecutor(workers, thread_name_prefix="decode") as decoders, \
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


def finish(step: Step, batch: pa.RecordBatch, prep: Prepared) -> BatchOutcome:
    """The finish stage: rows the store holds now take its vectors, the other readable rows are
    encoded (unless `prep.encoded` has them); the new vectors go into the store first, so that a
    run killed after this batch resumes past it, then the kept rows into the output."""
    n = batch.num_rows
    hits, stored, saved = _from_store(step, batch, prep)
    held = set(hits.tolist())
    todo = [i for i, r in enumerate(prep.rows) if isinstance(r, np.ndarray) and i not in held]
    t0 = time.perf_counter()
    fresh = encode(step.encoder, [prep.rows[i] for i in todo])
    encode_seconds = time.perf_counter() - t0
    vectors = np.zeros((n, step.encoder.dim), np.float32)
    if len(hits):
        vectors[hits] = stored
    vectors[todo] = fresh
    made_there = [i for i in prep.encoded if i not in held]
    for i in made_there:
        vectors[i] = prep.encoded[i]
    new = np.array(sorted([*todo, *made_there]), np.int64)
    keep = np.zeros(n, bool)
    keep[hits], keep[new] = True, True
    if step.shelf is not None and len(new):
        step.shelf.add(pa.array([prep.digests[i] for i in new], pa.binary(32)), vectors[new],
                       (prep.wall + encode_seconds) / len(new))
    t0 = time.perf_counter()
    rows_out = write_rows(batch, vectors, keep, step.writer, step.schema)
    return BatchOutcome(n, rows_out, len(hits), len(new), saved, [r for r in prep.rows if isinstance(r, LoadFailure)],
                        {"decode": prep.wall, "digest": prep.digest_seconds, "encode": encode_seconds,
                         "write": time.perf_counter() - t0})


def _from_store(step: Step, batch: pa.RecordBatch, prep: Prepared) -> tuple[np.ndarray, np.ndarray | None, float]:
    """The rows whose vector the store holds now, those vectors and what they once cost to
    embed; a row held when prepared whose shard fails its checksum now (the shard is set aside)
    is prepared again, for the encoder after all."""
    while step.shelf is not None:
        where = step.shelf.find(prep.digests)
        hits = np.flatnonzero(where >= 0)
        lost = [i for i in np.flatnonzero(where < 0) if prep.rows[i] is None and i not in prep.encoded]
        if lost:
            paths = filepaths_of(batch)
            for i in lost:
                prep.rows[i] = step.preparer.again(paths[i])
        vectors = step.shelf.vectors(where[hits]) if len(hits) else None
        if vectors is not None or not len(hits):
            return hits, vectors, step.shelf.seconds_saved(where[hits]) if len(hits) else 0.0
    return np.zeros(0, np.int64), None, 0.0


def write_rows(batch: pa.RecordBatch, vectors: np.ndarray, keep: np.ndarray, writer: "RowGroupWriter",
               schema: pa.Schema) -> int:
    """The batch's kept rows, their input columns as they were and `vectors` as the embedding;
    how many were written."""
    kept = batch.filter(pa.array(keep)) if not keep.all() else batch
    columns = {name: kept.column(name) for name in kept.schema.names}
    columns[EMBEDDING_COLUMN] = tables.vector_array(vectors[keep])
    writer.write(pa.RecordBatch.from_arrays([columns[n] for n in schema.names], schema=schema))
    return kept.num_rows


@contextlib.contextmanager
def output_writer(output_path: Path, schema: pa.Schema, dim: int) -> Iterator["RowGroupWriter"]:
    """An embedding parquet written through a temp name, in row groups sized for `dim`."""
    with tables.atomic_output(output_path) as tmp, RowGroupWriter(tmp, schema, _rows_per_group(dim)) as writer:
        yield writer


class RowGroupWriter:
    """Buffers encoder-sized batches into large row groups, so readers stream efficiently."""

    def __init__(self, path: Path, schema: pa.Schema, rows_per_group: int) -> None:
        self._writer = pq.ParquetWriter(path, schema)
        self._schema = schema
        self._pending: list[pa.RecordBatch] = []
        self._rows = 0
        self._limit = rows_per_group

    def write(self, batch: pa.RecordBatch) -> None:
        self._pending.append(batch)
        self._rows += batch.num_rows
        if self._rows >= self._limit:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            self._writer.write_table(pa.Table.from_batches(self._pending, self._schema),
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
