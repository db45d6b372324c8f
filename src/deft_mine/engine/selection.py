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
        return dedupe(found.paths, found.scores, keep, found.target_paths, self.metric)


def mode_of(spec: MiningSpec) -> Mode:
    """The spec's mining mode (a new mode is a selection stage here, picked by its spec key)."""
    return NearestNeighbours(candidates=spec.topn, metric=spec.knn_metric)


def dedupe(paths: np.ndarray, scores: np.ndarray, keep: np.ndarray, target_paths: list[Any],
           metric: Metric) -> pa.Table:
    """Unique mined paths in order of first appearance (target order, then rank), with the
    best score any target gave each, which target that was, and how many kept pairs hit it."""
    order: dict[str, int] = {}
    best_score: list[float] = []
    best_target: list[str] = []
    hits: list[int] = []
    better = (lambda a, b: a > b) if metric.higher_is_nearer else (lambda a, b: a < b)
    for t, r in zip(*np.nonzero(keep)):
        path, score = paths[t, r], float(scores[t, r])
        slot = order.get(path)
        if slot is None:
            order[path] = len(best_score)
            best_score.append(score)
            best_target.append(target_paths[t])
            hits.append(1)
        else:
            hits[slot] += 1
            if better(score, best_score[slot]):
                best_score[slot], best_target[slot] = score, target_paths[t]
    return pa.table({
        "filepath": pa.array(list(order), pa.string()),
        "score": pa.array(best_score, pa.float64()),
        "best_target": pa.array([str(p) for p in best_target], pa.string()),
        "hits": pa.array(hits, pa.int32()),
    })
