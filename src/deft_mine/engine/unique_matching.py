"""`tmm unique_neighbor_matching`: exact search in passes, the container's one-to-one assignment to a budget."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
import os
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable

import numpy as np
import pyarrow as pa

from deft_mine.engine import dedup, detections, tables
from deft_mine.engine.detections import NO_CLASSES, ImageClasses
from deft_mine.engine.knn import l2_normalise
from deft_mine.engine.leak_search import Guard, Kept, LeakOutcome, read_protected
from deft_mine.engine.leaks import leak_mask
from deft_mine.engine.mining import label_key, label_spellings, label_text, take_rows
from deft_mine.engine.pool_search import PoolSearch, pool_parts, search_pool
from deft_mine.engine.selection import claim_one_to_one, nearest_first
from deft_mine.errors import DeftError
from deft_mine.schemas import artifacts, warnings
from deft_mine.schemas.specs import AllocationPolicy, ExcludeBy, Metric, UniqueMatchingSpec
from deft_mine.schemas.warnings import ToolWarning

GLOBAL, NON_RARE = "global", "non_rare"


class ShortReason(StrEnum):
    """Why a group got fewer than its quota: its pools ran dry (`pool_spent`), its class has no
    pool rows at all (`class_empty`), or exclude_path took rows it could have had (`excluded`)."""

    pool_spent = "pool_spent"
    class_empty = "class_empty"
    excluded = "excluded"


@dataclass
class Shortfall:
    group: str  # global, a rare class, or non_rare
    wanted: int
    got: int
    reason: ShortReason

    def as_dict(self) -> dict[str, Any]:
        return {"group": self.group, "wanted": self.wanted, "got": self.got,
                "missing": self.wanted - self.got, "reason": self.reason.value}


@dataclass
class PassRecord:
    """One pass of one subset: its share per target, candidates asked, and every satisfied
    target's picks (kept or cut by the budget)."""

    subset: str
    number: int
    topn: int
    candidates: int
    targets: int  # targets searched
    retry: int  # ...that released their picks
    added: int  # files the budget kept
    target_rows: list[int]  # per satisfied target, its row in the targets
    pool_rows: list[list[int]]  # ...its picks' pool rows, nearest first
    distances: list[list[float]]

    @property
    def name(self) -> str:
        return artifacts.unique_pass(self.subset, self.number, self.topn)


@dataclass
class UniqueOutcome:
    selected: pa.Table  # filepath first (the source filepath column), matched_target, distance, class, subset, pass
    passes: list[PassRecord]
    summary: dict[str, Any]  # the container's keys, then ours
    shortfall: list[Shortfall]
    pool_paths: list[str]  # every pool row's filepath, in row order (the passes name rows)
    target_paths: list[str]
    warnings: list[ToolWarning] = field(default_factory=list)
    near_duplicates: pa.Table | None = None  # with dedup_similarity / dedup_distance: the files set aside
    leaks: LeakOutcome | None = None  # with protected_parquet: the candidates that copy a protected file's bytes


@dataclass
class _Side:
    """One side read whole but for the pool's vectors: its files, each row's filepath and label."""

    files: list[Path]
    paths: list[str]
    label_text: list[Any] | None  # labels as text; None without a `label` column
    vectors: np.ndarray | None  # the targets' vectors, L2-normalised (the pool's are streamed)


def parquet_files(path: str, field_name: str) -> list[Path]:
    """A parquet, or a folder's `*.parquet` in name order (the container's rule)."""
    where = Path(path).expanduser()
    if where.is_file():
        return [where]
    files = sorted(where.glob("*.parquet")) if where.is_dir() else []
    if not files:
        raise DeftError("file_not_found", f"{field_name} {where} is " + (
            "a folder with no *.parquet files" if where.is_dir() else "neither a file nor a folder"),
            fix=f"point {field_name} at an embedding parquet or a folder of them", field=field_name, path=str(where))
    return files


def _read_side(spec: UniqueMatchingSpec, files: list[Path], field_name: str, *, vectors: bool,
               need_label: bool) -> _Side:
    side = field_name.split("_")[0]
    path_col, vec_col = getattr(spec, f"{side}_filepath_column"), getattr(spec, f"{side}_embedding_column")
    parts = []
    for file in files:
        schema = tables.schema_of(file)
        needed = [path_col, vec_col] + (["label"] if need_label else [])
        tables.require_columns(file, schema, needed, field_name)
        columns = [path_col] + ([vec_col] if vectors else []) + (["label"] if "label" in schema.names else [])
        parts.append(tables.read_columns(file, columns))
    with_label = all("label" in p.column_names for p in parts)
    paths = pa.chunked_array([p.column(path_col).cast(pa.string()) for p in parts], pa.string())
    if (row := tables.first_null(paths)) is not None:
        raise DeftError("column_invalid", f"{field_name}: {path_col} is null in row {row}",
                        fix="every row needs a filepath; re-embed from the listing", field=field_name, row=row)
    labels = pa.chunked_array([label_text(p.column("label")) for p in parts], pa.string()) if with_label else None
    array = None
    if vectors:
        blocks, dim, seen = [], None, 0
        for file, part in zip(files, parts):
            blocks.append(tables.vectors_from_column(part.column(vec_col), path=file, name=vec_col, first_row=seen,
                                                     dim=dim, field=field_name))
            dim, seen = blocks[-1].shape[1], seen + part.num_rows
        array = l2_normalise(np.concatenate(blocks)) if blocks else np.zeros((0, 0), np.float32)
    return _Side(files=files, paths=paths.to_pylist(),
                 label_text=labels.to_pylist() if labels is not None else None, vectors=array)


def _excluded(spec: UniqueMatchingSpec, paths: list[str]) -> np.ndarray:
    """Pool rows exclude_path names: by full path or by file name either way (the container's rule),
    or by full path alone (exclude_by=path)."""
    if not spec.exclude_path:
        return np.zeros(len(paths), dtype=bool)
    path = tables.require_file(Path(spec.exclude_path).expanduser(), "exclude_path")
    tables.require_columns(path, tables.schema_of(path), ["filepath"], "exclude_path")
    by_name = spec.exclude_by is ExcludeBy.path_or_name
    names = set()
    for value in tables.read_columns(path, ["filepath"]).column("filepath").to_pylist():
        if value is not None:
            names |= {str(value), PurePosixPath(str(value)).name} if by_name else {str(value)}
    return np.fromiter((p in names or (by_name and PurePosixPath(p).name in names) for p in paths), dtype=bool,
                       count=len(paths))


def _leaked(spec: UniqueMatchingSpec, paths: list[str]) -> np.ndarray:
    """Pool rows the leakage guard's leaks_parquet lists (by their lexically normal full path)."""
    if not spec.leaks_parquet:
        return np.zeros(len(paths), dtype=bool)
    normal = pa.array([os.path.normpath(p) for p in paths], pa.string())
    return leak_mask(normal, tables.require_file(Path(spec.leaks_parquet).expanduser(), "leaks_parquet"))


# A search keeps each target's candidates for this many passes' k (the retries then read them back
# instead of the pool), as long as all targets' lists together stay under _CACHE_ENTRIES (16 bytes each).
_CACHE_PASSES = 2
_CACHE_ENTRIES = 4 << 20


class _Matcher:
    """The pool, the targets and who holds which pool file; `match` runs one subset's passes."""

    def __init__(self, spec: UniqueMatchingSpec, pool: _Side, targets: _Side, search: PoolSearch) -> None:
        self.spec, self.pool, self.targets, self.search = spec, pool, targets, search
        encoded = pa.array(pool.paths, pa.string()).dictionary_encode()
        self.files = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        self.file_paths: list[str] = encoded.dictionary.to_pylist()
        self.held = np.zeros(len(self.file_paths), dtype=bool)
        self.owner: dict[int, tuple[int, float, str, str, int]] = {}  # file -> target, distance, class, subset, pass
        self.passes: list[PassRecord] = []
        self.twins = _Twins(spec, pool)  # identical bytes, and with dedup_* the near-duplicate rule (ours)

    def match(self, target_rows: np.ndarray, allowed: np.ndarray, budget: int, subset: str, group: str) -> int:
        """Up to `budget` files for these targets from the pool rows `allowed`: passes until the
        budget is held or the pool is spent. Each pass is the container's: share = ceil(budget /
        targets), candidates = factor x share x pass number, the targets that could not fill their
        share retried. Ours past the container (which stops short there): no limit of 8 passes; a
        pass that satisfies nobody goes on wider; the share shrinks to the files left when fewer
        remain, and to what the failing targets could take when they saw every free row; with no
        target left to retry all targets go again."""
        if not len(target_rows) or budget <= 0:
            return 0
        topn = -(-budget // len(target_rows))
        current, got, number = np.arange(len(target_rows)), 0, 0
        cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # target position -> its candidate rows, distances
        while got < budget:
            # With the near-duplicate rule the rows within it of a held file are not free: those met
            # among the candidates are set aside and the search asked again, until its top-k are all
            # free (then they are the exact top-k of the free rows, whatever has not been met yet).
            while True:
                free = allowed & ~self.held[self.files] & ~self.twins.blocked
                rows_left = int(free.sum())
                if not rows_left:
                    break
                share = min(topn, len(np.unique(self.files[free])))
                k = min(self.spec.candidate_expansion_factor * (number + 1) * share, rows_left)
                ahead = self.spec.candidate_expansion_factor * share * (number + _CACHE_PASSES)
                wide = min(rows_left, max(k, min(ahead, _CACHE_ENTRIES // len(target_rows))))
                rows, dist = self._candidates(target_rows, current, free, k, wide, cache)
                if not self.twins.block(rows, self.files, self.held):
                    break
            if not rows_left:
                break
            number += 1
            claimed = claim_one_to_one(rows, self.files, share,
                                       self.twins.among(rows, self.files) or None)
            got += self._record(claimed, rows, dist, target_rows[current], budget - got, subset, group, number, share, k)
            self.twins.block(rows, self.files, self.held)  # the candidates a pick of this pass (now held) kept out
            if claimed.failed and k >= rows_left:
                # The failing targets saw every free row, so a wider search cannot help them. Without the
                # near-duplicate rule they could take every free file no earlier target held, and the
                # share already shrinks to the files left; with it, near copies among the free files
                # count as files but cannot be taken together. So the share drops to the most any of
                # them could take, and they go again (the first target of a pass always takes at least
                # one file, so each such pass shrinks the share or holds a file: the loop ends).
                topn = max(1, max(claimed.found))
            if claimed.failed:
                current = current[claimed.failed]
            elif got < budget:
                current = np.arange(len(target_rows))
        return got

    def _candidates(self, target_rows: np.ndarray, current: np.ndarray, free: np.ndarray, k: int, wide: int,
                    cache: dict[int, tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
        """Each current target's exact top-k free pool rows (ties to the lower row) and distances.
        A target's last search kept its `wide` nearest rows; rows only ever leave the free set
        within one `match`, so while that list still holds k free rows its first k free ones are
        the exact top-k now (any row it lacks was behind all of them). The targets whose list ran
        dry, or that have none yet, search the pool again, together, `wide` rows deep."""
        rows, dist = np.empty((len(current), k), np.int64), np.empty((len(current), k), np.float64)
        stale = []
        for i, target in enumerate(current.tolist()):
            if (hit := cache.get(target)) is not None:
                still = free[hit[0]]
                cache[target] = hit = (hit[0][still], hit[1][still])  # held rows never come back
                if len(hit[0]) >= k:
                    rows[i], dist[i] = hit[0][:k], hit[1][:k]
                    continue
            stale.append(i)
        if stale:
            found, far = self._search(self.targets.vectors[target_rows[current[stale]]], free, wide)
            for j, i in enumerate(stale):
                cache[int(current[i])] = (found[j], far[j])
                rows[i], dist[i] = found[j, :k], far[j, :k]
        return rows, dist

    def _record(self, claimed, rows, dist, targets, room, subset, group, number, share, k) -> int:
        query = np.array([q for q, slots in claimed.picks for _ in slots], dtype=np.int64)
        rank = np.array([r for _, slots in claimed.picks for r in slots], dtype=np.int64)
        picked, near = rows[query, rank], dist[query, rank]
        files = self.files[picked]
        kept = nearest_first(near, [self.file_paths[f] for f in files.tolist()], room)
        self.held[files[kept]] = True
        self.twins.hold(picked[kept])
        for i in kept.tolist():
            self.owner[int(files[i])] = (int(targets[query[i]]), float(near[i]), group, subset, number)
        self.passes.append(PassRecord(
            subset=subset, number=number, topn=share, candidates=k, targets=rows.shape[0], retry=len(claimed.failed),
            added=len(kept), target_rows=[int(targets[q]) for q, _ in claimed.picks],
            pool_rows=rows[query, rank].reshape(-1, share).tolist() if len(query) else [],
            distances=near.reshape(-1, share).tolist() if len(query) else []))
        return len(kept)

    def _search(self, queries: np.ndarray, free: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k over the free pool rows (ties to the lower row), distances on the container's
        scale (cosine: 1 - similarity)."""
        metric = self.spec.distance_metric
        found = self.search(self.spec, self.pool.files, queries, free, k)
        keys, rows = found.keys, found.ids
        dist = 1.0 + keys if metric is Metric.cosine else np.sqrt(keys) if metric is Metric.euclidean else keys
        return rows, dist


class _Twins:
    """The near-duplicate rules while claiming (ours): a pool row whose file repeats a held file's bytes
    (always), or (with dedup_similarity / dedup_distance) lies within the threshold of a held file's
    row, is never claimed. The vectors are the matcher's (L2-normalised), read back for just the
    candidate rows; each row is compared once with each held row."""

    def __init__(self, spec: UniqueMatchingSpec, pool: _Side) -> None:
        self.spec, self.metric = spec, spec.distance_metric
        self.threshold = None if spec.dedup is None else float(spec.dedup)
        self.same = dedup.SameBytes(pool.paths, spec.pool_root())
        # the leakage guard's byte check as candidates are met (protected_parquet: the run's, no threshold)
        self.guard = None if not spec.protected_parquet else Guard(
            read_protected(Path(spec.protected_parquet).expanduser(), False), spec.distance_metric, None,
            spec.pool_root(), pa.array([os.path.normpath(p) for p in pool.paths], pa.string()))
        self.parts = pool_parts(pool.files)
        self.blocked = np.zeros(len(pool.paths), bool)
        self.checked = np.zeros(len(pool.paths), np.int64)  # how many held rows each row was compared with
        self.held_rows: list[int] = []  # the rows of the held files, in the order they were held
        self.found: list[tuple[int, int, float]] = []  # (blocked row, held row it lies nearest, score)
        self._vectors: dict[int, np.ndarray] = {}

    def hold(self, rows: np.ndarray) -> None:
        self.held_rows += [int(r) for r in rows]
        self.same.hold([int(r) for r in rows])

    def block(self, rows: np.ndarray, files: np.ndarray, held: np.ndarray) -> bool:
        """Set aside the candidate rows (of files not `held`) whose bytes repeat a held file's, or within
        the threshold of a held row they were not yet compared with; whether any was."""
        cands = np.unique(rows[rows >= 0])
        cands = cands[~self.blocked[cands] & ~held[files[cands]]]
        leaked = np.zeros(0, np.int64)
        if self.guard is not None:  # a copy of a protected image: a leak, never claimed (leaks.parquet)
            self.guard.judge(cands, None)
            leaked = cands[self.guard.leak[cands]]
            self.blocked[leaked] = True
            cands = cands[~self.guard.leak[cands]]
        copies = self.same.copies(cands.tolist())
        for a, b in copies.items():
            self.blocked[a] = True
            self.found.append((a, b, float("nan")))  # identical bytes: not compared
        any_new = bool(copies) or bool(len(leaked))
        if self.threshold is None:
            return any_new
        cands = cands[~self.blocked[cands] & (self.checked[cands] < len(self.held_rows))]
        for since in np.unique(self.checked[cands]).tolist():
            these = cands[self.checked[cands] == since]
            held = np.asarray(self.held_rows[since:], np.int64)
            i, j, s = dedup.within(self.vectors(these), self.vectors(held), self.metric, self.threshold)
            first = dedup.nearest(i, j + since, s, self.metric)  # the earliest held row on a tie
            for a, b, score in zip(these[i[first]].tolist(), (j[first] + since).tolist(), s[first].tolist()):
                self.blocked[a] = True
                self.found.append((a, self.held_rows[b], score))
            any_new |= bool(len(first))
        self.checked[cands] = len(self.held_rows)
        return any_new

    def among(self, rows: np.ndarray, files: np.ndarray) -> dict[int, set[int]]:
        """Each candidate file's near duplicates (identical bytes, or within the threshold) among this
        pass's other candidate files."""
        cands = np.unique(rows[rows >= 0])
        pairs = [(a, b) for same in self.same.groups(cands.tolist()) for a in same for b in same]
        i, j = (np.asarray(side, np.int64) for side in zip(*pairs)) if pairs else (np.zeros(0, np.int64),) * 2
        fi, fj = files[i], files[j]
        if self.threshold is not None:
            x = self.vectors(cands)
            i, j, _ = dedup.within(x, x, self.metric, self.threshold)
            fi, fj = np.concatenate([fi, files[cands[i]]]), np.concatenate([fj, files[cands[j]]])
        near: dict[int, set[int]] = {}
        for a, b in zip(fi.tolist(), fj.tolist()):
            if a != b:
                near.setdefault(a, set()).add(b)
        return near

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """The given pool rows' vectors as the matcher scores them (L2-normalised), read once each."""
        todo = np.array(sorted({int(r) for r in rows} - self._vectors.keys()), np.int64)
        column = self.spec.source_embedding_column
        for part in self.parts:
            mine = todo[(todo >= part.first_row) & (todo < part.first_row + part.rows)]
            if len(mine):
                table = take_rows(part.file, mine - part.first_row, [column], self.spec.block_rows, by_row_group=True)
                read = l2_normalise(tables.vectors_from_column(table.column(column), path=part.file, name=column,
                                                               first_row=0, dim=None, field="source_path"))
                self._vectors.update(zip(mine.tolist(), read))
        dim = len(next(iter(self._vectors.values()))) if self._vectors else 0
        return np.stack([self._vectors[int(r)] for r in rows]) if len(rows) else np.zeros((0, dim), np.float32)

    def table(self, paths: list[str]) -> pa.Table:
        """near_duplicates.parquet: each pool file set aside (once, as first met), the held file it
        repeats the bytes of (kind identical_bytes, no score) or lies nearest (similar: their similarity
        (cosine) or distance)."""
        seen: set[str] = set()
        rows = [(paths[a], paths[b], s) for a, b, s in self.found if not (paths[a] in seen or seen.add(paths[a]))]
        same = [math.isnan(r[2]) for r in rows]
        kinds = artifacts.DuplicateKind
        return pa.table({
            "filepath": pa.array([r[0] for r in rows], pa.string()),
            "duplicate_of": pa.array([r[1] for r in rows], pa.string()),
            "similarity" if self.metric.higher_is_nearer else "distance": pa.array(
                [None if s else r[2] for r, s in zip(rows, same)], pa.float64()),
            "kind": pa.array([(kinds.identical_bytes if s else kinds.similar).value for s in same], pa.string()),
        })


def allocate_quotas(ratios: dict[str, float], budget: int) -> dict[str, int]:
    """Largest remainder: each group floor(budget x ratio / total), the units left one each to the
    largest remainders, a tie to the group whose name sorts last (the container's rule)."""
    total = sum(ratios.values())
    if budget <= 0 or total <= 0:
        return {group: 0 for group in ratios}
    ideal = {group: budget * ratio / total for group, ratio in ratios.items()}
    quota = {group: int(value) for group, value in ideal.items()}
    for group in sorted(ratios, key=lambda g: (ideal[g] - quota[g], g), reverse=True)[:budget - sum(quota.values())]:
        quota[group] += 1
    return quota


def unique_match(spec: UniqueMatchingSpec, search: PoolSearch = search_pool) -> UniqueOutcome:
    """Read both sides, match under the spec's policy, and say what was held and what fell short;
    every pass's pool search by `search` (default: here, in this process)."""
    stratified = spec.allocation_policy is AllocationPolicy.class_stratified
    pool = _read_side(spec, parquet_files(spec.source_path, "source_path"), "source_path", vectors=False,
                      need_label=stratified and not spec.source_detection_file)
    targets = _read_side(spec, parquet_files(spec.target_path, "target_path"), "target_path", vectors=True,
                         need_label=stratified and not spec.target_detection_file)
    if not targets.paths:
        raise DeftError("spec_invalid", "target_path has no rows: there is nothing to match",
                        fix="give at least one target", field="target_path")
    classes = (_class_source(spec, pool, "source"), _class_source(spec, targets, "target"))
    excluded = _excluded(spec, pool.paths)
    leaked = _leaked(spec, pool.paths)
    excluded = excluded | leaked  # a leak is never selected, as an excluded row is not
    matcher = _Matcher(spec, pool, targets, search)
    if stratified:
        groups = _class_groups(spec, *classes)
        quotas, shortfall = _stratified(spec, matcher, groups, excluded)
    else:
        every = np.ones(len(pool.paths), dtype=bool)
        got = matcher.match(np.arange(len(targets.paths)), ~excluded, spec.desired_unique_count, GLOBAL, GLOBAL)
        shortfall = _short(GLOBAL, spec.desired_unique_count, got, every, excluded, every)
        quotas, groups = None, None
    selected = _selected(spec, matcher)
    summary = _summary(spec, matcher, selected, targets, pool, excluded, groups, quotas, shortfall, classes)
    if spec.leaks_parquet:  # ours: the leak rows the guard left out (among excluded_rows)
        summary["leaks_excluded"] = int(leaked.sum())
    guard = matcher.twins.guard
    leaks = None if guard is None else guard.outcome(Kept(np.zeros(0, np.int64)), len(pool.paths))
    if leaks is not None:  # ours: the claimed candidates that copy a protected image's bytes, never claimed
        summary["leaks_excluded"] = summary.get("leaks_excluded", 0) + leaks.table.num_rows
        summary["leaks_judged"] = leaks.judged
    near = matcher.twins.table(pool.paths)
    identical = near.column("kind").to_pylist().count(artifacts.DuplicateKind.identical_bytes.value)
    if spec.dedup is not None:  # ours, counted when the rule is on (files set aside as near copies)
        summary["near_duplicates_removed"] = near.num_rows - identical
    if spec.dedup is not None or identical:  # ours: files set aside for repeating a held file's bytes
        summary["identical_images"] = identical
    else:
        near = None
    raised = [warnings.unique_count_short(spec.desired_unique_count, selected.num_rows,
                                          [s.as_dict() for s in shortfall])] if shortfall else []
    return UniqueOutcome(selected=selected, passes=matcher.passes, summary=summary, shortfall=shortfall,
                         pool_paths=pool.paths, target_paths=targets.paths, warnings=raised, near_duplicates=near,
                         leaks=leaks)


def _short(group: str, wanted: int, got: int, own: np.ndarray, excluded: np.ndarray, pools: np.ndarray
           ) -> list[Shortfall]:
    """A group's shortfall, if any: `own` its class's pool rows, `pools` every row it may search."""
    if got >= wanted:
        return []
    reason = ShortReason.excluded if (excluded & pools).any() else \
        ShortReason.class_empty if not own.any() else ShortReason.pool_spent
    return [Shortfall(group, wanted, got, reason)]


@dataclass
class _Groups:
    """class_stratified: each group's members, a mask over the pool rows and one over the targets.
    A rare class holds every image with an instance of it (an image of two rare classes is in
    both, as in the container), non_rare the images with none."""

    rare: list[str]
    pool: dict[str, np.ndarray]  # group -> bool per pool row
    targets: dict[str, np.ndarray]  # group -> bool per target


@dataclass
class _Classes:
    """One side's classes, per row (its groups) and per image (the summary's counts), and how a
    class name compares: a detection file's by the container's `lower()`, a `label` by the label
    rule (`strip().upper()`)."""

    source: str  # label, coco or kitti
    file: str | None
    rows: list[ImageClasses]
    images: dict[str, ImageClasses]  # per distinct filepath: its rows' classes together
    key: Callable[[str], str | None]
    listed: int | None = None  # rows whose image the detection file names (None: from label)

    def counts(self) -> dict[str, Any]:
        """ours: where the classes came from, and how many rows have none (the container takes
        such an image as non_rare, and so do we)."""
        out = {"from": self.source, "file": self.file, "rows": len(self.rows),
               "rows_without_class": sum(not c.names for c in self.rows)}
        return out if self.listed is None else {**out, "rows_not_in_file": len(self.rows) - self.listed}


def _class_source(spec: UniqueMatchingSpec, side: _Side, name: str) -> _Classes | None:
    """A side's classes: from its detection file when given (`name`_detection_file, the
    container's reading), else one per row from `label`; None with neither."""
    field_name = f"{name}_detection_file"
    if file := getattr(spec, field_name):
        found = detections.detection_classes(file, spec.detection_format, side.paths, field_name)
        return _Classes(spec.detection_format, file, found.classes, dict(zip(side.paths, found.classes)), str.lower,
                        sum(found.listed))
    if side.label_text is None:
        return None
    spelled = {key: seen[0] for key, seen in label_spellings(side.label_text).items()}  # one name per class
    made: dict[Any, ImageClasses] = {None: NO_CLASSES}
    rows, images = [], {}
    for path, text in zip(side.paths, side.label_text):
        if text not in made:
            made[text] = ImageClasses(frozenset({spelled[label_key(text)]}), (spelled[label_key(text)],))
        rows.append(one := made[text])
        had = images.get(path)
        images[path] = one if had is None else ImageClasses(had.names | one.names, had.boxes + one.boxes)
    return _Classes("label", None, rows, images, label_key)


def _members(classes: _Classes, rare: list[str]) -> dict[str, np.ndarray]:
    """Each rare class's mask over the side's rows (an instance of it), and non_rare's (none)."""
    distinct: dict[ImageClasses, int] = {}
    codes = np.fromiter((distinct.setdefault(c, len(distinct)) for c in classes.rows), np.int64, len(classes.rows))
    keys = [{classes.key(n) for n in c.names} for c in distinct]
    out = {name: np.isin(codes, [i for i, k in enumerate(keys) if classes.key(name) in k]) for name in rare}
    out[NON_RARE] = ~np.any([np.zeros(len(codes), bool), *out.values()], axis=0)
    return out


def _class_groups(spec: UniqueMatchingSpec, pool: _Classes | None, targets: _Classes | None) -> _Groups:
    """Classes from each side's detection file, else its `label` (an AOI row carries its class):
    compared as the container compares them, so `Scratch ` is class `scratch`."""
    rare = list(spec.rare_class_list)
    return _Groups(rare=rare, pool=_members(pool, rare), targets=_members(targets, rare))


def _stratified(spec: UniqueMatchingSpec, matcher: _Matcher, groups: _Groups, excluded: np.ndarray
                ) -> tuple[dict[str, Any], list[Shortfall]]:
    """The container's order: each rare class in turn from its own pool, then from the non_rare
    pool to fill its quota; then non_rare. A file belongs to the first class that takes it. The
    classes go in rare_class_list's order: sorted only because the spec's validator sorts that
    list (schemas/specs.py `_class_names`)."""
    total = len(groups.targets[NON_RARE])
    ratios = {name: float(np.sum(groups.targets[name])) / total for name in groups.rare}
    common_ratio = float(np.sum(groups.targets[NON_RARE])) / total
    quotas = allocate_quotas({**ratios, NON_RARE: common_ratio}, spec.desired_unique_count)
    usable, common = ~excluded, groups.pool[NON_RARE]
    shortfall: list[Shortfall] = []
    for name in [*groups.rare, NON_RARE]:
        rows, own = np.flatnonzero(groups.targets[name]), groups.pool[name]
        if not len(rows) or quotas[name] <= 0:
            continue
        got = matcher.match(rows, usable & own, quotas[name], name, name) if (usable & own).any() else 0
        if name != NON_RARE and got < quotas[name] and (usable & common).any():
            got += matcher.match(rows, usable & common, quotas[name] - got, f"{name}_fallback", name)
        shortfall += _short(name, quotas[name], got, own, excluded, own | (common if name != NON_RARE else own))
    allocation = {"ratios": ratios, "common_ratio": common_ratio, "quotas": quotas}
    return allocation, shortfall


def _selected(spec: UniqueMatchingSpec, matcher: _Matcher) -> pa.Table:
    """final_unique_files: each held file once, by filepath (the container sorts them), with the
    target that claimed it, the distance, its class (null under global), the subset and pass."""
    files = sorted(matcher.owner, key=lambda f: matcher.file_paths[f])
    rows = [matcher.owner[f] for f in files]
    return pa.table({
        spec.source_filepath_column: pa.array([matcher.file_paths[f] for f in files], pa.string()),
        "matched_target": pa.array([matcher.targets.paths[r[0]] for r in rows], pa.string()),
        "distance": pa.array([r[1] for r in rows], pa.float64()),
        "class": pa.array([None if r[2] == GLOBAL else r[2] for r in rows], pa.string()),
        "subset": pa.array([r[3] for r in rows], pa.string()),
        "pass": pa.array([r[4] for r in rows], pa.int32()),
    })


def _dataset(classes: _Classes, paths: Iterable[str], rare: list[str]) -> dict[str, Any]:
    """The container's per-dataset counts over the distinct images: an image is rare if it holds
    an instance of any rare class; rare_instances adds up the rare classes each image holds (a
    class once per image); per_class counts each class's images and instances (boxes)."""
    rare_keys = {classes.key(name) for name in rare}
    images = [classes.images[p] for p in dict.fromkeys(paths)]
    rare_hits = [len({classes.key(n) for n in c.names} & rare_keys) for c in images]
    per_class: dict[str, dict[str, int]] = {}
    for image in images:
        for name in image.boxes:
            counts = per_class.setdefault(name, {"image_count": 0, "instance_count": 0})
            counts["instance_count"] += 1
        for name in set(image.boxes):
            per_class[name]["image_count"] += 1
    rare_images = sum(hits > 0 for hits in rare_hits)
    return {"total_images": len(images), "rare_images": rare_images, "common_images": len(images) - rare_images,
            "rare_instances": sum(rare_hits), "per_class": dict(sorted(per_class.items()))}


def _stats(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=np.float64)
    return {"count": int(arr.size), "min": float(arr.min()), "max": float(arr.max()), "mean": float(arr.mean()),
            "median": float(np.median(arr)), "std": float(arr.std()), "p25": float(np.percentile(arr, 25)),
            "p75": float(np.percentile(arr, 75))}


def _summary(spec: UniqueMatchingSpec, matcher: _Matcher, selected: pa.Table, targets: _Side, pool: _Side,
             excluded: np.ndarray, groups: _Groups | None, allocation: dict[str, Any] | None,
             shortfall: list[Shortfall], classes: tuple[_Classes | None, _Classes | None]) -> dict[str, Any]:
    """summary.json: the container's keys in its order, then ours."""
    desired, got = spec.desired_unique_count, selected.num_rows
    out: dict[str, Any] = {"allocation_policy": spec.allocation_policy.value, "desired_unique_count": desired,
                           "retrieved_unique_count": got, "coverage_pct": round(got / desired * 100, 2)}
    if groups is None:
        out["target_queries"] = len(targets.paths)
        out["rare_classes"] = list(spec.rare_class_list)
    else:
        out["rare_classes"] = list(spec.rare_class_list)
        # rare: each rare class's targets added up (a target of two rare classes counts twice, as there)
        out["target_queries"] = {"rare": int(sum(np.sum(groups.targets[name]) for name in groups.rare)),
                                 "non_rare": int(np.sum(groups.targets[NON_RARE]))}
        quotas = allocation["quotas"]
        out["allocation"] = {
            "per_class": {name: {"target_count": int(np.sum(groups.targets[name])),
                                 "ratio_pct": round(allocation["ratios"][name] * 100, 2),
                                 "desired_count": quotas[name]} for name in sorted(allocation["ratios"])},
            NON_RARE: {"target_count": int(np.sum(groups.targets[NON_RARE])),
                       "ratio_pct": round(allocation["common_ratio"] * 100, 2), "desired_count": quotas[NON_RARE]},
            "total_desired": sum(quotas.values())}
    pool_classes, target_classes = classes
    if pool_classes is not None and target_classes is not None:
        out["target_dataset"] = _dataset(target_classes, targets.paths, spec.rare_class_list)
        out["resultant_dataset"] = _dataset(pool_classes, selected.column(spec.source_filepath_column).to_pylist(),
                                            spec.rare_class_list)
    if groups is not None:
        top1: dict[str, list[float]] = {}
        for record in matcher.passes:
            name = record.subset.removesuffix("_fallback")
            top1.setdefault(name, []).extend(d[0] for d in record.distances)
        per_class = {name: _stats(v) for name, v in sorted(top1.items()) if v}
        if any(top1.values()):
            per_class["overall"] = _stats([d for v in top1.values() for d in v])
        out["distance_stats"] = {"metric": spec.distance_metric.value, "based_on": "top1_distance",
                                 "per_class": per_class}
    # ours, after the container's
    out["distance_metric"] = spec.distance_metric.value
    out["candidate_expansion_factor"] = spec.candidate_expansion_factor
    out["pool_rows"] = len(pool.paths)
    out["pool_files"] = len(matcher.file_paths)
    out["excluded_rows"] = int(excluded.sum())
    out["passes"] = [{"subset": p.subset, "pass": p.number, "topn": p.topn, "candidates": p.candidates,
                      "targets": p.targets, "retry": p.retry, "added": p.added, "file": p.name}
                     for p in matcher.passes]
    out["shortfall"] = {"missing": desired - got, "groups": [s.as_dict() for s in shortfall]}
    out["class_sources"] = {side: None if found is None else found.counts()
                            for side, found in (("target", target_classes), ("source", pool_classes))}
    return out
