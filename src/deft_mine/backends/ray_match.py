"""Unique matching on Ray: the engine's passes on the driver, each pass's pool search one task per pool shard."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from deft_mine.backends.base import BackendMatch
from deft_mine.backends.ray import HeadWatch, Workers, as_data, cluster_cpus_gpus, gather, task_error
from deft_mine.backends.ray_mine import plan_shards, shard_task
from deft_mine.engine.knn import TopKState
from deft_mine.engine.pool_search import PoolPart, pool_parts, search_parts
from deft_mine.engine.unique_matching import unique_match
from deft_mine.engine.unique_outputs import write_outputs
from deft_mine.errors import DeftError
from deft_mine.events import Events
from deft_mine.schemas.specs import UniqueMatchingSpec


def search_shard(spec: UniqueMatchingSpec, part: PoolPart, queries: np.ndarray, free: np.ndarray,
                 k: int) -> dict[str, Any]:
    """A Ray task: the exact top-k within one pool shard's free rows; a DeftError comes back as
    data (it does not survive pickling), raised on the driver for the first bad shard."""
    import ray

    try:
        found = search_parts(spec, [part], queries, free, k)
    except DeftError as exc:
        return {"error": as_data(exc)}
    return {"found": found, "node": ray.get_runtime_context().get_node_id()}


def shards_of(files: list[Path], block_rows: int, cpus: float) -> list[PoolPart]:
    """Each pool file cut on its own block_rows multiples (the blocks the local search reads), the
    cluster's shards shared among the files by their rows."""
    parts = pool_parts(files)
    total = sum(part.rows for part in parts) or 1
    return [PoolPart(part.file, a, b, part.first_row + a) for part in parts
            for a, b in plan_shards(part.rows, block_rows, cpus * part.rows / total)]


class ShardedSearch:
    """The engine's PoolSearch on the cluster: one task per shard holding a free row, merged per
    query by (key, row), as the in-process search would rank them all; the shards it ran, counted."""

    def __init__(self, ray: Any, events: Events, watch: HeadWatch) -> None:
        self.ray, self.events, self.watch = ray, events, watch
        self.shards: list[PoolPart] | None = None  # the pool does not change during a match
        self.tasks, self.searches = 0, 0
        self.nodes: set[str] = set()

    def __call__(self, spec: UniqueMatchingSpec, files: list[Path], queries: np.ndarray, free: np.ndarray,
                 k: int) -> TopKState:
        if self.shards is None:
            cpus, _, _ = cluster_cpus_gpus(self.ray, self.watch)
            self.shards = shards_of(files, spec.block_rows, cpus)
        busy = [s for s in self.shards if free[s.first_row:s.first_row + s.rows].any()]
        task, held = shard_task(self.ray, search_shard), self.ray.put(queries)
        refs = [task.remote(spec, s, held, free[s.first_row:s.first_row + s.rows], k) for s in busy]
        self.searches += 1

        def tick(done: list[int]) -> None:
            self.events.progress("match", len(done), len(busy), f"search {self.searches}: {len(queries)} target(s), "
                                 f"{len(done)}/{len(busy)} shards done on the cluster")

        parts = gather(self.ray, refs, self.watch, tick)
        for part in parts:  # the first bad shard in pool order: the error the local search raises
            if "error" in part:
                raise task_error(part["error"])
        self.tasks += len(parts)
        self.nodes |= {part["node"] for part in parts}
        merged = TopKState.empty(len(queries))
        for part in parts:
            merged = merged.merged(part["found"], k)
        return merged


def match_on_ray(ray: Any, spec: UniqueMatchingSpec, events: Events, watch: HeadWatch
                 ) -> tuple[BackendMatch, Workers]:
    """The local backend's match and write, each pass's search on the cluster."""
    search = ShardedSearch(ray, events, watch)
    t0 = time.perf_counter()
    outcome = unique_match(spec, search=search)
    t1 = time.perf_counter()
    write_outputs(spec, outcome)
    t2 = time.perf_counter()
    events.log("info", f"matched with {search.searches} pool search(es) on Ray, {search.tasks} shard task(s)")
    done = BackendMatch(outcome.summary, outcome.warnings, {"match": t1 - t0, "write": t2 - t1, "total": t2 - t0})
    return done, Workers(len(search.shards or []), len(search.nodes))
