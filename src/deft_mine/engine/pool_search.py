"""Unique matching's pool search: each query's exact top-k among the free rows of a pool held in
parquet parts (the passes' only pool-sized work; a distributor searches parts apart and merges)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np

from deft_mine.engine import tables
from deft_mine.engine.knn import RunningTopK, TopKState, l2_normalise
from deft_mine.engine.mining import row_range
from deft_mine.errors import DeftError
from deft_mine.schemas.specs import UniqueMatchingSpec


@dataclass(frozen=True)
class PoolPart:
    """Rows [start, end) of one pool file; `first_row` is the pool row number of its row `start`."""

    file: Path
    start: int
    end: int
    first_row: int

    @property
    def rows(self) -> int:
        return self.end - self.start


class PoolSearch(Protocol):
    """The passes' only pool-sized work: each query's exact top-k among the `free` pool rows (a mask
    over every pool row) as exact keys and pool rows, ties to the lower row. The default searches
    here (`search_pool`); a distributor may search parts of the pool apart and merge them by
    (key, row), which is the same answer."""

    def __call__(self, spec: UniqueMatchingSpec, files: list[Path], queries: np.ndarray, free: np.ndarray,
                 k: int) -> TopKState: ...


def pool_parts(files: list[Path]) -> list[PoolPart]:
    """The pool's files, each one whole part, numbered on in file order."""
    parts, seen = [], 0
    for file in files:
        rows = tables.num_rows(file)
        parts.append(PoolPart(file, 0, rows, seen))
        seen += rows
    return parts


def search_pool(spec: UniqueMatchingSpec, files: list[Path], queries: np.ndarray, free: np.ndarray,
                k: int) -> TopKState:
    """The in-process search: the whole pool, file by file."""
    return search_parts(spec, pool_parts(files), queries, free, k)


def search_parts(spec: UniqueMatchingSpec, parts: list[PoolPart], queries: np.ndarray, free: np.ndarray,
                 k: int) -> TopKState:
    """Exact top-k of the `queries` (L2-normalised) over the free rows of consecutive pool `parts`;
    `free` marks the parts' rows, its first entry the first part's first row."""
    base = parts[0].first_row if parts else 0
    # One search for all queries: FAISS answers a block for many queries at once far faster than
    # in groups, and knn gathers the pairs it rescores a slice at a time.
    top = RunningTopK(queries, k, spec.distance_metric)
    for ids, block in _part_blocks(spec, parts, queries.shape[1]):
        keep = free[ids - base]
        if keep.any():
            top.add(*((block, ids) if keep.all() else (block[keep], ids[keep])))
    return top.state


def _part_blocks(spec: UniqueMatchingSpec, parts: list[PoolPart], dim: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The parts' vectors in blocks of block_rows (a part cut at block_rows multiples of its file
    reads the blocks the whole file's search would), L2-normalised, with their pool rows."""
    column = spec.source_embedding_column
    for part in parts:
        seen = part.first_row
        whole = part.start == 0 and part.end == tables.num_rows(part.file)
        batches = tables.iter_batches(part.file, spec.block_rows, [column]) if whole else \
            row_range(part.file, column, part.start, part.end, spec.block_rows)
        for batch in batches:
            vectors = tables.vectors_from_column(batch.column(column), path=part.file, name=column, first_row=seen,
                                                 dim=None, field="source_path")
            if vectors.shape[1] != dim:
                raise DeftError("dimension_mismatch", f"source_path {part.file} column '{column}' holds "
                                f"{vectors.shape[1]}-d vectors but the targets hold {dim}-d ones",
                                fix="embed both sides with the same encoder", field="source_path",
                                source_dim=int(vectors.shape[1]), target_dim=dim)
            yield np.arange(seen, seen + len(vectors), dtype=np.int64), l2_normalise(vectors)
            seen += len(vectors)
