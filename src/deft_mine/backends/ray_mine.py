"""Exact mining on Ray: engine/mining.py's steps, the search one task per pool shard, merged by the same tie rule."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from deft_mine.backends.base import BackendMine, MineOutputs
from deft_mine.backends.local import write_mining
from deft_mine.backends.ray import HeadWatch, Workers, as_data, cluster_cpus_gpus, gather, task_error
from deft_mine.engine import tables
from deft_mine.engine.leak_search import Kept
from deft_mine.engine.mining import (Prepared, Searched, finish, keeper, leak_stage, merge, pool_dim, prepare,
                                     search_range, search_width)
from deft_mine.errors import DeftError
from deft_mine.events import Events
from deft_mine.schemas.specs import MiningSpec

_SHARDS_PER_CPU = 4  # more shards than CPUs: a slow node holds up less of the search
_RETRIES = 3  # a shard whose worker died (killed, node lost) runs again, from the start


def plan_shards(total: int, block_rows: int, cpus: float) -> list[tuple[int, int]]:
    """Contiguous row ranges that start on multiples of `block_rows`: each shard searches
    exactly the blocks the local backend would, so a bad row is named the same way."""
    blocks = -(-total // block_rows)
    if blocks == 0:
        return []
    count = max(1, min(blocks, _SHARDS_PER_CPU * max(1, int(cpus))))
    edges = np.linspace(0, blocks, count + 1).round().astype(int)
    return [(int(a) * block_rows, min(int(b) * block_rows, total)) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def shard_task(ray: Any, work: Any) -> Any:
    """`work` as a Ray task of one pool shard: one CPU, SPREAD (short tasks would otherwise pack
    onto the driver's node), run again from the start when its worker dies."""
    return ray.remote(work).options(num_cpus=1, scheduling_strategy="SPREAD", max_retries=_RETRIES)


def search_shard(spec: MiningSpec, source_path: str, target_path: str, queries: np.ndarray, drop: np.ndarray,
                 start: int, end: int, dim: int | None, query_groups: np.ndarray | None = None,
                 pool_groups: np.ndarray | None = None, kept: Kept | None = None) -> dict[str, Any]:
    """A Ray task: the search of pool rows [start, end) (per_label: each query among its own label's rows,
    by `query_groups` and `pool_groups`; with the guard in the search, `kept` keeps its candidates'
    vectors); a DeftError comes back as data (it does not survive pickling),
    raised on the driver for the first bad shard."""
    import ray

    try:
        found = search_range(spec, Path(source_path), Path(target_path), queries, drop, start, end, dim,
                             query_groups=query_groups, pool_groups=pool_groups, kept=kept)
    except DeftError as exc:
        return {"error": as_data(exc)}
    return {"found": found, "node": ray.get_runtime_context().get_node_id()}


def _search(ray: Any, prep: Prepared, events: Events, watch: HeadWatch) -> tuple[Searched, Workers]:
    """The pool searched shard by shard on the cluster, merged in pool order; and the shard tasks that did it."""
    spec, total = prep.spec, prep.total
    cpus, _, _ = cluster_cpus_gpus(ray, watch)
    shards = plan_shards(total, spec.block_rows, cpus)
    # Shards after the first check their blocks against the pool's first vector, as a local pass would.
    dim = pool_dim(prep.source_path, spec.source_embed_column_name) if total else None
    task = shard_task(ray, search_shard)
    queries = ray.put(prep.queries)
    groups = prep.pool_groups
    refs = [task.remote(spec, str(prep.source_path), str(prep.target_path), queries, prep.drop[a:b], a, b,
                        dim if a else None, prep.query_groups, None if groups is None else groups[a:b], keeper(prep))
            for a, b in shards]
    events.log("info", f"mining {total} pool rows in {len(shards)} shard(s) on Ray")

    def tick(done: list[int]) -> None:
        rows = sum(shards[i][1] - shards[i][0] for i in done)
        events.progress("mine", rows, total, f"{len(done)}/{len(shards)} shards done on the cluster")

    parts = gather(ray, refs, watch, tick)
    for part in parts:  # the first bad shard in pool order: the error the local backend reports
        if "error" in part:
            raise task_error(part["error"])
    return (merge([part["found"] for part in parts], search_width(spec)),
            Workers(len(shards), len({part["node"] for part in parts})))


def mine_on_ray(ray: Any, spec: MiningSpec, source_path: Path, target_path: Path, outputs: MineOutputs,
                events: Events, watch: HeadWatch) -> tuple[BackendMine, Workers]:
    """The local backend's prepare → search → finish → write, with the search on the cluster."""
    if tables.is_csv(source_path):
        raise DeftError("backend_unsupported", f"source_parquet {source_path}: the ray backend mines "
                        "embedding parquets, not CSV", fix="embed the pool first (deft-mine embed)",
                        field="source_parquet")
    prep = prepare(source_path, target_path, spec)
    found, used = _search(ray, prep, events, watch)
    prep.timings["search"] = time.perf_counter() - prep.search_started
    return write_mining(finish(prep, leak_stage(prep, found)), outputs), used
