"""Exact mining on Ray: one task per pool shard finds every target's top-n within it (RunningTopK,
on the local backend's very blocks), the driver merges the shards with the same tie rule, then
label filter, de-duplication and the summary as engine/mining.py does them."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from deft_mine.backends.base import BackendMine
from deft_mine.backends.ray import as_data, cluster_cpus_gpus, task_error
from deft_mine.engine import tables
from deft_mine.engine.knn import RunningTopK
from deft_mine.engine.mining import (_all_zero, _dedupe, _labels_as_str, _pairs_table, _pool_paths,
                                     _require_no_null_paths, _require_vector_column, _take_rows,
                                     lexically_normal)
from deft_mine.errors import DeftError
from deft_mine.events import Events
from deft_mine.schemas import artifacts, warnings
from deft_mine.schemas.specs import Metric, MiningSpec
from deft_mine.schemas.warnings import ToolWarning

_SHARDS_PER_CPU = 4  # more shards than CPUs: a slow node holds up less of the search


def plan_shards(total: int, block_rows: int, cpus: float) -> list[tuple[int, int]]:
    """Contiguous row ranges that start on multiples of `block_rows`: each shard searches
    exactly the blocks the local backend would, so a bad row is named the same way."""
    blocks = -(-total // block_rows)
    if blocks == 0:
        return []
    count = max(1, min(blocks, _SHARDS_PER_CPU * max(1, int(cpus))))
    edges = np.linspace(0, blocks, count + 1).round().astype(int)
    return [(int(a) * block_rows, min(int(b) * block_rows, total)) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def _blocks(path: str, column: str, start: int, end: int, block_rows: int) -> Iterator[pa.Table]:
    """Rows [start, end) of `column`, cut at multiples of `block_rows`, reading only the row
    groups they lie in."""
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


def search_shard(path: str, column: str, start: int, end: int, block_rows: int, first_dim: int | None,
                 queries: np.ndarray, topn: int, metric: Metric, drop_rows: np.ndarray,
                 target_path: str, target_column: str) -> dict[str, Any]:
    """One shard's pass 1 of mine_files: validate each block, leave out the rows the driver
    marked (repeated paths, excluded targets) and, under cosine, all-zero vectors, and keep
    the exact top-n per target (RunningTopK's own keys, so the driver's merge is the local
    merge)."""
    try:
        top = RunningTopK(queries, topn, metric) if len(queries) else None
        searched = flat_count = 0
        flat_examples: list[list[int]] = []  # per block with any, its first three rows
        seen = start
        for block in _blocks(path, column, start, end, block_rows):
            vectors = tables.vectors_from_column(block.column(column), path=Path(path), name=column,
                                                first_row=seen, dim=None if seen == 0 else first_dim,
                                                field="source_parquet")
            if len(queries) and len(vectors) and vectors.shape[1] != queries.shape[1]:
                raise DeftError(
                    "dimension_mismatch",
                    f"source_parquet {path} column '{column}' holds {vectors.shape[1]}-d "
                    f"vectors but target_parquet {target_path} column '{target_column}' holds "
                    f"{queries.shape[1]}-d ones",
                    fix="embed both files with the same encoder (the same model and model_path)",
                    field="source_parquet", source_dim=int(vectors.shape[1]), target_dim=int(queries.shape[1]),
                )
            rows = len(vectors)
            ids = np.arange(seen, seen + rows, dtype=np.int64)
            drop = drop_rows[seen - start:seen - start + rows].copy()
            if metric is Metric.cosine:
                flat = ~vectors.any(axis=1) & ~drop
                if flat.any():
                    flat_count += int(flat.sum())
                    flat_examples.append(ids[flat][:3].tolist())
                    drop |= flat
            if drop.any():
                vectors, ids = vectors[~drop], ids[~drop]
            if top is not None:
                top.add(vectors, ids)
            searched += len(ids)
            seen += rows
        return {"keys": top._keys if top is not None else None,  # exact float64, smaller is nearer
                "ids": top._ids if top is not None else None, "searched": searched, "flat": flat_count,
                "flat_examples": flat_examples, "rows": end - start}
    except DeftError as exc:
        return {"error": as_data(exc), "rows": end - start}


def _first_dim(path: Path, column: str) -> int | None:
    """The length of the pool's first vector: every later block must match it."""
    for batch in pq.ParquetFile(path, pre_buffer=False).iter_batches(batch_size=1, columns=[column]):
        first = batch.column(column)[0]
        return len(first) if first.is_valid else None
    return None


def _search(ray: Any, spec: MiningSpec, source_path: Path, target_path: Path, queries: np.ndarray,
            drop: np.ndarray, events: Events) -> tuple[RunningTopK | None, int, int, list[list[int]]]:
    """Pass 1 on the cluster: the merged top-n, rows searched, all-zero rows left out and
    examples of them (in the local backend's order)."""
    total = len(drop)
    cpus, _, _ = cluster_cpus_gpus(ray)
    shards = plan_shards(total, spec.block_rows, cpus)
    first_dim = _first_dim(source_path, spec.source_embed_column_name) if total else None
    task = ray.remote(search_shard).options(num_cpus=1, scheduling_strategy="SPREAD", max_retries=3)
    queries_ref = ray.put(queries)
    pending = {task.remote(str(source_path), spec.source_embed_column_name, a, b, spec.block_rows, first_dim,
                           queries_ref, spec.topn, spec.knn_metric, drop[a:b], str(target_path),
                           spec.target_embed_column_name): i
               for i, (a, b) in enumerate(shards)}
    events.log("info", f"mining {total} pool rows in {len(shards)} shard(s) on Ray")
    events.progress("mine", 0, total)
    results: dict[int, dict[str, Any]] = {}
    try:
        waiting = list(pending)
        while waiting:
            done, waiting = ray.wait(waiting, num_returns=1)
            results[pending[done[0]]] = ray.get(done[0])
            events.progress("mine", sum(r["rows"] for r in results.values()), total,
                            f"{len(results)}/{len(shards)} shards")
    except BaseException:
        for ref in pending:  # cancelled, or the cluster failed: no shard runs on for nobody
            ray.cancel(ref, force=True)
        raise
    failed = [results[i]["error"] for i in sorted(results) if "error" in results[i]]
    if failed:  # the first bad shard in file order: the error the local backend reports
        raise task_error(failed[0])
    top = RunningTopK(queries, spec.topn, spec.knn_metric) if len(queries) else None
    examples: list[list[int]] = []
    for i in sorted(results):
        if top is not None:
            top._merge(results[i]["keys"], results[i]["ids"])  # lexsort on (key, row): order-free
        examples += results[i]["flat_examples"]
    return (top, sum(r["searched"] for r in results.values()), sum(r["flat"] for r in results.values()),
            examples)


def mine_on_ray(ray: Any, spec: MiningSpec, source_path: Path, target_path: Path, output_path: Path,
                summary_path: Path, events: Events, pairs_path: Path | None) -> BackendMine:
    """engine/mining.py's mine_files with its pass 1 on the cluster; every other line is its own
    (kept in step by tests/test_ray_backend.py, which compares the two on every output)."""
    topn, metric, block_rows = spec.topn, spec.knn_metric, spec.block_rows
    source_column, target_column = spec.source_embed_column_name, spec.target_embed_column_name
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    if tables.is_csv(source_path):
        raise DeftError("backend_unsupported", f"source_parquet {source_path}: the ray backend mines "
                        "embedding parquets, not CSV", fix="embed the pool first (deft-mine embed)",
                        field="source_parquet")
    src_schema = tables.schema_of(source_path)
    tgt_schema = tables.schema_of(target_path)
    for path, schema, column, side in ((source_path, src_schema, source_column, "source"),
                                       (target_path, tgt_schema, target_column, "target")):
        _require_vector_column(path, schema, column, side)
        tables.require_columns(path, schema, ["filepath", column], f"{side}_parquet")
    label_missing = [side for side, sch in (("source", src_schema), ("target", tgt_schema))
                     if "label" not in sch.names]
    label_filter = spec.label_filter(label_missing)
    tgt_cols = ["filepath", target_column] + (["label"] if "target" not in label_missing else [])
    targets = tables.read_columns(target_path, tgt_cols)
    _require_no_null_paths(targets.column("filepath"), target_path, "target_parquet")
    queries = tables.vectors_from_column(targets.column(target_column), path=target_path,
                                        name=target_column, first_row=0, dim=None, field="target_parquet")
    target_set = {lexically_normal(str(p)) for p in targets.column("filepath").to_pylist()}
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

    t0 = time.perf_counter()
    pool_paths, repeated, is_target = _pool_paths(source_path, target_set)
    in_pool = int((is_target & ~repeated).sum())
    drop = repeated | is_target if spec.exclude_targets else repeated
    top, searched, zero["source"], flat_rows = _search(ray, spec, source_path, target_path, queries, drop, events)
    for rows in flat_rows:  # the examples mine_files collects, block by block
        if len(zero_examples) < 5:
            zero_examples += [str(p) for p in pool_paths.take(pa.array(rows)).to_pylist()]
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
    summary = {"queries": len(queries), "topn": topn, "neighbours_requested": len(queries) * topn,
               "pool": searched, "pairs": pairs}
    if label_filter == "applied":
        summary["kept_pairs"] = int(keep.sum())
        summary["dropped_pairs"] = pairs - int(keep.sum())
    summary["duplicates_removed"] = int(keep.sum()) - mined.num_rows
    summary["mined"] = mined.num_rows
    summary["target_in_pool"] = in_pool
    if repeated.any():
        summary["duplicate_paths"] = int(repeated.sum())
    if zero["targets"] or zero["source"]:
        summary["zero_vectors"] = zero["targets"] + zero["source"]
    timings["total"] = time.perf_counter() - t_start

    # As LocalBackend.mine writes them.
    t0 = time.perf_counter()
    tables.write_table_atomic(output_path, mined)
    if pairs_path is not None:
        tables.write_table_atomic(pairs_path, pairs_table)
    tables.write_text_atomic(summary_path, artifacts.summary_text(summary, label_filter))
    timings["write"] = time.perf_counter() - t0
    return BackendMine(summary=summary, label_filter=label_filter, label_missing=label_missing,
                       searched_rows=searched, target_in_pool=in_pool, timings=timings,
                       warnings=found_warnings)
