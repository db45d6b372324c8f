"""The embedding store: vectors keyed by (encoder fingerprint, SHA-256 of the image's bytes), kept
as append-only parquet shards with page checksums, so no round embeds an image twice."""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from deft_mine.engine import tables
from deft_mine.errors import DeftError
from deft_mine.schemas.results import EncoderIdentity

MARKER = "deft-mine-store.json"
FORMAT = {"format": "deft-mine-embedding-store", "version": 1}
IDENTITY = "identity.json"
SECONDS_KEY = b"deft_mine.seconds_per_row"  # what embedding one row cost: the time a reuse saves
COMPACT_ROWS = 65536  # rows per compacted shard
GROUP_ROWS = 4096  # rows per row group: a reuse reads only the groups it needs
_CACHED_GROUPS = 8


def default_location() -> Path:
    """$DEFT_MINE_STORE, else `deft-mine` under the user's cache folder."""
    if os.environ.get("DEFT_MINE_STORE"):
        return Path(os.environ["DEFT_MINE_STORE"]).expanduser().absolute()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser().absolute() / "deft-mine"


def open_store(root: Path) -> Path:
    """The store folder, created (with its format marker) when new; refused when it is some
    other folder that already has files in it."""
    marker = root / MARKER
    if not marker.is_file():
        if root.is_dir() and any(p for p in root.iterdir() if not p.name.startswith(".")):
            raise DeftError("store_invalid", f"store {root} is a folder with other files in it, not an "
                            "embedding store", fix="point store at an empty or new folder", field="store",
                            path=str(root))
        tables.write_text_atomic(marker, json.dumps(FORMAT) + "\n")
    return root


@dataclass
class Shard:
    path: Path
    rows: int
    seconds_per_row: float
    group_starts: np.ndarray  # first row of each row group


class Shelf:
    """One encoder's vectors in the store: its folder of shards, an index of their digests,
    and reads of the row groups a lookup needs."""

    def __init__(self, root: Path, identity: EncoderIdentity) -> None:
        self.identity = identity
        self.folder = open_store(root) / identity.fingerprint
        self.folder.mkdir(exist_ok=True)
        if not (self.folder / IDENTITY).is_file():
            tables.write_text_atomic(self.folder / IDENTITY, identity.model_dump_json(indent=2) + "\n")
        self.shards: list[Shard] = []
        self.corrupt: list[str] = []
        self._sorted = np.zeros(0, "S32")  # every stored digest, sorted: lookups are one searchsorted
        self._shard_of = np.zeros(0, np.int32)  # ...and, in the same order, where its vector lives
        self._row_of = np.zeros(0, np.int64)
        self._groups: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self.written: list[Path] = []  # shards this process added (compacted at the end)

    # ---------------------------------------------------------------- finding

    def load_index(self) -> None:
        """Read the digest column of every shard (their footers say the rest)."""
        digests, shard_of, row_of = [], [], []
        for path in _shards(self.folder):
            try:
                file = pq.ParquetFile(path, page_checksum_verification=True)
                column = file.read(columns=["digest"]).column("digest").combine_chunks()
                meta = file.schema_arrow.metadata or {}
            except FileNotFoundError:  # pruned or compacted away meanwhile
                continue
            except (pa.ArrowException, OSError, ValueError):
                self._quarantine(path)
                continue
            starts = np.cumsum([0] + [file.metadata.row_group(i).num_rows
                                      for i in range(file.metadata.num_row_groups)])[:-1]
            shard = Shard(path, len(column), float(meta.get(SECONDS_KEY, b"0")), starts)
            digests.append(column)
            shard_of.append(np.full(len(column), len(self.shards), np.int32))
            row_of.append(np.arange(len(column), dtype=np.int64))
            self.shards.append(shard)
        if digests:
            every = pa.concat_arrays(digests)
            flat = np.frombuffer(every.buffers()[1], "S32", count=len(every), offset=32 * every.offset)
            order = np.argsort(flat, kind="stable")  # among equal digests, the older shard first
            self._sorted = flat[order]
            self._shard_of, self._row_of = np.concatenate(shard_of)[order], np.concatenate(row_of)[order]

    def find(self, digests: list[bytes | None]) -> np.ndarray:
        """For each digest (None: no image), its entry in the index, or -1: a vectorised join
        (binary search over the sorted digests), however large the store."""
        index = self._sorted  # one snapshot: another thread may drop a shard meanwhile
        wanted = np.array([d or b"" for d in digests], "S32")
        at = np.searchsorted(index, wanted)
        hit = (at < len(index)) & (index[np.minimum(at, len(index) - 1)] == wanted) if len(index) \
            else np.zeros(len(wanted), bool)
        return np.where(hit & np.array([d is not None for d in digests], bool), at, -1)

    def seconds_saved(self, entries: np.ndarray) -> float:
        return float(sum(self.shards[s].seconds_per_row for s in self._shard_of[entries]))

    def vectors(self, entries: np.ndarray) -> np.ndarray | None:
        """The stored vectors of these index entries, in order; None when a shard they live in
        turns out unreadable (it is quarantined and left out of the index)."""
        out: list[np.ndarray] = []
        for entry in entries:
            shard_index, row = int(self._shard_of[entry]), int(self._row_of[entry])
            shard = self.shards[shard_index]
            group = int(np.searchsorted(shard.group_starts, row, side="right") - 1)
            try:
                block = self._group(shard_index, group)
            except FileNotFoundError:  # pruned by another process meanwhile: not corrupt, just gone
                self._drop(shard_index, set_aside=False)
                return None
            except (pa.ArrowException, OSError, ValueError, DeftError):
                self._drop(shard_index)
                return None
            out.append(block[row - shard.group_starts[group]])
        return np.stack(out) if out else None

    def _group(self, shard_index: int, group: int) -> np.ndarray:
        key = (shard_index, group)
        if key not in self._groups:
            file = pq.ParquetFile(self.shards[shard_index].path, page_checksum_verification=True)
            column = file.read_row_group(group, columns=["embedding"]).column("embedding")
            self._groups[key] = tables.vectors_from_column(column, path=self.shards[shard_index].path,
                                                           name="embedding", first_row=0, dim=None)
            while len(self._groups) > _CACHED_GROUPS:
                self._groups.popitem(last=False)
        self._groups.move_to_end(key)
        return self._groups[key]

    def _drop(self, shard_index: int, set_aside: bool = True) -> None:
        if set_aside:
            self._quarantine(self.shards[shard_index].path)
        keep = self._shard_of != shard_index
        self._sorted, self._shard_of, self._row_of = self._sorted[keep], self._shard_of[keep], self._row_of[keep]

    def _quarantine(self, path: Path) -> None:
        """A shard that fails its checksum is renamed out of the way (kept for inspection)."""
        self.corrupt.append(path.name)
        try:
            path.rename(path.with_name(f".corrupt-{path.name}"))
        except OSError:
            pass

    # ---------------------------------------------------------------- adding

    def add(self, digests: pa.Array, vectors: np.ndarray, seconds_per_row: float) -> None:
        """One finished batch as its own shard, written atomically: a crash loses at most the
        batches in flight."""
        if len(digests):
            self.written.append(self._write(digests, vectors, seconds_per_row, len(digests)))

    def _write(self, digests: pa.Array, vectors: np.ndarray | pa.Array, seconds_per_row: float,
               group_rows: int) -> Path:
        path = self.folder / f"{time.time_ns()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.parquet"
        embedding = vectors if isinstance(vectors, (pa.Array, pa.ChunkedArray)) else tables.vector_array(vectors)
        table = pa.table({"digest": digests, "embedding": embedding}).replace_schema_metadata(
            {SECONDS_KEY: repr(seconds_per_row).encode()})
        with tables.atomic_output(path) as tmp:
            pq.write_table(table, tmp, compression="none", write_page_checksum=True, row_group_size=group_rows)
        return path

    def compact(self) -> None:
        """Merge the shards this process wrote into large ones (then remove the small ones): a
        store read in a few files, not one per batch. A crash midway leaves duplicates, which
        lookups tolerate."""
        if len(self.written) < 2:
            return
        try:
            parts = [pq.read_table(p, page_checksum_verification=True) for p in self.written]
        except (pa.ArrowException, OSError):  # a shard went missing or bad: keep them as they are
            return
        rows = sum(t.num_rows for t in parts)
        rate = sum(float((t.schema.metadata or {}).get(SECONDS_KEY, b"0")) * t.num_rows for t in parts) / max(rows, 1)
        merged = pa.concat_tables([t.replace_schema_metadata(None) for t in parts]).combine_chunks()
        for start in range(0, merged.num_rows, COMPACT_ROWS):
            piece = merged.slice(start, COMPACT_ROWS)
            self._write(piece.column("digest").combine_chunks(), piece.column("embedding").combine_chunks(),
                        rate, GROUP_ROWS)
        for path in self.written:
            path.unlink(missing_ok=True)
        self.written = []


def _shards(folder: Path) -> list[Path]:
    """The live shards (set-aside `.corrupt-*` ones and temp files are hidden)."""
    return sorted(p for p in folder.glob("*.parquet") if not p.name.startswith("."))


# -------------------------------------------------------------------- keeping it in bounds

@dataclass
class ShelfInfo:
    fingerprint: str
    model: str | None
    model_path: str | None
    shards: int
    vectors: int
    bytes: int
    oldest: float | None  # mtime of the oldest shard
    newest: float | None
    corrupt: int  # quarantined shards


def describe(root: Path) -> list[ShelfInfo]:
    """What the store holds, per encoder (footers only: cheap for any size)."""
    out = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) \
            if root.is_dir() else []:
        try:
            identity = EncoderIdentity.model_validate_json((folder / IDENTITY).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            identity = None
        shards = _shards(folder)
        rows = 0
        for path in shards:
            try:
                rows += pq.ParquetFile(path).metadata.num_rows
            except (pa.ArrowException, OSError):
                pass
        mtimes = [p.stat().st_mtime for p in shards]
        out.append(ShelfInfo(folder.name, identity and identity.model, identity and identity.model_path,
                             len(shards), rows, sum(p.stat().st_size for p in folder.iterdir() if p.is_file()),
                             min(mtimes, default=None), max(mtimes, default=None),
                             len(list(folder.glob(".corrupt-*")))))
    return out


def prune(root: Path, encoder: str | None = None, older_than_seconds: float | None = None) -> tuple[int, int]:
    """Remove one encoder's vectors (by fingerprint or model name), or shards older than the
    given age, or both; returns (shards removed, bytes freed)."""
    if encoder is None and older_than_seconds is None:
        raise DeftError("spec_invalid", "prune needs what to remove", field="encoder",
                        fix="give encoder (a fingerprint or model name from store info) and/or older_than")
    removed = freed = 0
    cutoff = None if older_than_seconds is None else time.time() - older_than_seconds
    for info in describe(root):
        if encoder is not None and encoder not in (info.fingerprint, info.model, info.model_path):
            continue
        folder = root / info.fingerprint
        for path in [*_shards(folder), *folder.glob(".corrupt-*")]:
            if cutoff is None or path.stat().st_mtime < cutoff:
                freed += path.stat().st_size
                path.unlink(missing_ok=True)
                removed += 1
        if cutoff is None:
            shutil.rmtree(folder, ignore_errors=True)
    return removed, freed
