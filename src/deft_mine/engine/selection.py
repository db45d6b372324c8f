"""Mining modes: how many candidates a query asks the k-NN for, and which kept pairs are mined."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from deft_mine.schemas.specs import Metric, MiningSpec


@dataclass
class Candidates:
    """The k-NN's pairs read back: each query's best pool rows in rank order (row -1: an empty
    slot of a per-label search, no pair), their scores, and the rows' filepaths and label keys."""

    target_paths: list[Any]  # each query's filepath, in target order
    rows: np.ndarray  # (queries, k) pool rows
    scores: np.ndarray  # (queries, k) in the metric's own scale
    paths: np.ndarray  # (queries, k) object: the rows' filepaths, None in empty slots
    source_labels: np.ndarray | None  # (queries, k) object: label keys, when the pool has labels
    target_labels: np.ndarray | None  # (queries, 1) object: label keys, when the targets have labels

    @property
    def found(self) -> np.ndarray:
        return self.rows >= 0


class Mode(Protocol):
    """A mining mode: its candidate count per query, and its selection stage over the kept pairs."""

    candidates: int

    def select(self, found: Candidates, keep: np.ndarray) -> pa.Table:
        """The mined table (filepath first) from the pairs `keep` marks."""


@dataclass(frozen=True)
class NearestNeighbours:
    """`tmm nearest_neighbors`, the container's: each target's topn; the kept pairs' pool files,
    each once, in order of first appearance (target order, then rank)."""

    candidates: int
    metric: Metric

    def select(self, found: Candidates, keep: np.ndarray) -> pa.Table:
        """Each mined path with the best score any target gave it, which target that was (the
        first on a tie), and how many kept pairs hit it."""
        t, r = np.nonzero(keep)  # the kept pairs in target, then rank order
        files = pa.array(found.paths[t, r].tolist(), pa.string()).dictionary_encode()  # numbered as first seen
        codes, scores = files.indices.to_numpy(zero_copy_only=False), found.scores[t, r].astype(np.float64)
        # Each file's pairs nearest first, ties in pair order (lexsort is stable): its first is its best.
        order = np.lexsort((-scores if self.metric.higher_is_nearer else scores, codes))
        best = order[np.unique(codes[order], return_index=True)[1]]
        return pa.table({
            "filepath": files.dictionary,
            "score": pa.array(scores[best], pa.float64()),
            "best_target": pa.array([str(found.target_paths[i]) for i in t[best]], pa.string()),
            "hits": pa.array(np.bincount(codes, minlength=len(files.dictionary)), pa.int32()),
        })


@dataclass
class Claimed:
    """One pass of the one-to-one assignment: the targets that filled their share, each with its
    picks (pool rows, nearest first), and the targets that could not (to retry, wider)."""

    picks: list[tuple[int, list[int]]]  # (query, [its (query, rank) candidate slots])
    failed: list[int]  # queries that released their tentative picks
    found: list[int]  # ...how many files each of them could take (fewer than the share)


def claim_one_to_one(rows: np.ndarray, files: np.ndarray, share: int,
                     near: dict[int, set[int]] | None = None) -> Claimed:
    """The container's assignment over each query's candidates in rank order (`rows` (queries, k),
    -1 an empty or filtered-out slot; `files` each pool row's file number): queries in order, each takes its
    `share` nearest files no earlier query of this pass holds (a file listed twice counts once);
    one that finds fewer takes none, so its tentative picks stay free for the queries after it.
    `near` (the near-duplicate rule, ours): each file's near duplicates among the candidates; a file
    one of which an earlier query holds, or this query picked before it, is not taken either."""
    held: set[int] = set()
    claimed = Claimed(picks=[], failed=[], found=[])
    # Each slot's file as plain ints up front: indexing numpy per slot would dominate the loop.
    slot_files = np.where(rows >= 0, np.asarray(files)[np.maximum(rows, 0)], -1).tolist() if rows.size else \
        [[] for _ in range(rows.shape[0])]
    for query, ranked in enumerate(slot_files):
        slots: list[int] = []
        mine: set[int] = set()
        for rank, file in enumerate(ranked):
            if len(slots) >= share:
                break
            if file >= 0 and file not in held and file not in mine and (
                    near is None or not (twins := near.get(file)) or (twins.isdisjoint(held) and twins.isdisjoint(mine))):
                slots.append(rank)
                mine.add(file)
        if len(slots) < share:
            claimed.failed.append(query)
            claimed.found.append(len(slots))
            continue
        held |= mine
        claimed.picks.append((query, slots))
    return claimed


def nearest_first(distances: np.ndarray, paths: list[str], room: int) -> np.ndarray:
    """Which picks a pass keeps when the budget has `room` left: the nearest, then by filepath
    (the container's cap); positions into the picks, in that order."""
    order = sorted(range(len(paths)), key=lambda i: (float(distances[i]), paths[i]))
    return np.asarray(order[:max(room, 0)], dtype=np.int64)


def mode_of(spec: MiningSpec) -> Mode:
    """The spec's mining mode (a new mode is a selection stage here, picked by its spec key)."""
    return NearestNeighbours(candidates=spec.topn, metric=spec.knn_metric)
