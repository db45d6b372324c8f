"""Mining semantics: pool streamed in blocks through exact k-NN, label post-filter, de-duplication."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from deft_mine.engine import tables
from deft_mine.engine.knn import RunningTopK
from deft_mine.schemas import warnings
from deft_mine.schemas.specs import Metric, MiningSpec
from deft_mine.schemas.warnings import ToolWarning
from deft_mine.errors import DeftError
from deft_mine.events import Events


@dataclass
class MiningOutcome:
    mined: pa.Table  # filepath first, then score, best_target, hits
    pairs: pa.Table  # every (target, neighbour) pair found, in target then rank order
    summary: dict[str, int]
    searched_rows: int  # rows searched (pool less excluded targets)
    target_in_pool: int
    label_filter: str  # "off" | "applied" | "noop"
    label_missing: list[str]  # sides ("source", "target") without a `label` column
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[ToolWarning] = field(default_factory=list)  # duplicate_paths, zero_vectors


def lexically_normal(filepath: str) -> str:
    """The path with `./`, `../`, `//` and a trailing slash resolved on paper (relative stays
    relative): how a pool row and a target are judged to name the same file."""
    return os.path.normpath(filepath)


def mine_files(source_path: Path, target_path: Path, spec: MiningSpec, events: Events) -> MiningOutcome:
    """Find each target's `topn` nearest pool rows and turn the pairs into unique mined paths."""
    topn, metric, block_rows = spec.topn, spec.knn_metric, spec.block_rows
    source_column, target_column = spec.source_embed_column_name, spec.target_embed_column_name
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    src_schema = tables.schema_of(source_path)
    tgt_schema = tables.schema_of(target_path)
    for path, schema, column, side in ((source_path, src_schema, source_column, "source"),
                                       (target_path, tgt_schema, target_column, "target")):
        _require_vector_column(path, schema, column, side)
        tables.require_columns(path, schema, ["filepath", column], f"{side}_parquet")
    label_missing = [side for side, sch in (("source", src_schema), ("target", tgt_schema))
                     if "label" not in sch.names]
    label_filter = spec.label_filter(label_missing)

    # Labels are read whenever a side has them: the pairs table records them for the report.
    tgt_cols = ["filepath", target_column] + (["label"] if "target" not in label_missing else [])
    targets = tables.read_columns(target_path, tgt_cols)
    _require_no_null_paths(targets.column("filepath"), target_path, "target_parquet")
    queries = tables.vectors_from_column(targets.column(target_column), path=target_path,
                                        name=target_column, first_row=0, dim=None, field="target_parquet")
    target_set = {lexically_normal(str(p)) for p in targets.column("filepath").to_pylist()}
    # Under cosine an all-zero vector (the thumbnail encoder's flat image) has no direction:
    # as a query every pool row would tie at 0, and the "neighbours" would be the first rows.
    zero = {"targets": 0, "source": 0}
    zero_examples: list[str] = []
    target_rows = np.arange(len(queries))
    flat = ~queries.any(axis=1) if metric is Metric.cosine else np.zeros(len(queries), bool)
    if flat.any():
        zero["targets"] = int(flat.sum())
        zero_examples += [str(p) for p in targets.column("filepath").take(pa.array(np.flatnonzero(flat)[:3])).to_pylist()]
        if flat.all():
            raise _all_zero(target_path, "target_parquet", target_column)
        target_rows = np.flatnonzero(~flat)
        queries, targets = queries[target_rows], targets.take(pa.array(target_rows))
    target_paths = targets.column("filepath").to_pylist()

    # Pass 0: the pool's filepath column, whole (paths are small beside vectors): which rows
    # repeat an earlier row's file and which are targets, vectorised over the pool.
    t0 = time.perf_counter()
    pool_paths, repeated, is_target = _pool_paths(source_path, target_set)
    # Pass 1: vectors only, block by block.
    total = len(pool_paths)
    top = RunningTopK(queries, topn, metric) if len(queries) else None
    seen = searched = 0
    in_pool = int((is_target & ~repeated).sum())
    events.progress("mine", 0, total)
    blocks = _pool_blocks(source_path, source_column, block_rows)
    for vectors in tables.read_ahead(blocks):
        if len(queries) and len(vectors) and vectors.shape[1] != queries.shape[1]:
            raise DeftError(
                "dimension_mismatch",
                f"source_parquet {source_path} column '{source_column}' holds {vectors.shape[1]}-d "
                f"vectors but target_parquet {target_path} column '{target_column}' holds "
                f"{queries.shape[1]}-d ones",
                fix="embed both files with the same encoder (the same model and model_path)",
                field="source_parquet", source_dim=int(vectors.shape[1]), target_dim=int(queries.shape[1]),
            )
        rows = len(vectors)
        ids = np.arange(seen, seen + rows, dtype=np.int64)
        drop = repeated[seen:seen + rows].copy()
        if spec.exclude_targets:
            drop |= is_target[seen:seen + rows]
        if metric is Metric.cosine:
            flat = ~vectors.any(axis=1) & ~drop
            if flat.any():
                zero["source"] += int(flat.sum())
                if len(zero_examples) < 5:
                    zero_examples += [str(p) for p in pool_paths.take(pa.array(ids[flat][:3])).to_pylist()]
                drop |= flat
        if drop.any():
            vectors, ids = vectors[~drop], ids[~drop]
        if top is not None:
            top.add(vectors, ids)
        searched += len(ids)
        seen += rows
        events.progress("mine", seen, total)
    timings["search"] = time.perf_counter() - t0
    if not searched and zero["source"]:
        raise _all_zero(source_path, "source_parquet", source_column)
    found_warnings: list[ToolWarning] = []
    if repeated.any():
        rows_repeated = np.flatnonzero(repeated)
        found_warnings.append(warnings.duplicate_paths(
            len(rows_repeated), list(dict.fromkeys(pool_paths.take(pa.array(rows_repeated[:20])).to_pylist()))[:5]))
    if zero["targets"] or zero["source"]:
        found_warnings.append(warnings.zero_vectors(zero, zero_examples[:5]))

    k = min(topn, searched)
    if top is not None and k:
        found = top.result()
        indices, scores = found.indices[:, :k], found.scores[:, :k]
    else:
        indices = np.zeros((len(queries), 0), np.int64)
        scores = np.zeros((len(queries), 0), np.float64)

    # Pass 2: filepath (and label) of just the rows that were found.
    t0 = time.perf_counter()
    wanted = np.unique(indices)
    src_cols = ["filepath"] + (["label"] if "source" not in label_missing else [])
    picked = _take_rows(source_path, wanted, src_cols, block_rows)
    position = np.searchsorted(wanted, indices)
    src_paths = np.asarray(picked["filepath"], dtype=object)[position] if indices.size else \
        np.zeros(indices.shape, dtype=object)

    pairs = int(indices.size)
    keep = np.ones(indices.shape, dtype=bool)
    tgt_col = src_labels = None
    if "target" not in label_missing:
        tgt_col = np.asarray(_labels_as_str(targets.column("label")), dtype=object)[:, None]
    if "source" not in label_missing:
        src_labels = np.asarray(_labels_as_str(picked["label"]), dtype=object)[position] \
            if indices.size else np.zeros(indices.shape, dtype=object)
    if label_filter == "applied":
        keep = (src_labels == tgt_col) & (src_labels != None) & (tgt_col != None)  # noqa: E711

    mined = _dedupe(src_paths, scores, keep, target_paths, metric)
    pairs_table = _pairs_table(target_paths, target_rows, indices, src_paths, scores, keep, tgt_col, src_labels)
    timings["collect"] = time.perf_counter() - t0
    summary = {
        "queries": len(queries),
        "topn": topn,
        "neighbours_requested": len(queries) * topn,
        "pool": searched,
        "pairs": pairs,
    }
    if label_filter == "applied":
        summary["kept_pairs"] = int(keep.sum())
        summary["dropped_pairs"] = pairs - int(keep.sum())
    summary["duplicates_removed"] = int(keep.sum()) - mined.num_rows
    summary["mined"] = mined.num_rows
    summary["target_in_pool"] = in_pool
    # Rows left out of the search, only when there are some (the summary's usual keys stay as they were).
    if repeated.any():
        summary["duplicate_paths"] = int(repeated.sum())
    if zero["targets"] or zero["source"]:
        summary["zero_vectors"] = zero["targets"] + zero["source"]
    timings["total"] = time.perf_counter() - t_start
    return MiningOutcome(mined=mined, pairs=pairs_table, summary=summary, searched_rows=searched,
                         target_in_pool=in_pool, label_filter=label_filter,
                         label_missing=label_missing, timings=timings, warnings=found_warnings)


def _require_vector_column(path: Path, schema: pa.Schema, column: str, side: str) -> None:
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


def _pairs_table(target_paths: list, target_rows: np.ndarray, indices: np.ndarray, src_paths: np.ndarray,
                 scores: np.ndarray, keep: np.ndarray, tgt_labels: np.ndarray | None,
                 src_labels: np.ndarray | None) -> pa.Table:
    """One row per pair found: which target (its row in the target file), its rank-th
    neighbour, the score, whether the label filter kept it (and both labels when the files
    have them)."""
    queries, k = indices.shape
    columns = {
        "target_filepath": pa.array(np.repeat(np.asarray(target_paths, dtype=object), k).tolist(), pa.string()),
        "target_row": pa.array(np.repeat(target_rows, k), pa.int64()),
        "rank": pa.array(np.tile(np.arange(1, k + 1), queries), pa.int32()),
        "filepath": pa.array(src_paths.reshape(-1).tolist(), pa.string()),
        "source_row": pa.array(indices.reshape(-1), pa.int64()),
        "score": pa.array(scores.reshape(-1), pa.float64()),
        "kept": pa.array(keep.reshape(-1), pa.bool_()),
    }
    if tgt_labels is not None:
        columns["target_label"] = pa.array(np.repeat(tgt_labels[:, 0], k).tolist(), pa.string())
    if src_labels is not None:
        columns["source_label"] = pa.array(src_labels.reshape(-1).tolist(), pa.string())
    return pa.table(columns)


def _pool_blocks(path: Path, column: str, block_rows: int) -> Iterator[np.ndarray]:
    """The pool's vectors block by block, validated; every block must have the first's dimension."""
    seen, dim = 0, None
    for batch in tables.iter_batches(path, block_rows, [column]):
        vectors = tables.vectors_from_column(batch.column(column), path=path, name=column,
                                            first_row=seen, dim=dim, field="source_parquet")
        dim = vectors.shape[1]
        yield vectors
        seen += batch.num_rows


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


def _take_rows(path: Path, rows: np.ndarray, columns: list[str], block_rows: int) -> dict[str, list]:
    """The given (sorted, unique) row numbers of `columns`, in that order, read in blocks."""
    out: dict[str, list] = {c: [] for c in columns}
    start = 0
    for batch in tables.iter_batches(path, block_rows, columns):
        end = start + batch.num_rows
        lo, hi = np.searchsorted(rows, [start, end])
        if hi > lo:
            taken = batch.take(pa.array(rows[lo:hi] - start))
            for c in columns:
                out[c].extend(taken.column(c).to_pylist())
        start = end
        if hi == len(rows):
            break
    return out


def count_labels(labels: list[Any]) -> dict[str, int]:
    """How many rows carry each label (as a string; nulls counted under "(null)"), sorted."""
    tally: dict[str, int] = {}
    for label in labels:
        key = "(null)" if label is None else str(label)
        tally[key] = tally.get(key, 0) + 1
    return dict(sorted(tally.items()))


def label_counts(target_embed: Path, source_embed: Path, mined: Path) -> dict[str, Any] | None:
    """Per-label counts of targets and of mined images (None when a side has no label)."""
    if not all("label" in tables.schema_of(p).names for p in (target_embed, source_embed)):
        return None
    targets = tables.read_columns(target_embed, ["label"]).column("label")
    mined_paths = tables.read_columns(mined, ["filepath"]).column("filepath")
    pool = tables.read_columns(source_embed, ["filepath", "label"])
    pool = pool.filter(pc.is_in(pool.column("filepath"), value_set=mined_paths.combine_chunks()))
    label_of: dict[str, Any] = {}
    for path, label in zip(pool.column("filepath").to_pylist(), pool.column("label").to_pylist()):
        label_of.setdefault(path, label)  # a path listed twice in the pool counts once

    return {"targets": count_labels(targets.to_pylist()),
            "mined": count_labels([label_of.get(p) for p in mined_paths.to_pylist()])}


def _labels_as_str(labels: pa.ChunkedArray | pa.Array | list) -> list[str | None]:
    """Labels compare as strings (3 and "3" agree); nulls stay None and match nothing."""
    array = pa.array(labels) if isinstance(labels, list) else labels
    if not pa.types.is_string(array.type) and not pa.types.is_large_string(array.type):
        array = pc.cast(array, pa.string())
    return array.to_pylist()


def _dedupe(paths: np.ndarray, scores: np.ndarray, keep: np.ndarray, target_paths: list,
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
