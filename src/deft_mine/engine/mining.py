"""Mining: the pool streamed in blocks through exact k-NN, then candidates → pair filters → selection → summary."""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from deft_mine import rules
from deft_mine.engine import dedup, tables
from deft_mine.engine.floor import FloorStage, best_matches, group_codes
from deft_mine.engine.knn import GroupedTopK, RunningTopK, TopKState
from deft_mine.engine.leak_search import Guard, Kept, LeakOutcome, exclude_leaks, read_protected, sample_rows, slack
from deft_mine.engine.leaks import leak_mask
from deft_mine.engine.selection import Candidates, mode_of
from deft_mine.schemas import warnings
from deft_mine.schemas.artifacts import MiningSummary
from deft_mine.schemas.specs import FloorRule, LabelFilter, Metric, MiningSpec, Side
from deft_mine.schemas.warnings import ToolWarning
from deft_mine.errors import DeftError
from deft_mine.events import Events


@dataclass
class MiningOutcome:
    mined: pa.Table  # filepath first, then score, best_target, hits
    pairs: pa.Table  # every (target, neighbour) pair found, in target then rank order
    summary: MiningSummary  # the label filter's outcome among it
    searched_rows: int  # rows searched (pool less excluded targets)
    label_missing: list[Side]  # sides without a `label` column
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[ToolWarning] = field(default_factory=list)  # duplicate_paths, zero_vectors
    floor: FloorStage | None = None  # with a floor: the raw candidates and what it kept (the loop's files)
    near_duplicates: pa.Table | None = None  # with dedup_similarity / dedup_distance: the images it collapsed
    leaks: LeakOutcome | None = None  # with the guard in the search (protected_parquet): what it judged and found


def lexically_normal(filepath: str) -> str:
    """The path with `./`, `../`, `//` and a trailing slash resolved on paper (relative stays
    relative): how a pool row and a target are judged to name the same file."""
    return os.path.normpath(filepath)


def mine_files(source_path: Path, target_path: Path, spec: MiningSpec, events: Events) -> MiningOutcome:
    """Find each target's `topn` nearest pool rows and turn the pairs into unique mined paths:
    prepare, search the whole pool (streamed block by block), finish."""
    prep = prepare(source_path, target_path, spec)
    events.progress("mine", 0, prep.total)
    found = search_range(spec, source_path, target_path, prep.queries, prep.drop,
                         on_block=lambda seen: events.progress("mine", seen, prep.total),
                         query_groups=prep.query_groups, pool_groups=prep.pool_groups, kept=keeper(prep))
    prep.timings["search"] = time.perf_counter() - prep.search_started
    return finish(prep, leak_stage(prep, found))


def search_width(spec: MiningSpec) -> int:
    """Candidates each query asks the search for: the mode's, and with the guard in the search some
    more (room for leaks among them)."""
    k = mode_of(spec).candidates
    return k + slack(k) if spec.protected_parquet is not None else k


def keeper(prep: Prepared) -> Kept | None:
    """With the guard's vector check in the search: what keeps the candidates' vectors (and the histogram's
    sample) as the pool streams (the byte check alone, every default run's, needs no vector)."""
    return None if prep.guard is None or prep.guard.threshold is None else Kept(sample_rows(prep.total))


def leak_stage(prep: Prepared, found: Searched) -> Searched:
    """With the guard in the search: the leaks among the candidates judged and taken out (queries a leak
    left short searched again without them), so the answer is the top-k of the pool without its leaks."""
    guard = prep.guard
    if guard is None:
        return found
    t0, k = time.perf_counter(), mode_of(prep.spec).candidates

    def research(queries: np.ndarray, leak: np.ndarray) -> tuple[TopKState, Kept]:
        groups = None if prep.query_groups is None else prep.query_groups[queries]
        again = search_range(prep.spec, prep.source_path, prep.target_path, prep.queries[queries], prep.drop | leak,
                             query_groups=groups, pool_groups=prep.pool_groups,
                             kept=None if guard.threshold is None else Kept(np.zeros(0, np.int64)))
        assert again.state is not None
        return again.state, again.kept

    def judge_all() -> None:
        column, seen = prep.spec.source_embed_column_name, 0
        for vectors in pool_vectors(prep.source_path, column, prep.spec.block_rows):
            rows = np.arange(seen, seen + len(vectors))
            searched = ~prep.drop[rows]
            if prep.spec.knn_metric is Metric.cosine:  # all-zero rows were never searched (nor counted)
                searched &= vectors.any(axis=1)
            rows = rows[searched]
            guard.judge(rows, vectors[rows - seen] if guard.threshold is not None else None)
            seen += len(vectors)

    kept = found.kept or Kept(np.zeros(0, np.int64))
    if found.state is not None:
        found.state, kept = exclude_leaks(found.state, kept, guard, k, lambda rows: _pool_rows_vectors(prep, rows),
                                          research, judge_all)
    searchable = found.searched  # the rows the search could take: not left out before it, nor all-zero (cosine)
    found.searched -= int((guard.leak & ~prep.drop).sum())
    prep.leaks = guard.outcome(kept, searchable)
    prep.timings["leaks"] = time.perf_counter() - t0
    return found


@dataclass
class Prepared:
    """Everything about a mining job but the search: the targets (their queries), the pool's
    paths and which of its rows stay out of the search. Both backends start here."""

    spec: MiningSpec
    source_path: Path
    target_path: Path
    label_missing: list[Side]  # sides without a `label` column
    label_filter: LabelFilter
    targets: pa.Table  # the searched target rows: filepath, vector (and label)
    target_rows: np.ndarray  # ...their rows in the target file
    queries: np.ndarray
    pool_paths: pa.StringArray  # every pool row's filepath, lexically normal
    repeated: np.ndarray  # pool rows that repeat an earlier row's file
    drop: np.ndarray  # pool rows left out before the search (targets, with exclude_targets; leaks)
    in_pool: int  # pool files that are targets
    zero_targets: int  # targets with an all-zero vector, left out under cosine
    zero_examples: list[str]
    started: float
    search_started: float
    timings: dict[str, float] = field(default_factory=dict)
    # label_mode=per_label (with the filter applied): each query's label group and each pool
    # row's (-1: a null label, or one no target has); None in every other case.
    query_groups: np.ndarray | None = None
    pool_groups: np.ndarray | None = None
    missing_in_pool: dict[str, int] = field(default_factory=dict)  # target label -> targets, no pool row has it
    guard: Guard | None = None  # with protected_parquet: the leakage guard, judging the search's candidates
    leaks: LeakOutcome | None = None  # ...and what it judged and found

    @property
    def total(self) -> int:
        return len(self.pool_paths)


@dataclass
class Searched:
    """One row range of the pool searched: the top-k of every query within it (None without
    queries) and the rows it left out."""

    state: TopKState | None
    rows: int = 0  # pool rows in the range
    searched: int = 0  # ...of them searched
    flat: int = 0  # all-zero vectors left out under cosine
    flat_rows: list[list[int]] = field(default_factory=list)  # per block with any, its first three
    kept: Kept | None = None  # with the guard in the search: the candidates' vectors, kept as the pool streamed


def prepare(source_path: Path, target_path: Path, spec: MiningSpec) -> Prepared:
    """Check both files' columns, read the targets (all-zero ones under cosine left out and
    counted), and read the pool's filepaths whole: which rows repeat a file, which are targets."""
    source_column, target_column = spec.source_embed_column_name, spec.target_embed_column_name
    started = time.perf_counter()
    schemas = {Side.source: tables.schema_of(source_path), Side.target: tables.schema_of(target_path)}
    # A text embedding parquet (targets from sentences) is keyed by its `text`, read as the targets' filepath.
    target_key = "text" if {"text", "filepath"} & set(schemas[Side.target].names) == {"text"} else "filepath"
    for side, path, column in ((Side.source, source_path, source_column), (Side.target, target_path, target_column)):
        _require_vector_column(path, schemas[side], column, side)
        tables.require_columns(path, schemas[side], [target_key if side is Side.target else "filepath", column],
                               f"{side}_parquet")
    label_missing = [side for side, schema in schemas.items() if "label" not in schema.names]

    # Labels are read whenever a side has them: the pairs table records them for the report.
    tgt_cols = [target_key, target_column] + (["label"] if Side.target not in label_missing else [])
    targets = tables.read_columns(target_path, tgt_cols).rename_columns(["filepath", *tgt_cols[1:]])
    _require_no_null_paths(targets.column("filepath"), target_path, "target_parquet")
    queries = tables.vectors_from_column(targets.column(target_column), path=target_path,
                                        name=target_column, first_row=0, dim=None, field="target_parquet")
    target_set = {lexically_normal(str(p)) for p in targets.column("filepath").to_pylist()}
    # Under cosine an all-zero vector (the thumbnail encoder's flat image) has no direction:
    # as a query every pool row would tie at 0, and the "neighbours" would be the first rows.
    target_rows = np.arange(len(queries))
    flat = ~queries.any(axis=1) if spec.knn_metric is Metric.cosine else np.zeros(len(queries), bool)
    zero_examples = [str(p) for p in targets.column("filepath").take(pa.array(np.flatnonzero(flat)[:3])).to_pylist()]
    if flat.any():
        if flat.all():
            raise _all_zero(target_path, "target_parquet", target_column)
        target_rows = np.flatnonzero(~flat)
        queries, targets = queries[target_rows], targets.take(pa.array(target_rows))

    # The pool's filepath column, whole (paths are small beside vectors): which rows repeat an
    # earlier row's file (counted and warned about, but searched like any row, as the TAO
    # container does: mined.parquet lists each file once all the same) and which are targets.
    search_started = time.perf_counter()
    pool_paths, repeated, is_target = _pool_paths(source_path, target_set)
    drop = is_target if spec.exclude_targets else np.zeros(len(pool_paths), dtype=bool)
    if spec.leaks_parquet is not None:  # the leakage guard's rows (run --protect): never searched
        drop = drop | leak_mask(pool_paths, tables.require_file(Path(spec.leaks_parquet), "leaks_parquet"))
    prep = Prepared(spec=spec, source_path=source_path, target_path=target_path, label_missing=label_missing,
                    label_filter=rules.label_filter(spec.filter_by_label, label_missing), targets=targets,
                    target_rows=target_rows,
                    queries=queries, pool_paths=pool_paths, repeated=repeated,
                    drop=drop,
                    in_pool=int(is_target.sum()), zero_targets=int(flat.sum()), zero_examples=zero_examples,
                    started=started, search_started=search_started)
    if spec.label_mode == "per_label" and prep.label_filter is LabelFilter.applied:
        _label_groups(prep)
    if spec.protected_parquet is not None:  # the leakage guard, judging the search's candidates as it goes
        prep.guard = Guard(read_protected(Path(spec.protected_parquet), spec.leak_threshold is not None),
                           spec.knn_metric, spec.leak_threshold, spec.pool_root(source_path), pool_paths)
    return prep


def _label_groups(prep: Prepared) -> None:
    """Number the targets' labels (as strings, as the post-filter compares them) and give every
    query and every pool row its label's number; a null label, or a pool label no target has,
    is -1 and is never searched. The pool's labels are read whole, like its paths (small beside
    its vectors), so the search can stay streamed block by block."""
    target_labels = label_keys(prep.targets.column("label"))
    pool_labels = label_keys(tables.read_columns(prep.source_path, ["label"]).column("label"))
    pool_groups, query_groups = group_codes(target_labels, pool_labels)  # the floor's numbering, one rule
    prep.pool_groups, prep.query_groups = pool_groups.astype(np.int32), query_groups.astype(np.int32)
    # the labels no searched pool row has: the precheck's rule, over the rows this search sees
    prep.missing_in_pool = dict(rules.labels_missing_in_pool(
        target_labels.to_pylist(), label_text(prep.targets.column("label")).to_pylist(),
        pool_labels.filter(pa.array(~prep.drop)).to_pylist()))


def search_range(spec: MiningSpec, source_path: Path, target_path: Path, queries: np.ndarray, drop: np.ndarray,
                 start: int = 0, end: int | None = None, dim: int | None = None,
                 on_block: Callable[[int], None] | None = None, query_groups: np.ndarray | None = None,
                 pool_groups: np.ndarray | None = None, kept: Kept | None = None) -> Searched:
    """The exact top-n of every query within pool rows [start, end) (the whole pool by
    default), read block by block: `drop` marks this range's rows to leave out, and under
    cosine all-zero vectors are left out and counted. `dim` is the pool's vector length when
    the range does not start at row 0 (every block must match the first). `on_block` hears
    the pool row reached after each block. With `query_groups` and this range's `pool_groups`
    (label_mode=per_label) each query is searched among the rows of its own group only. `kept`
    (the guard in the search) keeps the candidates' vectors as they stream past."""
    metric, column = spec.knn_metric, spec.source_embed_column_name
    top: RunningTopK | GroupedTopK | None = None
    if len(queries):
        k = search_width(spec)
        top = RunningTopK(queries, k, metric) if query_groups is None else GroupedTopK(queries, query_groups, k, metric)
    found = Searched(state=None, kept=kept)
    seen = start
    for vectors in tables.read_ahead(pool_vectors(source_path, column, spec.block_rows, start, end, dim)):
        if len(queries) and len(vectors) and vectors.shape[1] != queries.shape[1]:
            raise DeftError(
                "dimension_mismatch",
                f"source_parquet {source_path} column '{column}' holds {vectors.shape[1]}-d "
                f"vectors but target_parquet {target_path} column '{spec.target_embed_column_name}' holds "
                f"{queries.shape[1]}-d ones",
                fix="embed both files with the same encoder (the same model and model_path)",
                field="source_parquet", source_dim=int(vectors.shape[1]), target_dim=int(queries.shape[1]),
            )
        rows = len(vectors)
        ids, span = np.arange(seen, seen + rows, dtype=np.int64), slice(seen - start, seen - start + rows)
        skip = drop[span].copy()
        if metric is Metric.cosine:
            flat = ~vectors.any(axis=1) & ~skip
            if flat.any():
                found.flat += int(flat.sum())
                # Five examples are reported in all: no range needs more than five of its own.
                if sum(map(len, found.flat_rows)) < 5:
                    found.flat_rows.append(ids[flat][:3].tolist())
                skip |= flat
        # The grouped search (given query_groups, only ever with pool_groups) also takes the rows' groups.
        groups = [] if pool_groups is None else [pool_groups[span]]
        if skip.any():
            vectors, ids, *groups = (part[~skip] for part in (vectors, ids, *groups))
        if top is not None:
            top.add(vectors, ids, *groups)
            if kept is not None:
                kept.update(top.state.ids, vectors, ids)
        found.searched += len(ids)
        seen += rows
        if on_block is not None:
            on_block(seen)
    found.rows = seen - start
    found.state = top.state if top is not None else None
    return found


def merge(parts: list[Searched], k: int) -> Searched:
    """Row ranges' searches, given in pool order, as one search of them all (the same tie rule)."""
    merged = Searched(state=None)
    for part in parts:
        if part.state is not None:
            merged.state = part.state if merged.state is None else merged.state.merged(part.state, k)
        merged.rows += part.rows
        merged.searched += part.searched
        merged.flat += part.flat
        merged.flat_rows += part.flat_rows
        if part.kept is not None:
            merged.kept = part.kept if merged.kept is None else merged.kept.merged(part.kept)
    return merged


def finish(prep: Prepared, found: Searched) -> MiningOutcome:
    """The search turned into the outcome, stage by stage: candidates read back, the pair
    filters (the label rule, then the floor), the mode's selection, the summary; and their warnings."""
    raised = _search_warnings(prep, found)
    t0 = time.perf_counter()
    cands = candidates(prep, found)
    filtered, raw, audit = floor_stage(prep, cands, pair_filters(prep, cands))
    mined = mode_of(prep.spec).select(cands, filtered.keep)
    floor = None if raw is None else FloorStage(prep.spec.floor_rule, prep.spec.floor, raw, mined.num_rows, audit)
    if floor is not None:
        mined = floor.kept_table(mined)
    unique = mined.num_rows
    pairs = _pairs_table(prep, cands, filtered.keep, None if prep.spec.floor is None else
                         filtered.agree & ~filtered.within)
    prep.timings["collect"] = time.perf_counter() - t0
    mined, near_duplicates, identical = near_duplicate_stage(prep, cands, filtered.keep, mined)
    summary = summarise(prep, found, cands, filtered, unique)
    if near_duplicates is not None:  # counted when the collapse is on, or bytes repeat
        summary.identical_images, summary.mined = identical, mined.num_rows
        if prep.spec.dedup is not None:
            summary.near_duplicates_removed = near_duplicates.num_rows - identical
    raised += _control_warnings(prep, cands, filtered)
    if filtered.null_labels:
        raised.append(warnings.label_null(filtered.null_labels, int(cands.found.sum())))
    prep.timings["total"] = time.perf_counter() - prep.started
    return MiningOutcome(mined=mined, pairs=pairs, summary=summary, searched_rows=found.searched,
                         label_missing=prep.label_missing, timings=prep.timings, warnings=raised, floor=floor,
                         near_duplicates=near_duplicates, leaks=prep.leaks)


def near_duplicate_stage(prep: Prepared, cands: Candidates, keep: np.ndarray,
                         mined: pa.Table) -> tuple[pa.Table, pa.Table | None, int]:
    """The mined images walked in their order (target order, then rank): one whose file's bytes
    repeat an earlier mined image's is dropped (always), then with dedup_similarity / dedup_distance
    one within the threshold of an image kept before it: the mined table left, near_duplicates.parquet's
    table (None when the collapse is off and no bytes repeat), and the identical images. An image's
    vector is its pool row's in its first kept pair (as the floor's audit takes it), read back for
    just the rows the threshold judges."""
    threshold, metric = prep.spec.dedup, prep.spec.knn_metric
    t0 = time.perf_counter()
    names = mined.column("filepath").to_pylist()
    twin = dedup.identical(names, prep.spec.pool_root(prep.source_path))
    if threshold is None and not (twin >= 0).any():
        return mined, None, 0
    near = None
    if threshold is not None:
        t, r = np.nonzero(keep)
        paths = pa.array(cands.paths[t, r].tolist(), pa.string()).dictionary_encode()
        first = np.unique(paths.indices.to_numpy(zero_copy_only=False), return_index=True)[1]
        at = pc.index_in(mined.column("filepath"), value_set=paths.dictionary).to_numpy(zero_copy_only=False)
        vectors = _pool_rows_vectors(prep, cands.rows[t, r][first][at[twin < 0]])
        near = dedup.collapse(vectors, metric, threshold)
    found = dedup.with_identical(twin, near)
    prep.timings["dedup"] = time.perf_counter() - t0
    return mined.filter(pa.array(found.keep)), dedup.table(names, found, metric), int((twin >= 0).sum())


def floor_stage(prep: Prepared, cands: Candidates,
                filtered: Filtered) -> tuple[Filtered, pa.Table | None, pa.Table | None]:
    """With a floor, its stage: the raw candidates (the mode's selection over the pairs the label
    rule kept, before the floor) and, under `best_target`, their audit. Under `pair` the verdicts
    stand as pair_filters gave them; under `best_target` a pair reaches the floor when its pool
    image does (the image's best similarity over all targets, the same-label ones under the
    label filter, reaches it), so the selection keeps just the images the audit kept."""
    spec = prep.spec
    if spec.floor is None:
        return filtered, None, None
    raw = mode_of(spec).select(cands, filtered.agree)
    if spec.floor_rule is FloorRule.pair:
        return filtered, raw, None
    audit = _best_targets(prep, cands, filtered.agree, raw)
    kept_paths = raw.column("filepath").filter(audit.column("kept"))
    reaches = pc.is_in(pa.array(cands.paths.reshape(-1).tolist(), pa.string()), value_set=kept_paths)
    within = cands.found & reaches.to_numpy(zero_copy_only=False).reshape(cands.paths.shape)
    return dataclasses.replace(filtered, within=within), raw, audit


def _best_targets(prep: Prepared, cands: Candidates, agree: np.ndarray, raw: pa.Table) -> pa.Table:
    """The loop's audit of each raw candidate (raw's order): its best cosine similarity over the
    searched targets (under the label filter those whose label key is its own), the target that
    gave it (the first in file order on a tie), and whether it reaches the floor. A candidate's
    vector and label are those of the pool row in its first kept pair."""
    t, r = np.nonzero(agree)  # target, then rank order: each file's first pair is where raw met it
    if not len(t):
        return pa.table({"filepath": raw.column("filepath"), "max_cosine_similarity": pa.array([], pa.float64()),
                         "matched_target_filepath": pa.array([], pa.string()), "kept": pa.array([], pa.bool_())})
    codes = pa.array(cands.paths[t, r].tolist(), pa.string()).dictionary_encode().indices
    first = np.unique(codes.to_numpy(zero_copy_only=False), return_index=True)[1]
    vectors = _pool_rows_vectors(prep, cands.rows[t, r][first])
    groups = (None, None)
    if prep.label_filter is LabelFilter.applied and cands.source_labels is not None:
        groups = group_codes(label_keys(prep.targets.column("label")),
                             label_keys(cands.source_labels[t, r][first].tolist()))
    best, index = best_matches(vectors, prep.queries, *groups)
    return pa.table({
        "filepath": raw.column("filepath"),
        "max_cosine_similarity": pa.array(best, pa.float64()),
        "matched_target_filepath": pa.array([str(cands.target_paths[i]) if i >= 0 else None for i in index],
                                            pa.string()),
        "kept": pa.array(best >= prep.spec.floor, pa.bool_()),
    })


def _pool_rows_vectors(prep: Prepared, rows: np.ndarray) -> np.ndarray:
    """The vectors of the given pool rows, in that order: only the row groups holding them are read."""
    column, wanted = prep.spec.source_embed_column_name, np.unique(rows)
    table = take_rows(prep.source_path, wanted, [column], prep.spec.block_rows, by_row_group=True)
    vectors = tables.vectors_from_column(table.column(column), path=prep.source_path, name=column, first_row=0,
                                        dim=None, field="source_parquet")  # searched already: none is bad
    return vectors[np.searchsorted(wanted, rows)]


def candidates(prep: Prepared, found: Searched) -> Candidates:
    """Each query's best pool rows (the mode's candidate count; the whole pool when smaller),
    their scores, and the filepaths and labels (as written) of just the rows found, read back."""
    k = min(mode_of(prep.spec).candidates, found.searched)
    best = (found.state or TopKState.empty(len(prep.queries))).neighbours(prep.spec.knn_metric)
    rows, scores = best.indices[:, :k], best.scores[:, :k]
    found_mask = rows >= 0  # a per-label search leaves the slots of a small label group empty (row -1)
    # The filepath (and label) of just the rows found: the columns are small beside the vectors.
    wanted = np.unique(rows[found_mask])
    source_labelled = Side.source not in prep.label_missing
    picked = take_rows(prep.source_path, wanted, ["filepath"] + (["label"] if source_labelled else []),
                       prep.spec.block_rows)
    position = np.searchsorted(wanted, rows)
    target_labels = None if Side.target in prep.label_missing else \
        np.asarray(label_text(prep.targets.column("label")).to_pylist(), dtype=object)[:, None]
    return Candidates(
        target_paths=prep.targets.column("filepath").to_pylist(), rows=rows, scores=scores,
        paths=_gathered(picked.column("filepath").to_pylist(), position, found_mask), target_labels=target_labels,
        source_labels=_gathered(label_text(picked.column("label")).to_pylist(), position, found_mask)
        if source_labelled else None)


def take_rows(path: Path, rows: np.ndarray, columns: list[str], block_rows: int,
              by_row_group: bool = False) -> pa.Table:
    """The given (sorted, unique) rows of `columns`, in that order, read block by block: a large
    pool's filepath and label columns are never held whole (prepare already holds its paths).
    `by_row_group`: a parquet's row groups holding none of the rows are not read at all (worth
    it for vectors, which dwarf the rest)."""
    taken, start = [], 0
    batches = _row_groups_holding(path, rows, columns, block_rows) if by_row_group and not tables.is_csv(path) \
        else ((None, batch) for batch in tables.iter_batches(path, block_rows, columns))
    for first, batch in batches:
        start = start if first is None else first
        lo, hi = np.searchsorted(rows, [start, start + batch.num_rows])
        if hi > lo:
            taken.append(pa.Table.from_batches([batch.take(pa.array(rows[lo:hi] - start))]))
        start += batch.num_rows
        if hi == len(rows):
            break
    schema = tables.schema_of(path)
    return pa.concat_tables(taken) if taken else pa.schema([schema.field(c) for c in columns]).empty_table()


def _row_groups_holding(path: Path, rows: np.ndarray, columns: list[str],
                        block_rows: int) -> Iterator[tuple[int, pa.RecordBatch]]:
    """(first row, batch) over just the row groups of a parquet that hold any of the (sorted) rows."""
    file = pq.ParquetFile(path, pre_buffer=False)
    sizes = [file.metadata.row_group(g).num_rows for g in range(file.metadata.num_row_groups)]
    firsts = np.cumsum([0, *sizes])
    hit = np.unique(np.searchsorted(firsts, rows, side="right") - 1)
    for group in hit.tolist():
        start = int(firsts[group])
        for batch in file.iter_batches(batch_size=block_rows, row_groups=[group], columns=columns):
            yield start, batch
            start += batch.num_rows


@dataclass(frozen=True)
class Filtered:
    """The pair filters' verdicts, each over every pair found; the container's order: the label
    rule first, then the floor (distance_threshold) on the pairs it kept."""

    agree: np.ndarray  # the label rule keeps it (every pair found unless the filter is applied)
    within: np.ndarray  # it reaches the floor (every pair found when there is none)
    null_labels: int = 0  # pairs the label rule dropped because a side's label is null

    @property
    def keep(self) -> np.ndarray:
        return self.agree & self.within


def pair_filters(prep: Prepared, cands: Candidates) -> Filtered:
    """The label rule (label keys equal, neither null) and the floor (on the exact float64
    scores, so a pair on the floor itself is kept, reproducibly) for every pair found."""
    scores, floor, found = cands.scores, prep.spec.floor, cands.found
    within = found if floor is None else found & (scores >= floor if prep.spec.knn_metric.higher_is_nearer
                                                  else scores <= floor)
    if prep.label_filter is not LabelFilter.applied:
        return Filtered(found, within)
    src, tgt = _keys(cands.source_labels), _keys(cands.target_labels)
    null = found & ((src == None) | (tgt == None))  # noqa: E711
    return Filtered(found & (src == tgt) & ~null, within, int(null.sum()))


def _keys(labels: np.ndarray) -> np.ndarray:
    """An object array of labels as written, as their keys (label_keys), in the same shape."""
    return np.asarray(label_keys(labels.reshape(-1).tolist()).to_pylist(), dtype=object).reshape(labels.shape)


def summarise(prep: Prepared, found: Searched, cands: Candidates, filtered: Filtered, mined: int) -> MiningSummary:
    """The summary from the stages' counts; the controls' and the left-out rows' counts only
    when there are some (a default run's summary reads as it always has). Under floor_rule
    best_target the floor judges images, and a pair goes with its pool image: `below_floor`
    counts the pairs the label rule kept whose image the floor dropped, `duplicates_removed` the
    remaining pairs less the images mined, `targets_without_neighbours` the targets none of whose
    pairs' images was kept; `pairs`, `kept_pairs` and `dropped_pairs` are the label rule's as ever."""
    spec, queries, pairs = prep.spec, len(prep.queries), int(cands.found.sum())
    agree, kept = int(filtered.agree.sum()), int(filtered.keep.sum())
    applied = prep.label_filter is LabelFilter.applied
    controls = spec.floor is not None or prep.query_groups is not None
    return MiningSummary(
        queries=queries, topn=spec.topn, neighbours_requested=queries * spec.topn, pool=found.searched,
        pairs=pairs, kept_pairs=agree if applied else None, dropped_pairs=pairs - agree if applied else None,
        below_floor=None if spec.floor is None else agree - kept, distance_threshold=spec.threshold,
        duplicates_removed=kept - mined, mined=mined, target_in_pool=prep.in_pool,
        targets_without_neighbours=len(_alone(filtered.keep)) if controls else None,
        duplicate_paths=int(prep.repeated.sum()) or None, zero_vectors=prep.zero_targets + found.flat or None,
        label_filter=prep.label_filter)


def _alone(keep: np.ndarray) -> np.ndarray:
    """The targets that kept no pair."""
    return np.flatnonzero(~keep.any(axis=1))


def _search_warnings(prep: Prepared, found: Searched) -> list[ToolWarning]:
    """What the search left out: repeated pool files, all-zero vectors (none searchable at all is
    an error), target labels no pool row has."""
    examples = list(prep.zero_examples)
    for rows in found.flat_rows:  # the examples, block by block in pool order
        if len(examples) < 5:
            examples += [str(p) for p in prep.pool_paths.take(pa.array(rows)).to_pylist()]
    if not found.searched and found.flat:
        raise _all_zero(prep.source_path, "source_parquet", prep.spec.source_embed_column_name)
    raised: list[ToolWarning] = []
    if prep.repeated.any():
        repeated = np.flatnonzero(prep.repeated)
        raised.append(warnings.duplicate_paths(
            len(repeated), list(dict.fromkeys(prep.pool_paths.take(pa.array(repeated[:20])).to_pylist()))[:5]))
    if prep.zero_targets or found.flat:
        raised.append(warnings.zero_vectors({Side.target.input: prep.zero_targets, Side.source.input: found.flat},
                                            examples[:5]))
    if prep.missing_in_pool:
        raised.append(warnings.label_missing_in_pool(prep.missing_in_pool))
    return raised


def _control_warnings(prep: Prepared, cands: Candidates, filtered: Filtered) -> list[ToolWarning]:
    """With a floor or a per-label search: the targets left without a pair, a floor that dropped all."""
    spec, raised = prep.spec, []
    if spec.floor is None and prep.query_groups is None:
        return raised
    if len(alone := _alone(filtered.keep)):
        raised.append(warnings.targets_without_neighbours(
            [str(cands.target_paths[i]) for i in alone[:10]], len(alone), len(prep.queries),
            spec.floor is not None, prep.query_groups is not None))
    # the floor judges the pairs the label rule kept: it dropped them all
    pairs = int(filtered.agree.sum())
    if spec.floor is not None and pairs and not filtered.keep.any():
        scores, cosine = cands.scores[filtered.agree], spec.knn_metric.higher_is_nearer
        best = float(scores.max() if cosine else scores.min())
        if spec.distance_threshold >= 0:  # said in the key the spec gave, the container's distance
            key, floor, best = "distance_threshold", spec.distance_threshold, 1.0 - best if cosine else best
        else:
            key, floor = ("min_similarity" if cosine else "max_distance"), spec.floor
        raised.append(warnings.floor_removed_all(pairs, key, floor, best))
    return raised


def _gathered(values: list, position: np.ndarray, found_mask: np.ndarray) -> np.ndarray:
    """`values[position]` as an object array shaped like `position`, None where nothing was found."""
    out = np.full(position.shape, None, dtype=object)
    out[found_mask] = np.asarray(values, dtype=object)[position[found_mask]]
    return out


def _require_vector_column(path: Path, schema: pa.Schema, column: str, side: Side) -> None:
    """A vector column under another name is named in the refusal, with the two ways out."""
    if column in schema.names:
        return
    key = f"{side}_embed_column_name"
    found = [f.name for f in schema if tables.is_vector_type(f.type) and f.name != column]
    hint = (f"; it has a vector column {', '.join(repr(n) for n in found)}" if found else "")
    raise DeftError(
        "column_missing",
        f"{side}_parquet {path} has no column '{column}'{hint}; its columns are: {', '.join(schema.names) or '(none)'}",
        fix=(f"rename the column {found[0]!r} to {column!r} in the file, or pass {key}={found[0]}" if found else
             f"embed the file first (deft-mine embed writes the vectors as {column!r}), or name its vector "
             f"column with {key}"),
        path=str(path), field=key, missing=[column], found=found, columns=list(schema.names),
    )


def _require_no_null_paths(column: pa.ChunkedArray | pa.Array, path: Path, field: str) -> None:
    """An embedding file's rows must each name their image: a null one could not be mined or reported."""
    row = tables.first_null(column)
    if row is not None:
        raise DeftError(
            "column_invalid",
            f"{field} {path}: filepath is null in row {row} ({column.null_count} null rows in all)",
            fix="every row of an embedding file needs a filepath; re-embed from the listing "
                "(embed skips rows without one, counted)",
            path=str(path), field=field, column="filepath", row=row, count=column.null_count,
        )


def _all_zero(path: Path, field: str, column: str) -> DeftError:
    return DeftError(
        "embedding_invalid",
        f"{field} {path}: every vector in column '{column}' is all zeros, so none has a cosine "
        "similarity to anything (flat images under the thumbnail encoder?)",
        fix="check the images, or use knn_metric=euclidean / manhattan, under which zero vectors have distances",
        path=str(path), field=field, column=column,
    )


def _pairs_table(prep: Prepared, cands: Candidates, keep: np.ndarray, below_floor: np.ndarray | None) -> pa.Table:
    """One row per pair found: which target (its row in the target file), its rank-th
    neighbour, the score, whether it was kept (by the floor and the label filter), both labels
    when the files have them, and with a floor whether it dropped the pair (after the label filter kept
    it: a pair is kept, dropped by the label filter, or dropped by the floor). Empty slots of a
    per-label search are no pairs."""
    queries, k = cands.rows.shape
    columns = {
        "target_filepath": pa.array(np.repeat(np.asarray(cands.target_paths, dtype=object), k).tolist(), pa.string()),
        "target_row": pa.array(np.repeat(prep.target_rows, k), pa.int64()),
        "rank": pa.array(np.tile(np.arange(1, k + 1), queries), pa.int32()),
        "filepath": pa.array(cands.paths.reshape(-1).tolist(), pa.string()),
        "source_row": pa.array(cands.rows.reshape(-1), pa.int64()),
        "score": pa.array(cands.scores.reshape(-1), pa.float64()),
        "kept": pa.array(keep.reshape(-1), pa.bool_()),
    }
    if cands.target_labels is not None:
        columns["target_label"] = pa.array(np.repeat(cands.target_labels[:, 0], k).tolist(), pa.string())
    if cands.source_labels is not None:
        columns["source_label"] = pa.array(cands.source_labels.reshape(-1).tolist(), pa.string())
    if below_floor is not None:
        columns["below_floor"] = pa.array(below_floor.reshape(-1), pa.bool_())
    table = pa.table(columns)
    return table if cands.found.all() else table.filter(pa.array(cands.found.reshape(-1)))


def pool_vectors(path: Path, column: str, block_rows: int, start: int = 0, end: int | None = None,
                 dim: int | None = None) -> Iterator[np.ndarray]:
    """The pool's vectors in rows [start, end) (default: all), block by block, validated;
    every block must have the first block's dimension (`dim`, when known)."""
    seen = start
    batches = tables.iter_batches(path, block_rows, [column]) if end is None else \
        row_range(path, column, start, end, block_rows)
    for batch in batches:
        vectors = tables.vectors_from_column(batch.column(column), path=path, name=column,
                                            first_row=seen, dim=dim, field="source_parquet")
        dim = vectors.shape[1]
        yield vectors
        seen += batch.num_rows


def pool_dim(path: Path, column: str) -> int | None:
    """The length of the pool's first vector: every later block must match it."""
    for batch in tables.iter_batches(path, 1, [column]):
        first = batch.column(column)[0]
        return len(first) if first.is_valid else None
    return None


def row_range(path: Path, column: str, start: int, end: int, block_rows: int) -> Iterator[pa.Table]:
    """Rows [start, end) of a parquet's `column` in blocks of `block_rows` (cut at start +
    multiples of it), reading only the row groups they lie in."""
    file = pq.ParquetFile(path, pre_buffer=False)
    sizes = [file.metadata.row_group(g).num_rows for g in range(file.metadata.num_row_groups)]
    firsts = np.cumsum([0, *sizes])
    groups = [g for g in range(len(sizes)) if firsts[g] < end and firsts[g + 1] > start]
    if not groups:
        return
    row = int(firsts[groups[0]])
    pending: list[pa.RecordBatch] = []
    buffered, at = 0, start  # rows held, and the first row not yet yielded
    for batch in file.iter_batches(batch_size=block_rows, row_groups=groups, columns=[column]):
        lo, hi = max(start, row), min(end, row + batch.num_rows)
        if hi > lo:
            pending.append(batch.slice(lo - row, hi - lo))
            buffered += hi - lo
        row += batch.num_rows
        while buffered and buffered >= min(block_rows, end - at):
            table = pa.Table.from_batches(pending)
            take = min(block_rows, end - at)
            yield table.slice(0, take)
            rest = table.slice(take)
            pending, buffered, at = rest.to_batches(), rest.num_rows, at + take
        if row >= end:
            break


# Paths that normpath would change: "./", "../", "//" segments or a trailing slash.
_NOT_NORMAL = r"(^|/)\.{1,2}(/|$)|//|/$"


def _pool_paths(path: Path, target_set: set[str]) -> tuple[pa.StringArray, np.ndarray, np.ndarray]:
    """The pool's filepaths (lexically normal), whether each row repeats an earlier row's file,
    and whether it names a target; vectorised, normalising only the odd-looking paths."""
    column = tables.read_columns(path, ["filepath"]).column("filepath")
    _require_no_null_paths(column, path, "source_parquet")
    paths = column.combine_chunks()
    if not pa.types.is_string(paths.type):
        paths = pc.cast(paths, pa.string())
    odd = pc.match_substring_regex(paths, _NOT_NORMAL).to_numpy(zero_copy_only=False)
    if odd.any():
        normal = [lexically_normal(p) for p in paths.filter(pa.array(odd)).to_pylist()]
        paths = pc.replace_with_mask(paths, pa.array(odd), pa.array(normal, pa.string()))
    codes = paths.dictionary_encode().indices.to_numpy(zero_copy_only=False)
    repeated = np.ones(len(paths), dtype=bool)
    repeated[np.unique(codes, return_index=True)[1]] = False  # each file's first row is searched
    is_target = pc.is_in(paths, value_set=pa.array(sorted(target_set), pa.string())).to_numpy(zero_copy_only=False)
    return paths, repeated, is_target


def label_text(labels: pa.Array | pa.ChunkedArray | list[Any]) -> pa.Array:
    """Labels as written, as text (3 is "3"); a null stays null."""
    array = labels.combine_chunks() if isinstance(labels, pa.ChunkedArray) else \
        labels if isinstance(labels, pa.Array) else pa.array(labels)
    return array if pa.types.is_string(array.type) else pc.cast(array, pa.string())


def label_key(value: str | None) -> str | None:
    """One label (as text, label_text's) as the TAO container compares it, wherever a label is
    compared (the post-filter, per-label groups, the breakdowns, unique matching's classes):
    `str(label).strip().upper()`, so ` missing` and `MISSING` agree. A null stays null and matches
    nothing (the container's `str(None)` would make two nulls agree, by accident). Python's own
    rule: exact, also where one letter upper-cases to two (ß is SS)."""
    return None if value is None else value.strip().upper()


def label_keys(labels: pa.Array | pa.ChunkedArray | list[Any]) -> pa.Array:
    """Labels as their keys (label_key), each distinct label once."""
    text = label_text(labels).dictionary_encode()
    keys = pa.array([label_key(value) for value in text.dictionary.to_pylist()], pa.string())
    return keys.take(text.indices)


def label_spellings(labels: list[Any]) -> dict[str, list[str]]:
    """Each label key's spellings as written, in order of first appearance (nulls left out)."""
    spellings: dict[str, list[str]] = {}
    for text, key in zip(label_text(labels).to_pylist(), label_keys(labels).to_pylist()):
        if key is not None and text not in (seen := spellings.setdefault(key, [])):
            seen.append(text)
    return spellings


def count_labels(labels: list[Any], names: dict[str, str] | None = None) -> dict[str, int]:
    """How many rows carry each label, counted by its key and shown as written (the key's first
    spelling, or its name in `names`); nulls counted under "(null)"; sorted."""
    names = names if names is not None else {key: seen[0] for key, seen in label_spellings(labels).items()}
    counts = pc.value_counts(label_keys(labels))
    return dict(sorted(("(null)" if key is None else names.get(key, key), int(n)) for key, n in
                       zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist())))


def label_counts(target_embed: Path, source_embed: Path, mined: Path) -> dict[str, Any] | None:
    """Per-label counts of targets and of mined images (None when a side has no label)."""
    if not all("label" in tables.schema_of(p).names for p in (target_embed, source_embed)):
        return None
    targets = tables.read_columns(target_embed, ["label"]).column("label")
    mined_paths = tables.read_columns(mined, ["filepath"]).column("filepath")
    pool = tables.read_columns(source_embed, ["filepath", "label"])
    # Each mined path's first pool row (a path listed twice in the pool counts once), null if none.
    first = pc.index_in(mined_paths, value_set=pool.column("filepath").cast(pa.string()))
    sides = {"targets": label_text(targets).to_pylist(), "mined": label_text(pool.column("label").take(first)).to_pylist()}
    # One name per class on both sides: its first spelling; the spellings merged into one are said.
    spellings = label_spellings(sides["targets"] + sides["mined"])
    names = {key: seen[0] for key, seen in spellings.items()}
    return {**{side: count_labels(labels, names) for side, labels in sides.items()},
            "merged": {names[key]: seen for key, seen in spellings.items() if len(seen) > 1}}
