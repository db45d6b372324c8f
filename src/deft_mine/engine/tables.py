"""Tables: parquet/CSV reading in row batches, embedding columns as arrays, metadata, atomic writes."""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import hashlib
import os
import queue
import signal
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from deft_mine.errors import DeftError
from deft_mine.schemas.results import EncoderIdentity

IDENTITY_KEY = b"deft_mine.encoder"
T = TypeVar("T")


def is_csv(path: Path) -> bool:
    return path.suffix.lower() in {".csv", ".tsv"}


def require_file(path: Path, field: str) -> Path:
    if not path.is_file():
        raise DeftError(
            "file_not_found",
            f"{field}: {path} does not exist or is not a file",
            fix=f"check the path given as {field}",
            field=field,
            path=str(path),
        )
    return path


def read_csv(path: Path) -> pa.Table:
    """A whole CSV as a table, column types inferred over the whole file (not per block)."""
    stat = path.stat()
    return _read_csv_cached(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)  # schema, row count and rows of one CSV: parse it once
def _read_csv_cached(path: str, mtime_ns: int, size: int) -> pa.Table:
    # filepath is always text: inferred, "0001" would become the integer 1.
    return _parse_csv(Path(path), lambda names: {"filepath": pa.string()}, strings_can_be_null=True)


def read_text_csv(path: Path) -> pa.Table:
    """A whole CSV with every column read as text, verbatim (a board named 0510 stays 0510; an
    empty field is "")."""
    return _parse_csv(path, lambda names: dict.fromkeys(names, pa.string()), strings_can_be_null=False)


def csv_delimiter(path: Path) -> str:
    """A CSV listing's separator: a tab for .tsv, else as sniff_delimiter judges the header."""
    return "\t" if path.suffix.lower() == ".tsv" else sniff_delimiter(str(path))


def _parse_csv(path: Path, types: Callable[[list[str]], dict[str, pa.DataType]], strings_can_be_null: bool
               ) -> pa.Table:
    """Every CSV we read, parsed one way: its separator chosen once, a parse failure one refusal."""
    parse = pacsv.ParseOptions(delimiter=(delimiter := csv_delimiter(path)))
    try:
        names = pacsv.open_csv(path, parse_options=parse).schema.names
        return pacsv.read_csv(path, parse_options=parse, convert_options=pacsv.ConvertOptions(
            column_types=types(names), strings_can_be_null=strings_can_be_null))
    except pa.ArrowInvalid as exc:
        raise DeftError(
            "csv_invalid", f"{path}: cannot parse as CSV (separator {delimiter!r}): {exc}",
            fix="fix the CSV: one header line, the same number of fields on every line, paths with "
                "the separator in them quoted", path=str(path), separator=delimiter,
        ) from exc


def sniff_delimiter(path: str) -> str:
    """',' unless the header line has none but has ';' or a tab (spreadsheets in many locales
    write ';'); judged on the header only, so a ';' inside a path is never taken for one."""
    with open(path, "rb") as fh:
        header = fh.readline(1 << 16).decode("utf-8-sig", errors="replace")
    return "," if "," in header else next((c for c in (";", "\t") if c in header), ",")


def _parquet(path: Path) -> pq.ParquetFile:
    try:
        # pre_buffer would keep every row group read so far alive until the file is closed:
        # memory would grow with the pool, not with the block being mined.
        return pq.ParquetFile(path, pre_buffer=False)
    except (pa.ArrowInvalid, OSError) as exc:
        raise _unreadable(path, exc, "point at a parquet file (or a .csv pool), or regenerate the file") from exc


def _unreadable(path: Path, exc: Exception, fix: str) -> DeftError:
    return DeftError("parquet_invalid", f"{path}: not a readable parquet file ({exc})", fix=fix, path=str(path))


def schema_of(path: Path) -> pa.Schema:
    if is_csv(path):
        return read_csv(path).schema
    return _parquet(path).schema_arrow


def num_rows(path: Path) -> int:
    if is_csv(path):
        return read_csv(path).num_rows
    return _parquet(path).metadata.num_rows


def iter_batches(
    path: Path, batch_rows: int, columns: list[str] | None = None
) -> Iterator[pa.RecordBatch]:
    """Row batches of a parquet file (streamed from disk) or a CSV (read once, then sliced)."""
    if is_csv(path):
        table = read_csv(path)
        yield from (table if columns is None else table.select(columns)).to_batches(max_chunksize=batch_rows)
        return
    yield from _parquet(path).iter_batches(batch_size=batch_rows, columns=columns)


def read_columns(path: Path, columns: list[str]) -> pa.Table:
    """Whole columns of a (small) file: the targets side."""
    if is_csv(path):
        return read_csv(path).select(columns)
    try:
        return pq.read_table(path, columns=columns)
    except (pa.ArrowInvalid, OSError) as exc:
        raise _unreadable(path, exc, "regenerate the file") from exc


def require_columns(path: Path, schema: pa.Schema, needed: list[str], field: str) -> None:
    """The named columns exist; a `filepath` among them holds text (a schema check, no rows read)."""
    missing = [c for c in needed if c not in schema.names]
    if missing:
        raise DeftError(
            "column_missing",
            f"{field} {path} has no column {', '.join(repr(c) for c in missing)}; "
            f"its columns are: {', '.join(schema.names) or '(none)'}",
            fix="rename the column in the file, or name the right column in the spec",
            path=str(path),
            field=field,
            missing=missing,
            columns=list(schema.names),
        )
    kind = schema.field("filepath").type if "filepath" in needed else None
    # Numbers are no paths: str(17) would be looked up as a file named "17" and every row skipped
    # as missing, or worse, found. A column of type null (only nulls, or no rows) is left to the
    # null rules: its rows are skipped at embedding, refused at mining.
    if kind is not None and not is_text(kind) and not pa.types.is_null(kind):
        raise DeftError(
            "column_invalid",
            f"{field} {path}: column 'filepath' has type {kind}; it must hold image paths as strings",
            fix="write the filepath column as strings (e.g. pyarrow pa.string(), pandas .astype(str))",
            path=str(path), field=field, column="filepath", type=str(kind),
        )


def is_text(kind: pa.DataType) -> bool:
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def first_null(column: pa.Array | pa.ChunkedArray) -> int | None:
    """The first null row of a column, or None; the null count is kept by Arrow, so a clean
    column costs nothing."""
    if not column.null_count:
        return None
    return int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])


def read_identity(path: Path) -> EncoderIdentity | None:
    """The encoder identity recorded in an embedding parquet; None if it has none (or one that
    another tool wrote in a shape of its own)."""
    raw = (_parquet(path).schema_arrow.metadata or {}).get(IDENTITY_KEY)
    try:
        return EncoderIdentity.model_validate_json(raw) if raw else None
    except ValueError:
        return None


def is_vector_type(kind: pa.DataType) -> bool:
    """A list, large list or fixed-size list of numbers: what an embedding column may be."""
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)):
        return False
    return pa.types.is_floating(kind.value_type) or pa.types.is_integer(kind.value_type)


def vectors_from_column(column: pa.Array | pa.ChunkedArray, *, path: Path, name: str, first_row: int,
                        dim: int | None, field: str | None = None) -> np.ndarray:
    """A list/fixed-size-list column of any float width as a (rows, dim) float32 array,
    refusing ragged, null, empty or NaN vectors with the file, column and first bad row named."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    where, named = {"path": str(path), "column": name}, {"field": field} if field else {}

    def bad(row: int, what: str) -> DeftError:
        return DeftError("embedding_invalid",
                         f"{field + ' ' if field else ''}{path}: column '{name}' row {first_row + row}: {what}",
                         fix="re-embed the file; every row needs one finite vector of the same length",
                         **where, row=first_row + row, **named)

    if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)
            or pa.types.is_fixed_size_list(column.type)):
        raise DeftError("embedding_invalid", f"{path}: column '{name}' has type {column.type}, not a list of floats",
                        fix="name the embedding column with source_embed_column_name / target_embed_column_name",
                        **where, **named)
    if len(column) == 0:
        return np.zeros((0, dim or 0), dtype=np.float32)
    if (row := first_null(column)) is not None:
        raise bad(row, "null vector")
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    expected = dim if dim is not None else int(lengths[0])
    wrong = np.flatnonzero(lengths != expected)
    if len(wrong):
        row = int(wrong[0])
        raise bad(row, f"vector of length {lengths[row]}, expected {expected}")
    if expected == 0:
        raise bad(0, "empty vector")
    values = column.flatten()
    if (flat := first_null(values)) is not None:
        raise bad(flat // expected, "null value inside the vector")
    if not pa.types.is_floating(values.type) and not pa.types.is_integer(values.type):
        raise bad(0, f"values of type {values.type}, expected floats")
    # float64 (or float16, or integer) vectors are cast once: mining is float32 throughout.
    array = values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, expected)
    if not np.isfinite(array).all():  # one pass over the block; the row is looked for only then
        row = int(np.flatnonzero(~np.isfinite(array).all(axis=1))[0])
        raise bad(row, "NaN or infinite value" + ("" if values.type == pa.float32() else
                                                  f" (as float32, from {values.type})"))
    return array


def vector_array(vectors: np.ndarray) -> pa.Array:
    """A (rows, dim) float32 array as an Arrow list<float32> column."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    offsets = np.arange(len(vectors) + 1, dtype=np.int32) * np.int32(vectors.shape[1])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(vectors.reshape(-1)))


_END = object()


def read_ahead(items: Iterator[T], depth: int = 1) -> Iterator[T]:
    """Produce the next `depth` items in a background thread while the caller works on this
    one (parquet decoding overlaps the search, which releases the GIL). Errors come through."""
    worker = ThreadPoolExecutor(1, thread_name_prefix="read-ahead")
    try:  # `depth` items ready and one more being read, as a bounded queue and its producer would hold
        ahead = collections.deque(worker.submit(next, items, _END) for _ in range(depth + 1))
        while (item := ahead.popleft().result()) is not _END:
            ahead.append(worker.submit(next, items, _END))
            yield item
    finally:  # a consumer that stops early does not wait for the read in flight
        worker.shutdown(wait=False, cancel_futures=True)


def offer(slots: queue.Queue, entry: object, stop: threading.Event) -> bool:
    """Put `entry` on a bounded queue unless `stop` is set first (its consumer has gone): a
    producer thread never blocks for good on a queue no one reads."""
    while not stop.is_set():
        try:
            slots.put(entry, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


@contextlib.contextmanager
def atomic_output(final: Path) -> Iterator[Path]:
    """Yield a temp path beside `final`; rename onto it only if the block finishes. A folder
    that cannot be written and a full disk are refused by name, never a half-written file."""
    # Ctrl-C/SIGTERM are held off from making the temp file until the block that removes it is
    # entered: a signal in between would strand it (handlers run in the main thread only).
    held = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    except OSError as exc:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
        raise DeftError("output_not_writable", f"cannot write {final}: {exc.strerror or exc}",
                        fix="choose a folder this user can write, or fix its permissions",
                        path=str(final)) from exc
    try:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
        os.close(fd)
        yield Path(tmp)
        _fsync(Path(tmp))  # the bytes reach the disk before the name does
        os.replace(tmp, final)
        _fsync(final.parent)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise DeftError("disk_full", f"the disk filled up while writing {final}; nothing was left "
                            "half-written", fix="free space on that disk (or write elsewhere) and run again",
                            path=str(final)) from exc
        raise


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):  # some filesystems cannot fsync a directory; the rename is still atomic
            os.fsync(fd)
    finally:
        os.close(fd)


def sha256_of(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_table_atomic(path: Path, table: pa.Table) -> None:
    with atomic_output(path) as tmp:
        pq.write_table(table, tmp)
