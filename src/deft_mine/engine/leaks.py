"""The leakage guard: the pool rows that copy a protected image (identical bytes, or a vector within a threshold), found exactly before the search."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from deft_mine.engine import tables
from deft_mine.engine.images import file_digests, file_sizes, resolve_image_path
from deft_mine.engine.knn import search
from deft_mine.schemas.artifacts import LeakKind
from deft_mine.schemas.specs import Metric

TARGETS = "targets"  # the protected_listing of a target (the targets are always protected)


@dataclass
class Protected:
    """The protected images, targets first: each as its listing wrote it, where it resolves, which
    listing named it, and (with a leak threshold) its vector; `is_target`: a target's row."""

    filepaths: list[str]
    resolved: list[Path]
    origins: list[str]
    vectors: np.ndarray | None = None

    @property
    def is_target(self) -> np.ndarray:
        return np.array([origin == TARGETS for origin in self.origins], bool)


@dataclass
class Pool:
    """The searched pool as the guard reads it: its rows' filepaths (as written), where they resolve,
    and which rows name a target file (those stay exclude_targets' business, never a leak of it)."""

    filepaths: list[str]
    resolved: list[Path]
    names_target: np.ndarray


@dataclass
class Found:
    """The leaks (leaks.parquet's rows, in pool order) and each pool row's nearest protected score
    (NaN: none compared; None: no threshold, no vectors compared)."""

    table: pa.Table
    nearest: np.ndarray | None


def kind_counts(table: pa.Table) -> dict[str, int]:
    """A leaks table's rows by kind (every kind named, 0 where none)."""
    kinds = table.column("kind").to_pylist()
    return {kind.value: kinds.count(kind.value) for kind in LeakKind}


def score_column(metric: Metric) -> str:
    """leaks.parquet's score column: a similarity under cosine, a distance otherwise."""
    return "similarity" if metric.higher_is_nearer else "distance"


class ProtectedBytes:
    """The protected files' sizes, and the digests of those a pool file's size matches (hashed once,
    when first needed): identical bytes have the same size, so most files are never hashed."""

    def __init__(self, protected: Protected) -> None:
        self.protected = protected
        self.sizes = file_sizes(protected.resolved)
        self.first: dict[tuple[bytes, bool], int] = {}  # (digest, a target's) -> its first protected row
        self.hashed = np.zeros(len(self.sizes), bool)

    def copies(self, pool: Pool) -> np.ndarray:
        """Per pool row, the first protected image whose bytes it repeats (-1: none); a pool row that
        names a target file is compared with the protect listings only."""
        found = np.full(len(pool.filepaths), -1, np.int64)
        pool_sizes = file_sizes(pool.resolved)
        shared = np.intersect1d(self.sizes[self.sizes >= 0], pool_sizes[pool_sizes >= 0])
        if not len(shared):
            return found
        fresh = np.flatnonzero(np.isin(self.sizes, shared) & ~self.hashed)
        self.hashed[fresh] = True
        for row, key in zip(fresh.tolist(), file_digests([self.protected.resolved[i] for i in fresh])):
            if key is not None:
                entry = (key, self.protected.origins[row] == TARGETS)
                self.first[entry] = min(row, self.first.get(entry, row))
        rows = np.flatnonzero(np.isin(pool_sizes, shared))
        for row, key in zip(rows.tolist(), file_digests([pool.resolved[i] for i in rows])):
            if key is None:
                continue
            # the targets come first among the protected: a target's copy names the target
            mine = [self.first.get((key, False))] + ([] if pool.names_target[row] else [self.first.get((key, True))])
            hits = [i for i in mine if i is not None]
            if hits:
                found[row] = min(hits)
        return found


def identical_bytes(pool: Pool, protected: Protected) -> np.ndarray:
    """Per pool row, the first protected image whose bytes it repeats (-1: none)."""
    return ProtectedBytes(protected).copies(pool)


def nearest_protected(blocks: Iterable[np.ndarray], protected: Protected, names_target: np.ndarray,
                      metric: Metric) -> tuple[np.ndarray, np.ndarray]:
    """Per pool row (its vectors given block by block, in pool order), its nearest protected image
    and their exact float64 score (ties to the lower protected row; -1 and NaN: none to compare). A
    pool row that names a target file is compared with the protect listings' images only."""
    assert protected.vectors is not None
    listed = np.flatnonzero(~protected.is_target)
    rows_out, scores_out, start = [], [], 0
    for block in blocks:
        best = search(block, [protected.vectors], 1, metric)
        rows, scores = best.indices[:, 0].copy(), best.scores[:, 0].copy()
        own = np.flatnonzero(names_target[start:start + len(block)])
        if len(own):
            rows[own], scores[own] = -1, np.nan
            if len(listed):
                again = search(block[own], [protected.vectors[listed]], 1, metric)
                rows[own], scores[own] = listed[again.indices[:, 0]], again.scores[:, 0]
        rows_out.append(rows)
        scores_out.append(scores)
        start += len(block)
    if not rows_out:
        return np.zeros(0, np.int64), np.zeros(0, np.float64)
    return np.concatenate(rows_out), np.concatenate(scores_out)


def find_leaks(pool: Pool, protected: Protected, metric: Metric, threshold: float | None,
               blocks: Iterable[np.ndarray] = ()) -> Found:
    """The leaks, in pool order: identical bytes first (always), then, with a threshold, the rows
    whose nearest protected vector reaches it (a similarity at least it, or a distance at most it)."""
    twin = identical_bytes(pool, protected)
    nearest = scores = None
    if threshold is not None:
        nearest, scores = nearest_protected(blocks, protected, pool.names_target, metric)
    rows = np.arange(len(pool.filepaths))
    return Found(leak_table(rows, pool.filepaths, twin, nearest, scores, protected, metric, threshold), scores)


def reaches(scores: np.ndarray, metric: Metric, threshold: float) -> np.ndarray:
    """Which scores reach the threshold (a similarity at least it, a distance at most it; NaN never)."""
    with np.errstate(invalid="ignore"):
        reach = (scores >= threshold) if metric.higher_is_nearer else (scores <= threshold)
    return reach & np.isfinite(scores)


def leak_table(rows: np.ndarray, filepaths: list[str], twin: np.ndarray, nearest: np.ndarray | None,
               scores: np.ndarray | None, protected: Protected, metric: Metric, threshold: float | None) -> pa.Table:
    """leaks.parquet's rows among the judged pool rows (`rows`, their `filepaths` and verdicts, in
    pool order): a byte copy first (kind identical_bytes), else a nearest protected score reaching
    the threshold (kind similar)."""
    similar = np.zeros(len(rows), bool)
    if threshold is not None and nearest is not None and scores is not None:
        similar = (twin < 0) & (nearest >= 0) & reaches(scores, metric, threshold)
    hit = np.flatnonzero((twin >= 0) | similar)
    which = np.where(twin[hit] >= 0, twin[hit], nearest[hit] if nearest is not None else -1)
    copy = twin[hit] >= 0
    return pa.table({
        "filepath": pa.array([filepaths[i] for i in hit.tolist()], pa.string()),
        "source_row": pa.array(rows[hit], pa.int64()),
        "protected_filepath": pa.array([protected.filepaths[i] for i in which.tolist()], pa.string()),
        "protected_listing": pa.array([protected.origins[i] for i in which.tolist()], pa.string()),
        "kind": pa.array([LeakKind.identical_bytes.value if c else LeakKind.similar.value for c in copy.tolist()],
                         pa.string()),
        score_column(metric): pa.array([None if c or scores is None else float(scores[i])
                                        for c, i in zip(copy.tolist(), hit.tolist())], pa.float64()),
    })


def pool_of(filepaths: list[str], images_root: Path, target_paths: Iterable[str]) -> Pool:
    """The pool rows as the guard reads them; a row names a target when their paths are equal on
    paper (as mining judges a target in the pool)."""
    targets = {os.path.normpath(p) for p in target_paths}
    return Pool(filepaths, [resolve_image_path(p, images_root) for p in filepaths],
                np.array([os.path.normpath(p) in targets for p in filepaths], bool))


def leak_mask(pool_paths: pa.StringArray, leaks_parquet: Path) -> np.ndarray:
    """Which pool rows (their lexically normal filepaths) a leaks parquet lists: what the search leaves out."""
    listed = tables.read_columns(leaks_parquet, ["filepath"]).column("filepath").combine_chunks()
    normal = pa.array(sorted({os.path.normpath(str(p)) for p in listed.to_pylist() if p is not None}), pa.string())
    return pc.is_in(pool_paths, value_set=normal).to_numpy(zero_copy_only=False)


def histogram(scores: np.ndarray, metric: Metric, threshold: float | None = None,
              bins: int = 20) -> dict[str, list[float]]:
    """The distribution of the pool rows' nearest protected scores (what helps choose the threshold):
    bins over the scores' own range, widened to hold the threshold (so its line falls inside), and
    capped to cosine's [-1, 1]; the edges and the counts."""
    scores = scores[np.isfinite(scores)]
    bounds = ([float(scores.min()), float(scores.max())] if len(scores) else []) + \
        ([] if threshold is None else [float(threshold)])
    lo, hi = (min(bounds), max(bounds)) if bounds else (0.0, 1.0)
    if hi - lo < 1e-9:  # one value: a bin around it
        lo, hi = lo - 0.05, hi + 0.05
    if metric.higher_is_nearer:
        lo, hi = max(lo, -1.0), min(hi, 1.0)
    else:
        lo = max(lo, 0.0)
    counts, edges = np.histogram(np.clip(scores, lo, hi), bins=bins, range=(lo, hi))
    return {"edges": [round(float(e), 6) for e in edges], "counts": [int(c) for c in counts]}
