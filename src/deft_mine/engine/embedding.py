"""The embedding loop: read rows → decode images → encode → write parquet, with stage timings."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from deft_mine.engine import tables
from deft_mine.engine.encoders import Encoder
from deft_mine.engine.images import LoadFailure, decode_rgb, digest, read_bytes
from deft_mine.engine.store import Shelf
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


@dataclass
class _Prepared:
    batch: pa.RecordBatch
    digests: list[bytes | None]  # of each row's bytes (None: unreadable)
    rows: list[Any]  # per row: a LoadFailure, the pixels to encode, or the bytes of a stored image
    seconds: float


def embed_file(
    input_path: Path,
    output_path: Path,
    encoder: Encoder,
    *,
    batch_size: int,
    image_root: Path,
    events: Events,
    shelf: Shelf | None = None,
    workers: int | None = None,
) -> EmbedStats:
    """Embed every row's image of `input_path` into `output_path` (written atomically).

    With a `shelf` (the store's vectors for this encoder), an image whose bytes were embedded
    before is not decoded nor encoded again, and every finished batch is stored as it goes.
    Rows whose image cannot be read are left out of the output and counted by reason.
    """
    started = time.perf_counter()
    stats, out_schema, total = start_step(input_path, encoder, shelf)
    workers = workers or min(8, (os.cpu_count() or 2))

    with ThreadPoolExecutor(workers, thread_name_prefix="decode") as decoders, \
            ThreadPoolExecutor(1, thread_name_prefix="prepare") as preparer, \
            output_writer(output_path, out_schema, encoder.dim) as writer:

        def read_one(filepath: object) -> tuple[bytes, bytes] | LoadFailure:
            data = read_bytes(filepath, image_root)
            if isinstance(data, LoadFailure):
                return data
            t0 = time.perf_counter()
            found = digest(data)
            stats.timings["digest"] += time.perf_counter() - t0  # summed over the workers
            return found, data

        def pixels_of(filepath: object, data: bytes) -> np.ndarray | LoadFailure:
            # Preprocessing per image in the worker keeps every core busy, not just one.
            image = decode_rgb(data, str(filepath))
            return image if isinstance(image, LoadFailure) else encoder.preprocess([image])

        def prepare(batch: pa.RecordBatch) -> _Prepared:
            t0 = time.perf_counter()
            paths = batch.column("filepath").to_pylist()
            read = list(decoders.map(read_one, paths))
            digests = [None if isinstance(r, LoadFailure) else r[0] for r in read]
            stored = shelf.find(digests) >= 0 if shelf is not None else np.zeros(len(read), bool)
            todo = [i for i, r in enumerate(read) if not isinstance(r, LoadFailure) and not stored[i]]
            rows: list[Any] = [r if isinstance(r, LoadFailure) else r[1] for r in read]
            for i, pixels in zip(todo, decoders.map(lambda i: pixels_of(paths[i], rows[i]), todo)):
                rows[i] = pixels
            return _Prepared(batch, digests, rows, time.perf_counter() - t0)

        def finish(prep: _Prepared) -> None:
            _finish(prep, encoder, shelf, writer, out_schema, stats, events, total, pixels_of)

        events.progress("embed", 0, total)
        pending: deque[Future[_Prepared]] = deque()
        for batch in _timed(tables.iter_batches(input_path, batch_size), stats.timings):
            pending.append(preparer.submit(prepare, batch))
            if len(pending) > _PREFETCH:
                finish(pending.popleft().result())
        while pending:
            finish(pending.popleft().result())
    return close_shelf(shelf, stats, events, started)


def close_shelf(shelf: Shelf | None, stats: EmbedStats, events: Events, started: float) -> EmbedStats:
    """The end of an embedding step: the store compacted, its trouble counted and told."""
    if shelf is not None:
        shelf.compact()
        stats.corrupt_shards = list(shelf.corrupt)
        if shelf.write_error:
            events.log("warning", f"the embedding store could not be written ({shelf.write_error}); "
                                  "this run's later vectors were not kept for reuse")
    stats.timings["total"] = time.perf_counter() - started
    return stats


def start_step(input_path: Path, encoder: Encoder, shelf: Shelf | None) -> tuple[EmbedStats, pa.Schema, int]:
    """The start of an embedding step: the listing checked and counted, the output's schema,
    the store's index read."""
    stats = EmbedStats()
    schema = tables.schema_of(input_path)
    tables.require_columns(input_path, schema, ["filepath"], "input_parquet")
    out_schema = output_schema(schema, encoder.identity)
    stats.columns = list(out_schema.names)
    if shelf is not None:
        shelf.load_index()
    return stats, out_schema, tables.num_rows(input_path)


def _timed(batches: Iterator[pa.RecordBatch], timings: dict[str, float]) -> Iterator[pa.RecordBatch]:
    while True:
        t0 = time.perf_counter()
        batch = next(batches, None)
        timings["read"] += time.perf_counter() - t0
        if batch is None:
            return
        yield batch


def _reused(prep: _Prepared, shelf: Shelf | None,
            pixels_of: Callable[[object, bytes], Any]) -> tuple[np.ndarray, np.ndarray | None, float]:
    """The rows whose vector the store holds, those vectors and what they once cost to embed;
    a row whose shard fails its checksum now (the shard is set aside) is decoded for the
    encoder after all."""
    paths = prep.batch.column("filepath").to_pylist()
    while shelf is not None:
        where = shelf.find(prep.digests)
        hits = np.flatnonzero(where >= 0)
        for i in range(len(prep.rows)):  # stored when prepared, but no longer
            if where[i] < 0 and isinstance(prep.rows[i], bytes):
                prep.rows[i] = pixels_of(paths[i], prep.rows[i])
        vectors = shelf.vectors(where[hits]) if len(hits) else None
        if vectors is not None or not len(hits):
            return hits, vectors, shelf.seconds_saved(where[hits]) if len(hits) else 0.0
    return np.zeros(0, np.int64), None, 0.0


def _finish(prep: _Prepared, encoder: Encoder, shelf: Shelf | None, writer: "RowGroupWriter",
            schema: pa.Schema, stats: EmbedStats, events: Events, total: int,
            pixels_of: Callable[[object, bytes], Any]) -> None:
    stats.timings["decode"] += prep.seconds
    stats.rows_in += prep.batch.num_rows
    hits, stored, saved = _reused(prep, shelf, pixels_of)
    stats.seconds_saved += saved
    count_skips([r for r in prep.rows if isinstance(r, LoadFailure)], stats, events)
    reused = set(hits.tolist())
    new = np.array([i for i, r in enumerate(prep.rows) if isinstance(r, np.ndarray) and i not in reused], np.int64)
    t0 = time.perf_counter()
    fresh = encoder.encode(np.concatenate([prep.rows[i] for i in new])) if len(new) else \
        np.zeros((0, encoder.dim), np.float32)
    stats.timings["encode"] += time.perf_counter() - t0
    vectors = np.zeros((prep.batch.num_rows, encoder.dim), np.float32)
    keep = np.zeros(prep.batch.num_rows, bool)
    if len(hits):
        vectors[hits], keep[hits] = stored, True
    vectors[new], keep[new] = fresh, True
    store_and_write(prep.batch, vectors, keep, new, [prep.digests[i] for i in new],
                    (prep.seconds + time.perf_counter() - t0) / max(len(new), 1), len(hits), shelf, writer, schema,
                    stats)
    events.progress("embed", stats.rows_in, total, f"{stats.reused} reused from the store" if shelf else "")


def count_skips(failures: list[LoadFailure], stats: EmbedStats, events: Events) -> None:
    """A batch's unreadable images, counted by reason (the first few named) and told."""
    for failure in failures:
        stats.skipped_by_reason[failure.reason.split(" (")[0]] += 1
        if len(stats.skipped_examples) < _SKIPPED_EXAMPLES:
            stats.skipped_examples.append(f"{failure.filepath}: {failure.reason}")
    if failures:
        events.log("warning", f"skipped {len(failures)} unreadable image(s), e.g. "
                              f"{failures[0].filepath}: {failures[0].reason}")


def store_and_write(batch: pa.RecordBatch, vectors: np.ndarray, keep: np.ndarray, new: np.ndarray,
                    new_digests: list[bytes], seconds_each: float, reused: int, shelf: Shelf | None,
                    writer: "RowGroupWriter", schema: pa.Schema, stats: EmbedStats) -> None:
    """A finished batch: its newly embedded rows (`new`) into the store first, so that a run
    killed after this batch resumes past it; then its kept rows into the output; then counted."""
    if shelf is not None and len(new):
        shelf.add(pa.array(new_digests, pa.binary(32)), vectors[new], seconds_each)
    write_rows(batch, vectors, keep, writer, schema, stats)
    stats.reused += reused
    stats.embedded += len(new)


def write_rows(batch: pa.RecordBatch, vectors: np.ndarray, keep: np.ndarray, writer: "RowGroupWriter",
               schema: pa.Schema, stats: EmbedStats) -> None:
    """The batch's kept rows, their input columns as they were and `vectors` as the embedding."""
    t0 = time.perf_counter()
    kept = batch.filter(pa.array(keep)) if not keep.all() else batch
    columns = {name: kept.column(name) for name in kept.schema.names}
    columns[EMBEDDING_COLUMN] = tables.vector_array(vectors[keep])
    writer.write(pa.RecordBatch.from_arrays([columns[n] for n in schema.names], schema=schema))
    stats.timings["write"] += time.perf_counter() - t0
    stats.rows_out += kept.num_rows


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
