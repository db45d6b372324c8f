"""Choosing the encoder: a label-stratified sample, and the exact leave-one-out label agreement of
each encoder's cosine neighbours on it (engine/knn.py's exact search, ties to the lower row)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from deft_mine.engine.knn import search
from deft_mine.schemas.specs import Metric

QUANTILES = (5, 25, 50, 75, 95)


def stratified_sample(keys: Sequence[str | None], size: int, seed: int) -> np.ndarray:
    """Row indices (ascending) of a label-stratified sample of `size` labelled rows, every labelled
    row when there are no more. Each label first gets up to two rows (so it can be scored), the rest
    of the budget goes by the labels' shares (largest remainder, ties by label); within a label the
    rows come from a permutation drawn from `seed`, labels in sorted order: the same seed, the same sample."""
    groups: dict[str, list[int]] = {}
    for row, key in enumerate(keys):
        if key is not None:
            groups.setdefault(key, []).append(row)
    labelled = sum(len(rows) for rows in groups.values())
    if labelled <= size:
        return np.array(sorted(row for rows in groups.values() for row in rows), dtype=np.int64)
    names = sorted(groups)
    quota = {name: min(2, len(groups[name])) for name in names}
    if sum(quota.values()) > size:  # more labels than the budget can score: shares alone
        quota = dict.fromkeys(names, 0)
    left = size - sum(quota.values())
    spare = {name: len(groups[name]) - quota[name] for name in names}
    total_spare = sum(spare.values())
    exact = {name: left * spare[name] / total_spare for name in names}
    for name in names:
        quota[name] += int(math.floor(exact[name]))
    rest = size - sum(quota.values())
    for name in sorted(names, key=lambda n: (-(exact[n] - math.floor(exact[n])), n))[:rest]:
        quota[name] += 1
    rng = np.random.default_rng(seed)
    chosen = [np.asarray(groups[name])[rng.permutation(len(groups[name]))[:quota[name]]] for name in names]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def nearest(queries: np.ndarray, pool: np.ndarray, k: int, exclude_self: bool) -> tuple[np.ndarray, np.ndarray]:
    """Each query's k most cosine-similar pool rows (ids, similarities): engine/knn.py's exact
    search (float64 rescoring, ties to the lower pool row). `exclude_self`: the queries are the
    pool, and a row is never its own neighbour (k + 1 searched, the row itself taken out; where
    more than k identical rows hide it, the last)."""
    found = search(np.asarray(queries, np.float32), [np.asarray(pool, np.float32)], k + exclude_self, Metric.cosine)
    ids, sims = found.indices, found.scores
    if not exclude_self:
        return ids, sims
    own = ids == np.arange(len(ids))[:, None]
    drop = np.where(own.any(axis=1), own.argmax(axis=1), k)  # the row's own slot, else the last
    keep = np.ones(ids.shape, bool)
    keep[np.arange(len(ids)), drop] = False
    return ids[keep].reshape(len(ids), k), sims[keep].reshape(len(ids), k)


@dataclass
class Agreement:
    """One encoder's leave-one-out label agreement on the sample, k = 1 … k_max."""

    macro: np.ndarray  # (k_max,) mean over the scored labels of their mean per-image share
    macro_se: np.ndarray  # its binomial standard error
    per_label: dict[str, np.ndarray]  # each scored label's mean share
    images: dict[str, int]  # the images each scored label's agreement rests on
    same_similarities: np.ndarray  # the k_max neighbours' similarities where labels agree
    cross_similarities: np.ndarray  # ... and where they differ


def binomial_se(share: np.ndarray, n: int) -> np.ndarray:
    return np.sqrt(np.clip(share * (1.0 - share), 0.0, None) / max(n, 1))


def agreement(vectors: np.ndarray, keys: Sequence[str], k_max: int) -> Agreement:
    """For each sampled image whose label has two or more sampled images, the share of its k
    nearest OTHER sampled images carrying its label; averaged per label, then over the labels.
    The standard error treats each label's images as n independent trials (a binomial)."""
    labels = np.asarray(keys, dtype=object)
    ids, sims = nearest(vectors, vectors, k_max, exclude_self=True)
    hits = labels[ids] == labels[:, None]
    share = np.cumsum(hits, axis=1) / np.arange(1, k_max + 1)  # (n, k_max): share within the first k
    names, counts = np.unique(labels, return_counts=True)
    scored = [str(name) for name, count in zip(names, counts) if count >= 2]
    per_label, per_label_se, images = {}, {}, {}
    for name in scored:
        rows = labels == name
        per_label[name] = share[rows].mean(axis=0)
        per_label_se[name] = binomial_se(per_label[name], int(rows.sum()))
        images[name] = int(rows.sum())
    if scored:
        macro = np.mean([per_label[n] for n in scored], axis=0)
        macro_se = np.sqrt(np.sum([per_label_se[n] ** 2 for n in scored], axis=0)) / len(scored)
    else:
        macro = macro_se = np.full(k_max, np.nan)
    queried = np.isin(labels, scored)
    return Agreement(macro, macro_se, per_label, images,
                     sims[queried][hits[queried]], sims[queried][~hits[queried]])


def target_agreement(targets: np.ndarray, target_keys: Sequence[str | None], vectors: np.ndarray,
                     keys: Sequence[str], topn: int) -> tuple[float | None, dict[str, float], int]:
    """The share of each labelled target's topn nearest sample images that share its label: the
    mean over the targets, per target label, and how many targets it rests on."""
    if not len(targets):
        return None, {}, 0
    labels = np.asarray(keys, dtype=object)
    ids, _ = nearest(targets, vectors, min(topn, len(vectors)), exclude_self=False)
    mine = np.asarray(target_keys, dtype=object)
    share = (labels[ids] == mine[:, None]).mean(axis=1)
    scored = np.array([key is not None for key in target_keys])
    if not scored.any():
        return None, {}, 0
    per = {str(name): float(share[scored & (mine == name)].mean()) for name in sorted(set(mine[scored]))}
    return float(share[scored].mean()), per, int(scored.sum())


def quantiles(values: np.ndarray) -> dict[str, float]:
    """p05 … p95 of a similarity distribution (empty: none)."""
    if not len(values):
        return {}
    return {f"p{q:02d}": float(v) for q, v in zip(QUANTILES, np.percentile(values, QUANTILES))}


def suggest_topn(macro: np.ndarray, tolerance: float) -> int:
    """The largest n whose agreement, and every smaller n's, stays within `tolerance` of n = 1."""
    within = macro >= macro[0] - tolerance - 1e-12
    return int(np.argmin(within)) if not within.all() else len(macro)


@dataclass
class Floor:
    """The similarity below which neighbours are mostly cross-label, and the counts that say so."""

    value: float | None
    reason: str
    pairs: int
    below: int = 0
    below_cross: float | None = None
    above: int = 0
    above_same: float | None = None


def suggest_floor(same: np.ndarray, cross: np.ndarray) -> Floor:
    """The similarity that best splits the neighbour pairs: the fewest same-label pairs below it plus
    cross-label pairs above it (equal cuts: the lowest, which keeps the most), rounded down to 4
    decimals; below it, neighbours are mostly cross-label. None when the best cut is below every pair
    (no floor needed) or above every pair (the encoder does not separate the labels)."""
    sims = np.concatenate([same, cross]).astype(np.float64)
    agree = np.concatenate([np.ones(len(same), bool), np.zeros(len(cross), bool)])
    if not len(sims):
        return Floor(None, "no neighbour pairs were scored", 0)
    order = np.argsort(sims, kind="stable")
    sims, agree = sims[order], agree[order]
    same_below = np.concatenate([[0], np.cumsum(agree)])  # cut c: the pairs [0, c) lie below it
    cross_above = (~agree).sum() - np.concatenate([[0], np.cumsum(~agree)])
    cuts = np.concatenate([[0], np.nonzero(sims[1:] > sims[:-1])[0] + 1, [len(sims)]])  # never inside a tie
    best = int(cuts[np.argmin((same_below + cross_above)[cuts])])
    if best == 0:
        return Floor(None, "even the least similar neighbours mostly share the label: no floor is needed", len(sims))
    if best == len(sims):
        return Floor(None, "the neighbours are mostly cross-label at every similarity: the encoder does not "
                           "separate these labels, and no floor fixes that", len(sims))
    value = math.floor(float(sims[best]) * 1e4) / 1e4
    below = sims < value
    return Floor(value, "below it, most neighbour pairs carry another label", len(sims), int(below.sum()),
                 float(1.0 - agree[below].mean()) if below.any() else None, int((~below).sum()),
                 float(agree[~below].mean()) if (~below).any() else None)
