"""The floor stage's records and its best-target rule: each raw candidate's best target, exactly."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from deft_mine.engine.knn import l2_normalise
from deft_mine.schemas.specs import FloorRule

# Candidate rows scored against every target at a time: ~32 MiB of float64 similarities.
_CELLS = 1 << 22
# A BLAS product may differ from the pairwise sum in the last bits: every target this close to a
# row's best is rescored exactly before the best (and the first among equals) is chosen.
_SLACK = 1e-9


@dataclass
class FloorStage:
    """What the floor did, in the DEFT loop's terms. The raw candidates are the mode's selection
    over the pairs the label rule kept (the loop's mined_raw.parquet: unique images, before the
    floor); the floor kept `kept` of them (the rows of the mined table, before any history)."""

    rule: FloorRule
    threshold: float  # the floor as used: a cosine similarity, else the metric's distance
    raw: pa.Table
    kept: int
    # best_target: one row per raw candidate, in raw order: filepath, max_cosine_similarity,
    # matched_target_filepath, kept (the loop's audit rows); None under the pair rule.
    audit: pa.Table | None = None

    def kept_table(self, mined: pa.Table) -> pa.Table:
        """The mined table with the loop's two columns under best_target (the kept audit rows,
        which list the same images in the same order: raw's), unchanged under the pair rule."""
        if self.audit is None:
            return mined
        kept = self.audit.filter(self.audit.column("kept"))
        assert kept.column("filepath").equals(mined.column("filepath")), "the kept images are raw's, in raw's order"
        return mined.append_column("max_cosine_similarity", kept.column("max_cosine_similarity")).append_column(
            "matched_target_filepath", kept.column("matched_target_filepath"))

    def knn_summary(self) -> pa.Table:
        """knn_summary.csv's one row: candidate_count = kept_count + rejected_count."""
        candidates = self.raw.num_rows
        return pa.table({"candidate_count": [candidates], "kept_count": [self.kept],
                         "rejected_count": [candidates - self.kept],
                         "similarity_threshold": pa.array([self.threshold], pa.float64())})

    def cosine_filter_summary(self, output: Path) -> str:
        """cosine_filter_summary.json (best_target only): the loop's keys, then its audit rows."""
        assert self.audit is not None, "the pair rule writes no cosine filter summary"
        similarities = self.audit.column("max_cosine_similarity").to_numpy()
        described = {"similarity_min": float(similarities.min()), "similarity_max": float(similarities.max()),
                     "similarity_mean": float(similarities.mean())} if len(similarities) else \
            {"similarity_min": None, "similarity_max": None, "similarity_mean": None}
        summary: dict[str, Any] = {
            "metric": "cosine", "min_similarity": self.threshold, "input_rows": self.raw.num_rows,
            "kept_rows": self.kept, "dropped_rows": self.raw.num_rows - self.kept, **described,
            "output": str(output), "rows": self.audit.to_pylist()}
        return json.dumps(summary, indent=2) + "\n"


def best_matches(candidates: np.ndarray, targets: np.ndarray, candidate_groups: np.ndarray | None = None,
                 target_groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each candidate's best cosine similarity over the targets (with groups: over the targets of
    its own group only; a negative group matches nothing) and which target gave it: the first in
    target order on a tie, -1 (similarity -inf) when no target qualifies. Scored as the k-NN
    scores a pair — float32 unit vectors, their products summed in float64 — so a candidate's
    best is never below the score of a pair it is in."""
    units, goals = l2_normalise(candidates).astype(np.float64), l2_normalise(targets).astype(np.float64)
    best = np.full(len(units), -np.inf)
    index = np.full(len(units), -1, dtype=np.int64)
    step = max(1, _CELLS // max(1, len(goals)))
    for start in range(0, len(units), step):
        block = units[start:start + step]
        scores = block @ goals.T
        if candidate_groups is not None and target_groups is not None:
            mine = candidate_groups[start:start + step]
            scores[(mine[:, None] != target_groups[None, :]) | (mine[:, None] < 0)] = -np.inf
        best[start:start + step], index[start:start + step] = _exact_best(block, goals, scores)
    return best, index


def _exact_best(block: np.ndarray, goals: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the exact best among the targets near its approximate best, the first on a tie."""
    top = scores.max(axis=1, initial=-np.inf)
    rows, cols = np.nonzero(np.isfinite(scores) & (scores >= top[:, None] - _SLACK))
    exact = (block[rows] * goals[cols]).sum(axis=1)  # the k-NN's pair score, term for term
    order = np.lexsort((cols, -exact, rows))  # per row: best first, then the lower target
    first = order[np.unique(rows[order], return_index=True)[1]]
    best, index = np.full(len(block), -np.inf), np.full(len(block), -1, dtype=np.int64)
    best[rows[first]], index[rows[first]] = exact[first], cols[first]
    return best, index


def group_codes(target_keys: pa.Array, candidate_keys: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Label keys as numbers both sides share (the targets' distinct keys numbered); a null, or
    a candidate key no target has, is -1 (it matches no target)."""
    groups = pc.unique(target_keys.drop_null())

    def codes(keys: pa.Array) -> np.ndarray:
        return pc.index_in(keys, value_set=groups).fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    return codes(candidate_keys), codes(target_keys)
