"""The embedding loop: read rows → decode images → encode → write parquet, with stage timings."""

from __future__ import annotations

import json
import os
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from deft_mine.engine import tables
from deft_mine.engine.encoders import Encoder
from deft_mine.engine.images import LoadFailure, load_rgb
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
    skipped_by_reason: Counter = field(default_factory=Counter)
    skipped_examples: list[str] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=lambda: dict.fromkeys(
        ("read", "decode", "encode", "write", "total"), 0.0))

    @property
    def skipped(self) -> int:
        return sum(self.skipped_by_reason.values())


@dataclass
class _Prepared:
    batch: pa.RecordBatch
    keep: np.ndarray
    pixels: Any
    failures: list[LoadFailure]
    seconds: float


def embed_file(
    input_path: Path,
    output_path: Path,
    encoder: Encoder,
    *,
    batch_size: int,
    image_root: Path,
    events: Events,
    workers: int | None = None,
) -> EmbedStats:
    """Embed every row's image of `input_path` into `output_path` (written atomically).

    Rows whose image cannot be read are left out of the output and counted by reason.
    """
    started = time.perf_counter()
    stats = EmbedStats()
    schema = tables.schema_of(input_path)
    tables.require_columns(input_path, schema, ["filepath"], "input_parquet")
    total = tables.num_rows(input_path)
    out_schema = _output_schema(schema, encoder.identity)
    stats.columns = list(out_schema.names)
    workers = workers or min(8, (os.cpu_count() or 2))
    events.progress("embed", 0, total)

    with ThreadPoolExecutor(workers, thread_name_prefix="decode") as decoders, \
            ThreadPoolExecutor(1, thread_name_prefix="prepare") as preparer, \
            tables.atomic_output(output_path) as tmp, \
            _RowGroupWriter(tmp, out_schema, _rows_per_group(encoder.dim)) as writer:

        def load_one(filepath: object) -> np.ndarray | LoadFailure:
            if filepath is None:
                return LoadFailure("<null>", "null filepath")
            image = load_rgb(str(filepath), image_root)
            # Preprocessing per image in the worker keeps every core busy, not just one.
            return image if isinstance(image, LoadFailure) else encoder.preprocess([image])

        def prepare(batch: pa.RecordBatch) -> _Prepared:
            t0 = time.perf_counter()
            loaded = list(decoders.map(load_one, batch.column("filepath").to_pylist()))
            keep = np.array([not isinstance(x, LoadFailure) for x in loaded], dtype=bool)
            parts = [x for x in loaded if not isinstance(x, LoadFailure)]
            pixels = np.concatenate(parts) if parts else None
            failures = [x for x in loaded if isinstance(x, LoadFailure)]
            return _Prepared(batch, keep, pixels, failures, time.perf_counter() - t0)

        pending: deque[Future[_Prepared]] = deque()
        batches = _timed(tables.iter_batches(input_path, batch_size), stats.timings)
        for batch in batches:
            pending.append(preparer.submit(prepare, batch))
            if len(pending) > _PREFETCH:
                _finish(pending.popleft().result(), encoder, writer, out_schema, stats, events, total)
        while pending:
            _finish(pending.popleft().result(), encoder, writer, out_schema, stats, events, total)

    stats.timings["total"] = time.perf_counter() - started
    return stats


def _timed(batches: Iterator[pa.RecordBatch], timings: dict[str, float]) -> Iterator[pa.RecordBatch]:
    while True:
        t0 = time.perf_counter()
        batch = next(batches, None)
        timings["read"] += time.perf_counter() - t0
        if batch is None:
            return
        yield batch


def _finish(prep: _Prepared, encoder: Encoder, writer: "_RowGroupWriter", schema: pa.Schema,
            stats: EmbedStats, events: Events, total: int) -> None:
    stats.timings["decode"] += prep.seconds
    stats.rows_in += prep.batch.num_rows
    for failure in prep.failures:
        stats.skipped_by_reason[failure.reason.split(" (")[0]] += 1
        if len(stats.skipped_examples) < _SKIPPED_EXAMPLES:
            stats.skipped_examples.append(f"{failure.filepath}: {failure.reason}")
    if prep.failures:
        events.log("warning", f"skipped {len(prep.failures)} unreadable image(s), e.g. "
                              f"{prep.failures[0].filepath}: {prep.failures[0].reason}")
    t0 = time.perf_counter()
    vectors = encoder.encode(prep.pixels) if prep.pixels is not None else np.zeros((0, encoder.dim), np.float32)
    stats.timings["encode"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    kept = prep.batch.filter(pa.array(prep.keep)) if not prep.keep.all() else prep.batch
    columns = {name: kept.column(name) for name in kept.schema.names}
    columns[EMBEDDING_COLUMN] = tables.vector_array(vectors)
    writer.write(pa.RecordBatch.from_arrays([columns[n] for n in schema.names], schema=schema))
    stats.timings["write"] += time.perf_counter() - t0
    stats.rows_out += kept.num_rows
    events.progress("embed", stats.rows_in, total)


class _RowGroupWriter:
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

    def __enter__(self) -> "_RowGroupWriter":
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.flush()
        self._writer.close()


def _output_schema(schema: pa.Schema, identity: EncoderIdentity) -> pa.Schema:
    """Input columns unchanged and in order, `embedding` appended (or replaced in place)."""
    vector = pa.field(EMBEDDING_COLUMN, pa.list_(pa.float32()))
    fields = [vector if f.name == EMBEDDING_COLUMN else f for f in schema]
    if EMBEDDING_COLUMN not in schema.names:
        fields.append(vector)
    metadata = {k: v for k, v in (schema.metadata or {}).items() if k != b"pandas"}
    metadata[tables.IDENTITY_KEY] = json.dumps(identity.model_dump(mode="json"), sort_keys=True).encode()
    return pa.schema(fields, metadata=metadata)
