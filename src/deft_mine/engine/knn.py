"""Exact k-nearest-neighbour search over a pool streamed in blocks, with a running top-k.

FAISS (BLAS, float32) proposes each block's candidates; we rescore them in float64, one pair
at a time, so a pair's score never depends on where it sat in a block, and apply the tie rule
(equal scores go to the lower pool row) on those exact scores. Candidates are widened until
the float32 error bound proves nothing outside them can beat or tie the k-th.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

from deft_mine.schemas.specs import Metric


# FAISS's metric names; faiss itself is imported where a search runs, so the tools that never
# search (select, report, store) do not pay for loading it.
_FAISS_METRIC = {Metric.cosine: "METRIC_INNER_PRODUCT", Metric.euclidean: "METRIC_L2", Metric.manhattan: "METRIC_L1"}


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    """Unit-length float32 rows; an all-zero row stays zero (its cosine to anything is 0)."""
    out = np.array(vectors, dtype=np.float32, order="C", copy=True)
    norms = np.sqrt(np.einsum("ij,ij->i", out, out))
    np.maximum(norms, np.finfo(np.float32).tiny, out=norms)
    out /= norms[:, None]
    return out


@dataclass
class Neighbours:
    """Per query, up to k pool rows nearest first; `scores` use the metric's own scale."""

    indices: np.ndarray  # (queries, k) int64, -1 where the pool had fewer than k rows
    scores: np.ndarray  # (queries, k) float64: cosine similarity, L2 or L1 distance


def _cosine_key(q: np.ndarray, x: np.ndarray) -> np.ndarray:
    q *= x
    return -q.sum(axis=1)


def _euclidean_key(q: np.ndarray, x: np.ndarray) -> np.ndarray:
    q -= x
    np.square(q, out=q)
    return q.sum(axis=1)


def _manhattan_key(q: np.ndarray, x: np.ndarray) -> np.ndarray:
    q -= x
    np.abs(q, out=q)
    return q.sum(axis=1)


# Each metric's exact float64 key of (query, vector) pairs row by row, and its score from a key. `q` is
# the queries' float64 copy, worked in place; `x` stays float32: each element is widened exactly as it
# is used, so the keys equal those of two float64 copies, without making the second one.
_PAIR_KEY = {Metric.cosine: _cosine_key, Metric.euclidean: _euclidean_key, Metric.manhattan: _manhattan_key}
SCORE_OF_KEY = {Metric.cosine: np.negative, Metric.euclidean: np.sqrt, Metric.manhattan: np.copy}
"""A metric's score (similarity or distance) from its float64 key (lower: nearer)."""

# Candidates asked of FAISS beyond k: enough that the error bound almost never forces a retry.
_EXTRA = 16
_RESCORE_BYTES = 64 << 20


@dataclass
class TopKState:
    """Per query, the k nearest pool rows found so far: exact float64 keys ("smaller is
    nearer": negated similarity for cosine, squared distance for euclidean) and pool rows.
    A search of one pool shard hands this back; shards merge in any order to the same answer."""

    keys: np.ndarray  # (queries, <= k) float64
    ids: np.ndarray  # (queries, <= k) int64, -1 for an empty slot

    @classmethod
    def empty(cls, queries: int) -> "TopKState":
        return cls(np.full((queries, 0), np.inf, dtype=np.float64), np.full((queries, 0), -1, dtype=np.int64))

    def merged(self, other: "TopKState", k: int) -> "TopKState":
        """The k nearest of both: ordered on (key, pool row), so ties go to the lower row
        whichever state came first."""
        keys = np.concatenate([self.keys, other.keys], axis=1)
        ids = np.concatenate([self.ids, other.ids], axis=1)
        order = np.lexsort((ids, keys), axis=1)[:, :k]
        return TopKState(np.take_along_axis(keys, order, axis=1), np.take_along_axis(ids, order, axis=1))

    def neighbours(self, metric: Metric) -> Neighbours:
        """The keys back on the metric's own scale."""
        return Neighbours(indices=self.ids, scores=SCORE_OF_KEY[metric](self.keys))


class RunningTopK:
    """Feed pool blocks in order with `add`; `result` gives the exact top-k over all of them
    (`state` is what a search of one part of the pool hands back, to merge with the others)."""

    def __init__(self, queries: np.ndarray, k: int, metric: Metric) -> None:
        if k < 1:
            raise ValueError("k must be at least 1")
        self.metric, self.k = metric, k
        self.queries = prepare(queries, metric)
        self.state = TopKState.empty(len(self.queries))
        self.seen = 0

    def add(self, block: np.ndarray, ids: np.ndarray | None = None) -> None:
        """Add the next pool rows; `ids` are their pool row numbers (default: the next ones),
        which must keep increasing from block to block for the tie rule to hold."""
        if ids is None:
            ids = np.arange(self.seen, self.seen + len(block), dtype=np.int64)
        block = prepare(block, self.metric)
        if len(block) and len(self.queries):
            # Rows already holding k neighbours only need block rows that could beat the k-th
            # (ties go to the earlier, lower row); that spares most of the rescoring.
            bound = self.state.keys[:, -1] if self.state.keys.shape[1] == self.k else None
            keys, local = _block_topk(self.queries, block, self.k, self.metric, bound)
            found = TopKState(keys, np.where(local >= 0, ids[np.maximum(local, 0)], -1))
            self.state = self.state.merged(found, self.k)
        self.seen += len(block)

    def result(self) -> Neighbours:
        return self.state.neighbours(self.metric)


class GroupedTopK:
    """A running top-k per group (label_mode=per_label): each query is searched only among its own group's
    pool rows, one search per group and block, never one per query. Group -1 (a null label) finds nothing."""

    def __init__(self, queries: np.ndarray, query_groups: np.ndarray, k: int, metric: Metric) -> None:
        self.k, self.total = k, len(queries)
        groups = np.unique(query_groups[query_groups >= 0]).tolist()
        # group -> its query rows, in file order; and its search
        self.members = {group: np.flatnonzero(query_groups == group) for group in groups}
        self.tops = {group: RunningTopK(queries[rows], k, metric) for group, rows in self.members.items()}

    def add(self, block: np.ndarray, ids: np.ndarray, block_groups: np.ndarray) -> None:
        """Add pool rows (`ids` increasing, as for RunningTopK.add) with their groups: each group
        searches only its own rows. A stable sort keeps each group's rows in pool order."""
        order = np.argsort(block_groups, kind="stable")
        present, starts = np.unique(block_groups[order], return_index=True)
        ends = np.append(starts[1:], len(order))
        for group, lo, hi in zip(present.tolist(), starts.tolist(), ends.tolist()):
            if (top := self.tops.get(group)) is not None:
                rows = order[lo:hi]
                top.add(block[rows], ids[rows])

    @property
    def state(self) -> TopKState:
        """Every query's top-k in file order, k wide; slots a small group could not fill hold
        key inf and row -1 (as an unfilled slot of one block's search does)."""
        keys = np.full((self.total, self.k), np.inf, dtype=np.float64)
        ids = np.full((self.total, self.k), -1, dtype=np.int64)
        for group, rows in self.members.items():
            part = self.tops[group].state
            width = part.keys.shape[1]
            keys[rows, :width], ids[rows, :width] = part.keys, part.ids
        return TopKState(keys, ids)


def search(queries: np.ndarray, pool_blocks: Iterable[np.ndarray], k: int, metric: Metric) -> Neighbours:
    """Exact top-k of every query over the concatenation of `pool_blocks`."""
    top = RunningTopK(queries, k, metric)
    for block in pool_blocks:
        top.add(block)
    return top.result()


def prepare(vectors: np.ndarray, metric: Metric) -> np.ndarray:
    """Vectors as the search compares them: L2-normalised float32 under cosine, contiguous float32 otherwise."""
    return l2_normalise(vectors) if metric is Metric.cosine else np.ascontiguousarray(vectors, dtype=np.float32)


def _block_topk(queries: np.ndarray, block: np.ndarray, k: int, metric: Metric,
                bound: np.ndarray | None = None):
    """Exact top-k (float64 keys, ties to the lower row) of every query within one block. With
    `bound` (each query's current k-th key), only rows that could beat it are kept; the rest of
    a query's k slots hold key inf and row -1."""
    import faiss

    k = min(k, len(block))
    keys = np.full((len(queries), k), np.inf, dtype=np.float64)
    ids = np.full((len(queries), k), -1, dtype=np.int64)
    gamma, scale = 2.0 * block.shape[1] * float(np.finfo(np.float32).eps), _error_scale(queries, block, metric)
    rows = np.arange(len(queries))
    want = k + _EXTRA
    while len(rows):
        want = min(want, len(block))
        approx, cand = faiss.knn(queries[rows], block, want, metric=getattr(faiss, _FAISS_METRIC[metric]))
        approx = approx.astype(np.float64)
        if metric is Metric.cosine:
            approx = -approx
        # A generous bound on |float32 key − exact key| for FAISS's scores.
        eps = gamma * (np.abs(approx[:, -1]) if scale is None else scale[rows])
        # Rows FAISS scored above `limit` are provably worse than its k first candidates, or
        # than the k neighbours the query already has.
        limit = approx[:, k - 1] + 2.0 * eps
        if bound is not None:
            limit = np.minimum(limit, bound[rows] + eps)
        done = np.full(len(rows), want == len(block)) | (approx[:, -1] > limit)
        if done.any():
            near = approx[done] <= limit[done, None]
            width = max(int(near.sum(axis=1).max()), 1)
            near, cand_done = near[:, :width], cand[done, :width].astype(np.int64)
            exact = np.full(near.shape, np.inf)
            pair_rows, pair_cols = np.nonzero(near)
            exact[pair_rows, pair_cols] = exact_keys(queries, rows[done][pair_rows], block,
                                                     cand_done[pair_rows, pair_cols], metric)
            cand_done[~near] = -1
            order = np.lexsort((cand_done, exact), axis=1)[:, :k]
            width = order.shape[1]
            keys[rows[done], :width] = np.take_along_axis(exact, order, axis=1)
            ids[rows[done], :width] = np.take_along_axis(cand_done, order, axis=1)
        rows = rows[~done]
        want *= 4
    return keys, ids


def exact_keys(queries: np.ndarray, query_rows: np.ndarray, vectors: np.ndarray, vector_rows: np.ndarray,
               metric: Metric) -> np.ndarray:
    """Float64 key of each pair (queries[query_rows[i]], vectors[vector_rows[i]]), row by row,
    computed the same way for every pair so that equal vectors always get equal keys. The pairs
    are gathered a slice at a time: a wide top-k over many queries never copies them all at once."""
    out = np.empty(len(query_rows), dtype=np.float64)
    step = max(1, _RESCORE_BYTES // max(1, queries.shape[1] * 16))
    for start in range(0, len(query_rows), step):
        part = slice(start, start + step)
        out[part] = _PAIR_KEY[metric](queries[query_rows[part]].astype(np.float64), vectors[vector_rows[part]])
    return out


def _error_scale(queries: np.ndarray, block: np.ndarray, metric: Metric) -> np.ndarray | None:
    """Per query, what the float32 error of its keys against this block scales with: 1 under
    cosine (unit vectors: |q·x| <= 1), the squared norms' bound under euclidean; None under
    manhattan, where it is the largest key itself."""
    if metric is Metric.cosine:
        return np.ones(len(queries))
    if metric is Metric.euclidean:
        q_norm = np.sqrt(np.einsum("ij,ij->i", queries, queries, dtype=np.float64))
        x_norm = float(np.sqrt(np.einsum("ij,ij->i", block, block, dtype=np.float64).max()))
        return np.square(q_norm + x_norm)
    return None
