"""The leakage guard inside the search (leak_scope=mined): the candidates' vectors kept as the pool streams
past, each judged once, and the targets a leak left short of topn searched again without the leaks."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from deft_mine.engine import tables
from deft_mine.engine.images import resolve_image_path
from deft_mine.engine.knn import TopKState
from deft_mine.engine.leaks import TARGETS, Pool, Protected, ProtectedBytes, leak_table, nearest_protected, reaches
from deft_mine.schemas.specs import Metric

SAMPLE_ROWS = 4096  # pool rows whose nearest protected score draws the report's histogram
KEEP_BYTES = 1 << 30  # candidate vectors kept while streaming beyond this are read back from the file instead


@dataclass
class LeakOutcome:
    """The guard inside the search: leaks.parquet's table (the leaks among the rows it judged), how many
    rows it judged, and the nearest protected score of a fixed sample of pool rows (the histogram's)."""

    table: pa.Table
    judged: int
    sample_scores: np.ndarray
    pool: int  # pool rows the search could take (not left out before it, nor all-zero under cosine)
    protected: int  # protected images: the targets, and the protect listings'
    listings: list[str]  # the protect listings (by the path run recorded)
    asked: bool  # a threshold or a protect listing (else only the targets' byte copies are looked for)

    @property
    def reported(self) -> bool:
        """Whether a result names it (and leaks.parquet is written): asked for, or it found a leak."""
        return self.asked or self.table.num_rows > 0


def slack(k: int) -> int:
    """Candidates asked of the search beyond k when the guard judges them: room for a dozen or more
    leaks per target (a component re-captured again and again) before the pool must be searched
    again. Only the first k clean ones are ever judged; the room costs a wider running top-k (more
    candidates rescored in float64), which is why it is not wider still."""
    return max(16, min(k, 256))


def _members(rows: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """Which of `rows` are in `sorted_set` (ascending, unique): a binary search, no sort of either."""
    if not len(sorted_set):
        return np.zeros(len(rows), bool)
    at = np.minimum(np.searchsorted(sorted_set, rows), len(sorted_set) - 1)
    return sorted_set[at] == rows


@dataclass
class _Chunk:
    """One block's rows that entered the running top-k, their vectors, and which are in it still."""

    rows: np.ndarray
    vectors: np.ndarray
    alive: np.ndarray


@dataclass
class Kept:
    """Pool rows' vectors kept as the search streamed past: the rows in any query's running top-k
    (until they leave it) and a fixed sample of rows (the histogram's). Each block's entrants stay in a
    chunk of their own, compacted once half of it has left the top-k, so no block copies what came before."""

    sample: np.ndarray  # the sample's pool rows, ascending
    chunks: list[_Chunk] = field(default_factory=list)
    sample_rows: list[np.ndarray] = field(default_factory=list)
    sample_vectors: list[np.ndarray] = field(default_factory=list)
    overflow: bool = False  # the candidates outgrew KEEP_BYTES: read them back instead

    def update(self, state_ids: np.ndarray, block: np.ndarray, ids: np.ndarray) -> None:
        """After a block went into the running top-k (`state_ids`): keep the block's rows that entered
        it, forget the kept rows it pushed out, and keep the block's sample rows."""
        at = _members(ids, self.sample)
        if at.any():
            self.sample_rows.append(ids[at])
            self.sample_vectors.append(np.ascontiguousarray(block[at], np.float32))  # a fancy index: a copy already
        if self.overflow:
            return
        current = np.unique(state_ids[state_ids >= 0])
        for chunk in self.chunks:
            chunk.alive = _members(chunk.rows, current)
            if 2 * chunk.alive.sum() < len(chunk.rows):
                chunk.rows, chunk.vectors = chunk.rows[chunk.alive], chunk.vectors[chunk.alive]
                chunk.alive = np.ones(len(chunk.rows), bool)
        self.chunks = [chunk for chunk in self.chunks if len(chunk.rows)]
        new = _members(ids, current)
        if new.any():
            self.chunks.append(_Chunk(ids[new], np.ascontiguousarray(block[new], np.float32),
                                      np.ones(int(new.sum()), bool)))
        if sum(chunk.vectors.nbytes for chunk in self.chunks) > KEEP_BYTES:
            self.overflow, self.chunks = True, []

    def merged(self, other: Kept | None) -> Kept:
        """Two searches' kept rows as one (shards of one pool, or a search again of some queries); past
        KEEP_BYTES together, read back from the file instead."""
        if other is None:
            return self
        chunks = self.chunks + other.chunks
        overflow = self.overflow or other.overflow or sum(c.vectors.nbytes for c in chunks) > KEEP_BYTES
        return Kept(self.sample, [] if overflow else chunks, self.sample_rows + other.sample_rows,
                    self.sample_vectors + other.sample_vectors, overflow)

    def vectors_of(self, rows: np.ndarray, read_back: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """The vectors of these pool rows: those the search kept from it, the rest (all of them when it
        could not keep them) read back from the file."""
        if self.overflow or not self.chunks:
            return read_back(rows)
        kept = np.concatenate([chunk.rows for chunk in self.chunks])
        order = np.argsort(kept, kind="stable")
        at = order[np.minimum(np.searchsorted(kept[order], rows), len(kept) - 1)]
        found = kept[at] == rows
        # a row is found in the chunk that holds it (alive or not: its vector is the same either way)
        starts = np.cumsum([0] + [len(chunk.rows) for chunk in self.chunks])
        which = np.searchsorted(starts, at, side="right") - 1
        out = np.empty((len(rows), self.chunks[0].vectors.shape[1]), np.float32)
        for c, chunk in enumerate(self.chunks):
            mine = found & (which == c)
            out[mine] = chunk.vectors[at[mine] - starts[c]]
        if not found.all():  # e.g. another row of a candidate's file, never a candidate itself
            out[~found] = read_back(rows[~found])
        return out

    def sample_of(self) -> np.ndarray:
        """The kept sample rows' vectors (those the search saw: not left out)."""
        if not self.sample_vectors:
            return np.zeros((0, 0), np.float32)
        return np.concatenate(self.sample_vectors)


def sample_rows(total: int) -> np.ndarray:
    """The histogram's pool rows: a fixed (seeded) uniform sample, so a run repeats exactly."""
    if total <= SAMPLE_ROWS:
        return np.arange(total, dtype=np.int64)
    return np.sort(np.random.default_rng(0).choice(total, SAMPLE_ROWS, replace=False)).astype(np.int64)


class Guard:
    """The leak rule for pool rows as the search reaches them: the protected images (the targets, and
    the protect listings' images), each pool row judged once; what it found, in pool order."""

    def __init__(self, protected: Protected, metric: Metric, threshold: float | None, pool_root: Path,
                 pool_paths: pa.StringArray) -> None:
        self.protected, self.metric, self.threshold = protected, metric, threshold
        self.pool_root, self.pool_paths = pool_root, pool_paths  # lexically normal, read whole by the search
        self.bytes = ProtectedBytes(protected)
        targets = {os.path.normpath(p) for p, o in zip(protected.filepaths, protected.origins) if o == TARGETS}
        self.names_target = pc.is_in(pool_paths, value_set=pa.array(sorted(targets), pa.string())).to_numpy(
            zero_copy_only=False)
        # rows naming one file share its verdict (as leaks_parquet leaves out every row of a listed path)
        encoded = pool_paths.dictionary_encode()
        self.files = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        self.repeats = len(encoded.dictionary) < len(pool_paths)  # some file on more than one row
        self.leak = np.zeros(len(pool_paths), bool)
        self.judged = np.zeros(len(pool_paths), bool)
        self._parts: list[tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]] = []

    def judge(self, rows: np.ndarray, vectors: np.ndarray | None) -> None:
        """Judge pool rows not judged before (their vectors, given when a threshold is set)."""
        fresh = ~self.judged[rows]
        rows = rows[fresh]
        if not len(rows):
            return
        paths = self.paths_of(rows)
        pool = Pool(paths, [resolve_image_path(p, self.pool_root) for p in paths], self.names_target[rows])
        twin = self.bytes.copies(pool)
        nearest = scores = None
        if self.threshold is not None and vectors is not None:
            nearest, scores = nearest_protected([vectors[fresh]], self.protected, pool.names_target, self.metric)
            self.leak[rows[(nearest >= 0) & reaches(scores, self.metric, self.threshold)]] = True
        self.leak[rows[twin >= 0]] = True
        self.judged[rows] = True
        self._parts.append((rows, twin, nearest, scores))
        if self.repeats and self.leak[rows].any():  # every row of a leaking file is out
            self.leak |= np.isin(self.files, self.files[rows[self.leak[rows]]])

    def with_siblings(self, rows: np.ndarray) -> np.ndarray:
        """These pool rows and every other row naming the same file (judged together: a file leaks
        when any of its rows does)."""
        if not self.repeats or not len(rows):
            return rows
        return np.flatnonzero(np.isin(self.files, self.files[rows]))

    def paths_of(self, rows: np.ndarray) -> list[str]:
        """These pool rows' (lexically normal) filepaths."""
        return [str(p) for p in self.pool_paths.take(pa.array(rows, pa.int64())).to_pylist()]

    def outcome(self, kept: Kept, pool: int) -> LeakOutcome:
        """What the guard judged and found, the histogram's sample scored (with a threshold)."""
        rows = np.concatenate(kept.sample_rows) if kept.sample_rows else np.zeros(0, np.int64)
        listings = list(dict.fromkeys(o for o in self.protected.origins if o != TARGETS))
        return LeakOutcome(self.table(), int(self.judged.sum()), self.nearest_scores(rows, kept.sample_of()), pool,
                           len(self.protected.origins), listings, self.threshold is not None or bool(listings))

    def nearest_scores(self, rows: np.ndarray, vectors: np.ndarray) -> np.ndarray:
        """The nearest protected score of each of these pool rows (the histogram's), leaks or not."""
        if self.threshold is None or not len(rows):
            return np.zeros(0, np.float64)
        return nearest_protected([vectors], self.protected, self.names_target[rows], self.metric)[1]

    def table(self) -> pa.Table:
        """leaks.parquet: the leaks among the judged rows, in pool order."""
        parts = self._parts or [(np.zeros(0, np.int64), np.zeros(0, np.int64), None, None)]
        rows = np.concatenate([p[0] for p in parts])
        twin = np.concatenate([p[1] for p in parts])
        with_vectors = self.threshold is not None and all(p[2] is not None for p in parts) and self._parts
        nearest = np.concatenate([p[2] for p in parts]) if with_vectors else None
        scores = np.concatenate([p[3] for p in parts]) if with_vectors else None
        order = np.argsort(rows, kind="stable")
        pick = (lambda a: None if a is None else a[order])
        return leak_table(rows[order], self.paths_of(rows[order]), twin[order],
                          pick(nearest), pick(scores), self.protected, self.metric, self.threshold)


def first_k(state: TopKState, leak: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per query, which of its entries are the first k that are no leak (in rank order), and how
    many entries it has that are no leak."""
    ids = state.ids
    ok = (ids >= 0) & ~leak[np.maximum(ids, 0)]
    return ok & (np.cumsum(ok, axis=1) <= k), ok.sum(axis=1)


def trimmed(state: TopKState, leak: np.ndarray, k: int) -> TopKState:
    """Each query's first k entries that are no leak, k wide (empty slots: row -1, key inf)."""
    take, _ = first_k(state, leak, k)
    keys = np.full((len(state.ids), k), np.inf)
    ids = np.full((len(state.ids), k), -1, np.int64)
    slot = np.cumsum(take, axis=1) - 1
    q, c = np.nonzero(take)
    keys[q, slot[q, c]], ids[q, slot[q, c]] = state.keys[q, c], state.ids[q, c]
    return TopKState(keys, ids)


def write_protected(protected: Protected, path: Path) -> None:
    """The protected images as the search reads them: where each resolves, as its listing wrote it,
    which listing (targets first), and its vector when a threshold is set."""
    columns = {"filepath": pa.array([str(p) for p in protected.resolved], pa.string()),
               "protected_filepath": pa.array(protected.filepaths, pa.string()),
               "protected_listing": pa.array(protected.origins, pa.string())}
    if protected.vectors is not None:
        columns["embedding"] = tables.vector_array(protected.vectors)
    tables.write_table_atomic(path, pa.table(columns))


def read_protected(path: Path, with_vectors: bool) -> Protected:
    """The protected images a run wrote (protected.parquet: the targets first, then the protect listings')."""
    columns = ["filepath", "protected_filepath", "protected_listing"] + (["embedding"] if with_vectors else [])
    table = tables.read_columns(tables.require_file(path, "protected_parquet"), columns)
    protected = Protected(table.column("protected_filepath").to_pylist(),
                          [Path(p) for p in table.column("filepath").to_pylist()],
                          table.column("protected_listing").to_pylist())
    if with_vectors:
        protected.vectors = tables.vectors_from_column(table.column("embedding"), path=path, name="embedding",
                                                       first_row=0, dim=None, field="protected_parquet")
    return protected


def settle(state: TopKState, kept: Kept, guard: Guard, k: int, read_back: Callable[[np.ndarray], np.ndarray]) -> None:
    """Judge, in rounds, each query's first k entries that are no known leak, until they are all judged
    (a leak found pulls the next entry in): the rows the answer would take are then all clean."""
    while True:
        take, _ = first_k(state, guard.leak, k)
        need = guard.with_siblings(np.unique(state.ids[take]))
        need = need[~guard.judged[need]]
        if not len(need):
            return
        guard.judge(need, kept.vectors_of(need, read_back) if guard.threshold is not None else None)


def exclude_leaks(state: TopKState, kept: Kept, guard: Guard, k: int, read_back: Callable[[np.ndarray], np.ndarray],
                  research: Callable[[np.ndarray, np.ndarray], tuple[TopKState, Kept | None]],
                  judge_all: Callable[[], None]) -> tuple[TopKState, Kept]:
    """The search's candidates (k + slack per query) with the leaks taken out, k per query: exactly
    the top-k of the pool without its leaks. A query whose list ran out of clean entries is searched
    again without the leaks found; if that too runs out, the whole pool is judged and it is searched
    once more, which cannot run out (so at most two more passes, for the queries that need them)."""
    for attempt in range(3):
        settle(state, kept, guard, k, read_back)
        _, clean = first_k(state, guard.leak, k)
        full = state.ids[:, -1] >= 0 if state.ids.shape[1] else np.zeros(len(state.ids), bool)
        short = np.flatnonzero((clean < k) & full)  # a full list: more rows may follow
        if not len(short) or attempt == 2:
            break
        if attempt == 1:
            judge_all()
        again, more = research(short, guard.leak)
        keys, ids = state.keys.copy(), state.ids.copy()
        width = again.keys.shape[1]  # fewer rows left than the search's width: the rest stay empty
        keys[short], ids[short] = np.inf, -1
        keys[short, :width], ids[short, :width] = again.keys, again.ids
        state, kept = TopKState(keys, ids), kept.merged(more)  # (no vectors kept without a threshold)
    return trimmed(state, guard.leak, k), kept
