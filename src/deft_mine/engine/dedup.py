"""Near-duplicate collapse of the mined set: which mined images repeat the bytes of, or lie within the threshold of, one kept before them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

# knn's own preparation and float64 pair scoring: a mined pair is judged on the vectors exactly
# as the search used them (cosine: L2-normalised float32), scored the way every pair is scored.
from deft_mine.engine.knn import SCORE_OF_KEY, exact_keys, prepare
# the byte comparison the leakage guard also makes: sizes first, SHA-256 only where a size is shared
from deft_mine.engine.images import file_digests, file_sizes, resolve_image_path
from deft_mine.schemas.artifacts import DuplicateKind
from deft_mine.schemas.specs import Metric

BLOCK_ROWS = 2048  # mined images walked at a time
_COLUMNS = 8192  # images compared per product: a (2048 x 8192) float32 product is 64 MiB


@dataclass
class Collapse:
    """Per mined image (in the mined order): the kept image it was collapsed into (-1: kept) and
    its similarity or distance to it (NaN when kept)."""

    duplicate_of: np.ndarray  # (n,) int64
    scores: np.ndarray  # (n,) float64
    identical: np.ndarray | None = None  # (n,) bool: collapsed for identical bytes (its score NaN)

    @property
    def keep(self) -> np.ndarray:
        return self.duplicate_of < 0

    @property
    def removed(self) -> int:
        return int((self.duplicate_of >= 0).sum())


def collapse(vectors: np.ndarray, metric: Metric, threshold: float, block_rows: int = BLOCK_ROWS) -> Collapse:
    """Walk the images in order and keep each one unless it lies within `threshold` (cosine:
    similarity >= it; euclidean, manhattan: distance <= it) of an image already kept; a dropped
    image maps to the kept one nearest to it (the earliest on a tie). Exact: the float32 products
    only propose pairs (with an error margin), every verdict is the pair's float64 score."""
    near = _Near(prepare(vectors, metric), metric, threshold)
    n = len(near.x)
    duplicate_of, scores = np.full(n, -1, np.int64), np.full(n, np.nan)
    kept = np.empty(n, np.int64)  # the images kept so far, in order
    held = 0
    for start in range(0, n, block_rows):
        rows = np.arange(start, min(start + block_rows, n))
        before = near.pairs(rows, kept[:held])  # within the threshold of an image kept in an earlier block
        hit = np.zeros(len(rows), bool)
        hit[before[0] - start] = True
        open_rows = rows[~hit]  # only these can still be kept: the block's own walk decides them
        inside = near.pairs(rows, open_rows, earlier_only=True)
        keep_here = _walk(open_rows, inside)
        # every row's nearest kept image: one of an earlier block, or one this block kept before it
        mine = np.isin(inside[1], keep_here)
        i, j, s = (np.concatenate([b, w[mine]]) for b, w in zip(before, inside))
        first = nearest(i, j, s, metric)
        duplicate_of[i[first]], scores[i[first]] = j[first], s[first]
        kept[held:held + len(keep_here)] = keep_here
        held += len(keep_here)
    return Collapse(duplicate_of, scores)


def _walk(open_rows: np.ndarray, pairs: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    """The keep rule within one block: in order, an open row is kept unless a row kept before it
    lies within the threshold (`pairs`: (row, earlier row) within it). The kept rows, in order."""
    later, earlier, _ = pairs
    order = np.argsort(later, kind="stable")
    later, earlier = later[order], earlier[order]
    bounds = np.searchsorted(later, open_rows, side="left"), np.searchsorted(later, open_rows, side="right")
    kept: set[int] = set()
    for row, lo, hi in zip(open_rows.tolist(), *(b.tolist() for b in bounds)):
        if lo == hi or kept.isdisjoint(earlier[lo:hi].tolist()):
            kept.add(row)
    return np.asarray(sorted(kept), np.int64)


def nearest(i: np.ndarray, j: np.ndarray, s: np.ndarray, metric: Metric) -> np.ndarray:
    """Positions of each row's nearest partner among the pairs (i, j, score): the highest similarity
    or the lowest distance, the earliest j on a tie."""
    order = np.lexsort((j, -s if metric.higher_is_nearer else s, i))
    return order[np.unique(i[order], return_index=True)[1]]


class _Near:
    """The pairs within the threshold between given rows of one prepared matrix: float32 products
    propose (with a margin bounding their rounding error), float64 scores decide."""

    def __init__(self, x: np.ndarray, metric: Metric, threshold: float) -> None:
        self.x, self.metric, self.threshold = x, metric, threshold
        self.norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))
        self.squares = np.square(self.norms).astype(np.float32)
        # a generous bound on a float32 key's relative error (knn's, widened for the few additions
        # that turn a product into a squared distance); its scale: 1 for unit vectors, (|x| + |y|)^2 else
        self.gamma = 2.0 * (x.shape[1] + 4) * float(np.finfo(np.float32).eps)

    def pairs(self, rows: np.ndarray, cols: np.ndarray, earlier_only: bool = False
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(row, col, score) of every pair within the threshold (`earlier_only`: col < row)."""
        found = []
        block = self.x[rows]
        for at in range(0, len(cols), _COLUMNS):
            part = cols[at:at + _COLUMNS]
            if earlier_only:
                part = part[part < rows[-1]]
                if not len(part):
                    break
            mask = self._proposed(block, rows, part)
            if earlier_only:
                mask &= part[None, :] < rows[:, None]
            r, c = np.nonzero(mask)
            if len(r):
                found.append((rows[r], part[c]))
        if not found:
            return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0)
        i, j = (np.concatenate(side) for side in zip(*found))
        scores = SCORE_OF_KEY[self.metric](exact_keys(self.x, i, self.x, j, self.metric))
        within = scores >= self.threshold if self.metric.higher_is_nearer else scores <= self.threshold
        return i[within], j[within], scores[within]

    def _proposed(self, block: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Pairs whose float32 product cannot rule them out."""
        product = block @ self.x[cols].T
        if self.metric is Metric.cosine:
            return product >= self.threshold - 2.0 * self.gamma
        # squared L2 from the product; manhattan is proposed by L2 (L2 <= L1, so L1 <= t needs L2 <= t)
        reach = float(self.norms[rows].max() + self.norms[cols].max())
        limit = self.threshold ** 2 + 2.0 * self.gamma * reach ** 2
        product *= -2.0
        product += self.squares[rows][:, None]
        product += self.squares[cols][None, :]
        return product <= limit


def within(a: np.ndarray, b: np.ndarray, metric: Metric, threshold: float,
           block_rows: int = BLOCK_ROWS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, score) of every pair a[i], b[j] within the threshold, the vectors taken as given (the
    caller prepares them: cosine needs unit rows); the same float32 proposal and float64 verdict."""
    if not len(a) or not len(b):
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0)
    near = _Near(np.ascontiguousarray(np.concatenate([a, b]), dtype=np.float32), metric, threshold)
    cols = np.arange(len(a), len(a) + len(b))
    found = [near.pairs(np.arange(at, min(at + block_rows, len(a))), cols) for at in range(0, len(a), block_rows)]
    i, j, s = (np.concatenate(part) for part in zip(*found))
    return i, j - len(a), s


def identical(paths: list[str], root: Path) -> np.ndarray:
    """Per image (in order), the first earlier image whose file has the same bytes (-1: none, or
    unreadable). Identical bytes have the same size: only files whose size another shares are hashed."""
    found = np.full(len(paths), -1, np.int64)
    for same in SameBytes(paths, root).groups(list(range(len(paths)))):  # each group's rows ascending
        found[same[1:]] = same[0]
    return found


def with_identical(twin: np.ndarray, near: Collapse | None) -> Collapse:
    """Identical bytes first (`twin`: identical's answer), then the threshold's walk over the images
    left (`near`, indexed among them): one collapse over every image, each dropped one naming a kept one."""
    duplicate_of, scores = twin.copy(), np.full(len(twin), np.nan)
    if near is not None:
        rest = np.flatnonzero(twin < 0)
        dropped = np.flatnonzero(~near.keep)
        duplicate_of[rest[dropped]] = rest[near.duplicate_of[dropped]]
        scores[rest[dropped]] = near.scores[dropped]
        # a byte copy whose first copy the walk then dropped names the image that first copy went to
        twins = np.flatnonzero(twin >= 0)
        moved = duplicate_of[twin[twins]] >= 0
        duplicate_of[twins[moved]] = duplicate_of[twin[twins[moved]]]
    return Collapse(duplicate_of, scores, twin >= 0)


def table(paths: list[str], found: Collapse, metric: Metric) -> pa.Table:
    """near_duplicates.parquet: each dropped image (mined order), the kept image it was collapsed
    into, their similarity (cosine) or distance (euclidean, manhattan; null for identical bytes,
    not compared), and why (`kind`: identical_bytes or similar)."""
    dropped = np.flatnonzero(~found.keep)
    names = np.asarray(paths, dtype=object)
    same = found.identical[dropped] if found.identical is not None else np.zeros(len(dropped), bool)
    scores = np.where(same, np.nan, found.scores[dropped])
    return pa.table({
        "filepath": pa.array(names[dropped].tolist(), pa.string()),
        "duplicate_of": pa.array(names[found.duplicate_of[dropped]].tolist(), pa.string()),
        "similarity" if metric.higher_is_nearer else "distance": pa.array(scores, pa.float64(), mask=same),
        "kind": pa.array([(DuplicateKind.identical_bytes if s else DuplicateKind.similar).value for s in same.tolist()],
                         pa.string()),
    })


class SameBytes:
    """Pool rows' files compared by their bytes as the rows are met (mode=unique's claiming): each file
    stat'ed once, and hashed once, only when its size meets a held or fellow file's."""

    def __init__(self, paths: list[str], root: Path) -> None:
        self.paths, self.root = paths, root
        self._size: dict[int, int] = {}
        self._digest: dict[int, bytes | None] = {}
        self._held: dict[int, list[int]] = {}  # size -> held rows of that size, in the order held

    def _sizes(self, rows: list[int]) -> list[int]:
        new = [r for r in dict.fromkeys(rows) if r not in self._size]
        if new:
            self._size.update(zip(new, file_sizes([resolve_image_path(self.paths[r], self.root) for r in new]).tolist()))
        return [self._size[r] for r in rows]

    def _digests(self, rows: list[int]) -> list[bytes | None]:
        new = [r for r in dict.fromkeys(rows) if r not in self._digest]
        if new:
            self._digest.update(zip(new, file_digests([resolve_image_path(self.paths[r], self.root) for r in new])))
        return [self._digest[r] for r in rows]

    def hold(self, rows: list[int]) -> None:
        for row, size in zip(rows, self._sizes(rows)):
            if size >= 0:
                self._held.setdefault(size, []).append(row)

    def copies(self, rows: list[int]) -> dict[int, int]:
        """Each of these rows whose file repeats a held file's bytes, and the first such held row."""
        met = [r for r, size in zip(rows, self._sizes(rows)) if size in self._held]
        if not met:
            return {}
        held = [h for size in {self._size[r] for r in met} for h in self._held[size]]
        first: dict[bytes, int] = {}
        for row, key in zip(held, self._digests(held)):
            if key is not None:
                first.setdefault(key, row)  # the first held with these bytes (a size's rows in the order held)
        return {r: first[key] for r, key in zip(met, self._digests(met)) if key is not None and key in first}

    def groups(self, rows: list[int]) -> list[list[int]]:
        """These rows in groups of identical bytes (groups of two or more only)."""
        by_size: dict[int, list[int]] = {}
        for row, size in zip(rows, self._sizes(rows)):
            if size >= 0:
                by_size.setdefault(size, []).append(row)
        alike = [r for same in by_size.values() if len(same) > 1 for r in same]
        by_key: dict[bytes, list[int]] = {}
        for row, key in zip(alike, self._digests(alike)):
            if key is not None:
                by_key.setdefault(key, []).append(row)
        return [same for same in by_key.values() if len(same) > 1]
