"""The embedding store: vectors keyed by (encoder fingerprint, SHA-256 of the image's bytes), kept
as append-only parquet shards with page checksums, so no round embeds an image twice."""

from __future__ import annotations

import contextlib
import json
import os
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
from deft_mine.schemas.results import EncoderIdentity, StoreShelf

MARKER = "deft-mine-store.json"
FORMAT = {"format": "deft-mine-embedding-store", "version": 1}
IDENTITY = "identity.json"
SECONDS_KEY = b"deft_mine.seconds_per_row"  # what embedding one row cost: the time a reuse saves
COMPACT_ROWS = 65536  # rows per compacted shard
GROUP_ROWS = 4096  # rows per row group: a reuse reads only the groups it needs
_CACHE_BYTES = 512 << 20  # row groups kept decoded: a pool in another order than the store reads each once


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
        # The marker is looked at again after the listing: a store opened by another process
        # at the same moment gets its marker before any other file, so files with a marker are ours.
        if (root.exists() and not root.is_dir() or root.is_dir() and any(
                p for p in root.iterdir() if not p.name.startswith("."))) and not marker.is_file():
            raise DeftError("store_invalid", f"store {root} is a file or a folder with other files in it, "
                            "not an embedding store", fix="point store at an empty or new folder", field="store",
                            path=str(root))
        tables.write_text_atomic(marker, json.dumps(FORMAT) + "\n")
    return root


def _corrupt(exc: BaseException) -> bool:
    """Bad bytes (checksum, format, bad values), as opposed to a passing system error (too many
    open files, EIO, EACCES: those carry an errno), which must not cost a healthy shard."""
    return isinstance(exc, (pa.ArrowInvalid, ValueError, DeftError)) or (
        isinstance(exc, OSError) and exc.errno is None)


@dataclass
class Shard:
    path: Path
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
        self.write_error: str | None = None  # why storing stopped, if it did

    # ---------------------------------------------------------------- finding

    def load_index(self) -> np.ndarray:
        """Read the digest column of every shard (their footers say the rest); return all digests, sorted
        ("S32"): a snapshot, what a worker elsewhere needs to tell a stored image from a new one."""
        digests, shard_of, row_of = [], [], []
        for path in _shards(self.folder):
            try:
                file = pq.ParquetFile(path, page_checksum_verification=True)
                column = file.read(columns=["digest"]).column("digest").combine_chunks()
                meta = file.schema_arrow.metadata or {}
            except FileNotFoundError:  # pruned or compacted away meanwhile
                continue
            except (pa.ArrowException, OSError, ValueError) as exc:
                if _corrupt(exc):
                    self._quarantine(path)
                continue
            starts = np.cumsum([0] + [file.metadata.row_group(i).num_rows
                                      for i in range(file.metadata.num_row_groups)])[:-1]
            digests.append(column)
            shard_of.append(np.full(len(column), len(self.shards), np.int32))
            row_of.append(np.arange(len(column), dtype=np.int64))
            self.shards.append(Shard(path, float(meta.get(SECONDS_KEY, b"0")), starts))
        if digests:
            every = pa.concat_arrays(digests)
            flat = np.frombuffer(every.buffers()[1], "S32", count=len(every), offset=32 * every.offset)
            order = np.argsort(flat, kind="stable")  # among equal digests, the older shard first
            self._sorted = flat[order]
            self._shard_of, self._row_of = np.concatenate(shard_of)[order], np.concatenate(row_of)[order]
        return self._sorted

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
        turns out unreadable (it leaves the index; set aside when its bytes are bad). Each row
        group is read once per call, whatever order the entries come in."""
        shard_of, row_of = self._shard_of[entries], self._row_of[entries]
        out: np.ndarray | None = None
        for shard_index in np.unique(shard_of):
            shard = self.shards[shard_index]
            mine = np.flatnonzero(shard_of == shard_index)
            groups = np.searchsorted(shard.group_starts, row_of[mine], side="right") - 1
            for group in np.unique(groups):
                try:
                    block = self._group(int(shard_index), int(group))
                except FileNotFoundError:  # pruned or compacted by another process: gone, not corrupt
                    self._drop(int(shard_index), set_aside=False)
                    return None
                except (pa.ArrowException, OSError, ValueError, DeftError) as exc:
                    self._drop(int(shard_index), set_aside=_corrupt(exc))
                    return None
                if out is None:
                    out = np.empty((len(entries), block.shape[1]), np.float32)
                at = mine[groups == group]
                out[at] = block[row_of[at] - shard.group_starts[group]]
        return out

    def _group(self, shard_index: int, group: int) -> np.ndarray:
        key = (shard_index, group)
        if key not in self._groups:
            file = pq.ParquetFile(self.shards[shard_index].path, page_checksum_verification=True)
            column = file.read_row_group(group, columns=["embedding"]).column("embedding")
            self._groups[key] = tables.vectors_from_column(column, path=self.shards[shard_index].path,
                                                           name="embedding", first_row=0, dim=None)
            while sum(block.nbytes for block in self._groups.values()) > _CACHE_BYTES and len(self._groups) > 1:
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
        with contextlib.suppress(OSError):
            path.rename(path.with_name(f".corrupt-{path.name}"))

    # ---------------------------------------------------------------- adding

    def add(self, digests: pa.Array, vectors: np.ndarray, seconds_per_row: float) -> None:
        """One finished batch as its own shard, written atomically: a crash loses at most the
        batches in flight. The store is a cache: when it cannot be written (disk full, pruned
        meanwhile), storing stops for this run and the embedding goes on."""
        finite = np.isfinite(vectors).all(axis=1)  # a NaN from the encoder is never kept for later
        if not finite.all():
            digests, vectors = digests.filter(pa.array(finite)), vectors[finite]
        if len(digests) and self.write_error is None:
            try:
                self.written.append(self._write(digests, vectors, seconds_per_row, len(digests)))
            except OSError as exc:
                self.write_error = f"{exc.__class__.__name__}: {exc}"

    def _write(self, digests: pa.Array, vectors: np.ndarray | pa.Array, seconds_per_row: float,
               group_rows: int) -> Path:
        if not (self.folder / IDENTITY).is_file():  # a prune may have emptied the folder meanwhile
            tables.write_text_atomic(self.folder / IDENTITY, self.identity.model_dump_json(indent=2) + "\n")
        path = self.folder / f"{time.time_ns()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.parquet"
        embedding = vectors if isinstance(vectors, (pa.Array, pa.ChunkedArray)) else tables.vector_array(vectors)
        table = pa.table({"digest": digests, "embedding": embedding}).replace_schema_metadata(
            {SECONDS_KEY: repr(seconds_per_row).encode()})
        with tables.atomic_output(path) as tmp:
            pq.write_table(table, tmp, compression="none", write_page_checksum=True, row_group_size=group_rows)
        return path

    def compact(self) -> None:
        """Merge the shards this process wrote into large ones, then remove the small ones: a store read
        in a few files, not one per batch. Whatever goes wrong (a shard pruned meanwhile, a full disk),
        the small shards stay; a crash midway leaves duplicates, which lookups tolerate."""
        parts, merged_paths = [], []
        for path in self.written:
            with contextlib.suppress(pa.ArrowException, OSError):
                parts.append((path, pq.read_table(path, page_checksum_verification=True)))
        if len(parts) < 2:
            return
        rows = sum(t.num_rows for _, t in parts)
        rate = sum(float((t.schema.metadata or {}).get(SECONDS_KEY, b"0")) * t.num_rows for _, t in parts)
        merged = pa.concat_tables([t.replace_schema_metadata(None) for _, t in parts]).combine_chunks()
        try:
            for start in range(0, merged.num_rows, COMPACT_ROWS):
                piece = merged.slice(start, COMPACT_ROWS)
                merged_paths.append(self._write(piece.column("digest").combine_chunks(),
                                                piece.column("embedding").combine_chunks(), rate / rows, GROUP_ROWS))
        except OSError:
            for path in merged_paths:
                path.unlink(missing_ok=True)
            return
        for path, _ in parts:
            path.unlink(missing_ok=True)
        self.written = []


def _shards(folder: Path) -> list[Path]:
    """The live shards (set-aside `.corrupt-*` ones and temp files are hidden)."""
    return sorted(p for p in folder.glob("*.parquet") if not p.name.startswith("."))


# -------------------------------------------------------------------- keeping it in bounds

def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except FileNotFoundError:  # compacted, pruned or renamed by another process meanwhile
        return None


def describe(root: Path) -> list[StoreShelf]:
    """What the store holds, per encoder (footers only: cheap for any size)."""
    out = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) \
            if root.is_dir() else []:
        try:
            identity = EncoderIdentity.model_validate_json((folder / IDENTITY).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            identity = None
        rows, stats = 0, []
        for path in _shards(folder):
            with contextlib.suppress(pa.ArrowException, OSError):
                rows += pq.ParquetFile(path).metadata.num_rows
                stats.append(path.stat())
        sizes = [st.st_size for p in folder.iterdir() if (st := _stat(p)) is not None]
        out.append(StoreShelf(
            fingerprint=folder.name, model=identity and identity.model, model_path=identity and identity.model_path,
            shards=len(stats), vectors=rows, bytes=sum(sizes), oldest=min((st.st_mtime for st in stats), default=None),
            newest=max((st.st_mtime for st in stats), default=None), corrupt=len(list(folder.glob(".corrupt-*")))))
    return out


def prune(root: Path, encoder: str | None = None, older_than_seconds: float | None = None) -> tuple[int, int]:
    """Remove one encoder's vectors (by fingerprint, model name or model_path), or shards older
    than the given age, or both; returns (shards removed, bytes freed). Folders and identities
    stay, so an embed running meanwhile keeps storing under its encoder."""
    if encoder is None and older_than_seconds is None:
        raise DeftError("spec_invalid", "prune needs what to remove", field="encoder",
                        fix="give encoder (a fingerprint or model name from store info) and/or older_than")
    removed = freed = 0
    cutoff = None if older_than_seconds is None else time.time() - older_than_seconds
    for info in describe(root):
        if encoder is not None and encoder not in (info.fingerprint, info.model, info.model_path):
            continue
        for path in [*_shards(root / info.fingerprint), *(root / info.fingerprint).glob(".corrupt-*")]:
            stat = _stat(path)
            if stat is not None and (cutoff is None or stat.st_mtime < cutoff):
                try:
                    path.unlink()
                except FileNotFoundError:
                    continue
                freed += stat.st_size
                removed += 1
    return removed, freed
