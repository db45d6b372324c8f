"""Embedding on Ray Data: the listing read in blocks, images read and decoded in CPU tasks, the
encoder in an actor pool; the driver streams the results in listing order into the same parquet
the local backend writes, reusing and filling the embedding store. Sentences (few) go through the
text tower in one task, whose file the driver writes."""

from __future__ import annotations

import functools
import os
import pickle
import queue
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa

from deft_mine.backends.base import BackendEmbed
from deft_mine.backends.local import text_step
from deft_mine.backends.ray import HeadWatch, Workers, as_data, cluster_cpus_gpus, gather, task_error
from deft_mine.engine import tables
from deft_mine.engine.embedding import EmbedStats, Prepared, Preparer, embedding_step, encode, timed
from deft_mine.engine.encoders import Encoder, build_encoder, build_preprocessor
from deft_mine.engine.listings import Listing, filepaths_of
from deft_mine.engine.store import Shelf
from deft_mine.engine.tables import offer
from deft_mine.errors import DeftError
from deft_mine.events import Events, RecordingEvents
from deft_mine.schemas.specs import EmbeddingSpec

READ_CPUS = 0.5
# No result for this long means a stuck pipeline (e.g. no CPU left for the read tasks), not a
# slow one: a batch takes seconds.
STALL_SECONDS = float(os.environ.get("DEFT_MINE_RAY_STALL_SECONDS", "600"))


@dataclass(frozen=True)
class PoolPlan:
    actors: int
    actor_cpus: float
    actor_gpus: float
    read_cpus: float


def plan_pool(cpus: float, gpus: float, use_gpu: bool, actors: int | None = None) -> PoolPlan:
    """Encoder actors sized from the cluster so that the read tasks always keep a CPU: an actor pool
    holding every CPU starves the reads and the pipeline never moves. A read task asks for half a CPU
    (it waits on the disk part of the time); asking for other resources than the actors also keeps
    Ray Data from fusing the reads into the actors, which would leave every CPU beside them idle."""
    if use_gpu and gpus >= 1:
        count = actors or int(gpus)
        return PoolPlan(count, 1.0 if cpus >= count + 1 else 0.0, 1.0, READ_CPUS)
    if cpus >= 2:
        count = max(1, min(actors or int(cpus) // 2, int(cpus) - 1))
        return PoolPlan(count, 1.0, 0.0, READ_CPUS)
    # Under two CPUs, an actor holding any share of the CPU starves Ray Data's own one-CPU tasks (the parquet
    # read, the repartition): the actor holds none (it still runs, on the CPU the reads leave between them).
    return PoolPlan(1, 0.0, 0.0, min(READ_CPUS, cpus))


# The encoder's CPU half, without its weights (once per worker process).
_preprocessor = functools.lru_cache(maxsize=None)(build_preprocessor)


def read_decode(batch: pa.Table, image_root: str, model: str, model_path: str | None,
                stored: np.ndarray) -> pa.Table:
    """A read task: the prepare stage; per row (prepared form, digest, seconds, no vector), pickled."""
    prep = Preparer(Path(image_root), stored, _preprocessor(model, model_path))(filepaths_of(batch))
    return pa.table({"row": pa.array([pickle.dumps((*row, None)) for row in zip(prep.rows, prep.digests, prep.seconds)],
                                     pa.large_binary())})


class EncodeActor:
    """The encode stage, one encoder per actor: each row with pixels leaves with its vector instead."""

    def __init__(self, model: str, model_path: str | None, device: str, pooling: str | None = None) -> None:
        import ray

        self.encoder = build_encoder(model, model_path, device, pooling)
        self.node = ray.get_runtime_context().get_node_id()  # the report says how many nodes did the work

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = [pickle.loads(blob) for blob in batch.column("row").to_pylist()]
        new = [i for i, row in enumerate(rows) if isinstance(row[0], np.ndarray)]
        t0 = time.perf_counter()
        fresh = encode(self.encoder, [rows[i][0] for i in new])
        share = (time.perf_counter() - t0) / max(len(new), 1)
        for i, vector in zip(new, fresh):
            rows[i] = (None, rows[i][1], rows[i][2] + share, vector)
        return pa.table({"row": pa.array([pickle.dumps(row) for row in rows], pa.large_binary()),
                         "node": pa.array([self.node] * len(rows), pa.string())})


def prepared(got: pa.Table) -> Prepared:
    """The cluster's rows of one listing batch as the batch step's prepared form, new rows encoded."""
    rows = [pickle.loads(blob) for blob in got.column("row").to_pylist()]
    seconds = np.array([row[2] for row in rows], np.float64)
    return Prepared([row[0] for row in rows], [row[1] for row in rows], seconds, float(seconds.sum()),
                    encoded={i: row[3] for i, row in enumerate(rows) if row[3] is not None})


def listing_blocks(rows: int, batch_size: int, actors: int) -> int:
    """Blocks to cut the listing into: Ray Data hands each actor whole blocks, so a listing read as one
    block (one row group) would keep every actor but one idle. Four per actor at least, none over 8 batches."""
    per_block = max(batch_size, min(rows // max(1, 4 * actors), 8 * batch_size))
    return max(1, -(-rows // per_block))


class _Results:
    """The pipeline's output rows, in order, handed out by count; a pipeline that yields
    nothing for `stall` seconds is a coded error, not a hang. Each second of waiting checks the
    head (`watch`) and calls `waiting` (where a cancellation is met)."""

    def __init__(self, batches: Iterator[pa.Table], stall: float, watch: HeadWatch,
                 waiting: Callable[[], None]) -> None:
        self._watch, self._waiting, self._stall = watch, waiting, stall
        self._queue: queue.Queue = queue.Queue(maxsize=2)
        self._stop = threading.Event()
        self._buffer: list[pa.Table] = []
        self._rows, self._ended = 0, False
        threading.Thread(target=self._pump, args=(batches,), name="ray-results", daemon=True).start()

    def _pump(self, batches: Iterator[pa.Table]) -> None:
        try:
            for batch in batches:
                if not offer(self._queue, ("batch", batch), self._stop):
                    return
            self._queue.put(("end", None))
        except BaseException as exc:  # handed to the consumer, which raises it
            self._queue.put(("error", exc))
        finally:  # closing the iterator shuts Ray Data's execution down: its actors and tasks end
            getattr(batches, "close", lambda: None)()

    def take(self, rows: int) -> pa.Table:
        waited = 0.0
        while self._rows < rows and not self._ended:
            try:
                kind, item = self._queue.get(timeout=1.0)
                waited = 0.0
            except queue.Empty:
                self._watch.check()
                self._waiting()
                waited += 1.0
                if waited < self._stall:
                    continue
                raise DeftError("ray_stalled", f"the Ray pipeline produced nothing for {self._stall:.0f}s",
                                fix="check the cluster has a CPU free beside the encoder actors (ray status); "
                                    "set DEFT_MINE_RAY_STALL_SECONDS for very slow batches") from None
            if kind == "error":
                raise item
            if kind == "end":
                self._ended = True
            elif item.num_rows:
                self._buffer.append(item)
                self._rows += item.num_rows
        if self._rows < rows:
            raise RuntimeError(f"the Ray pipeline returned {self._rows} rows fewer than the listing holds")
        table = pa.concat_tables(self._buffer) if len(self._buffer) > 1 else self._buffer[0]
        out, rest = table.slice(0, rows), table.slice(rows)
        self._buffer, self._rows = ([rest] if rest.num_rows else []), rest.num_rows
        return out

    def close(self) -> None:
        self._stop.set()


def embed_on_ray(ray: Any, spec: EmbeddingSpec, listing: Listing, output_path: Path, encoder: Encoder,
                 events: Events, store: Path | None, watch: HeadWatch,
                 actors: int | None = None) -> tuple[EmbedStats, Workers]:
    """Embed `listing` on the cluster: prepare in read tasks, encode in actors, finish here."""
    shelf = Shelf(store, encoder.identity) if store else None
    cpus, gpus, nodes = cluster_cpus_gpus(ray, watch)
    model, model_path = spec.encoder_key()[:2]
    use_gpu = spec.device != "cpu" and model != "thumbnail"
    plan = plan_pool(cpus, gpus, use_gpu, actors)
    events.log("info", f"Ray: {nodes} node(s), {cpus:g} CPU(s), {gpus:g} GPU(s); {plan.actors} encoder "
                       f"actor(s) of {plan.actor_cpus:g} CPU / {plan.actor_gpus:g} GPU")
    with embedding_step(listing, output_path, encoder, shelf, events) as step:
        # Without a shuffle, blocks are split and joined where they stand: the order stays the file's.
        # The read tasks skip what the store holds: only the other rows reach the encoder actors.
        ds = listing.ray_dataset(ray, plan.read_cpus).repartition(
            listing_blocks(listing.rows, spec.batch_size, plan.actors), shuffle=False).map_batches(
            read_decode, batch_size=spec.batch_size, batch_format="pyarrow", num_cpus=plan.read_cpus,
            fn_kwargs={"image_root": str(listing.images_root), "model": model, "model_path": model_path,
                       "stored": step.preparer.held})
        ds = ds.map_batches(
            EncodeActor, batch_size=spec.batch_size, batch_format="pyarrow",
            fn_constructor_kwargs={"model": model, "model_path": model_path, "pooling": spec.pooling,
                                   "device": "auto" if spec.device.startswith("cuda") else spec.device},
            compute=ray.data.ActorPoolStrategy(size=plan.actors), num_cpus=plan.actor_cpus,
            num_gpus=plan.actor_gpus)
        used: set[str] = set()
        batches = [0]  # back from the cluster; no total: a parquet's row groups may cut a few more

        def report() -> None:
            events.progress("embed", step.stats.rows_in, listing.rows, f"{batches[0]} batch(es) done on the cluster"
                            + (f", {step.stats.reused} reused from the store" if shelf is not None else ""))

        results = _Results(ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1),
                           STALL_SECONDS, watch, report)
        report()
        try:
            for batch in timed(listing.batches(spec.batch_size), step.stats.timings):
                got = results.take(batch.num_rows)
                used.update(got.column("node").unique().to_pylist())
                step.finish(batch, prepared(got))
                batches[0] += 1
                report()
        finally:
            results.close()
    return step.stats, Workers(plan.actors, len(used), plan.actors * plan.actor_gpus)


def text_task(spec: EmbeddingSpec, listing: Listing, store: str | None, device: str) -> dict[str, Any]:
    """A Ray task: the local backend's text step (embed_texts through the text tower, the store's text
    shelf) into a file of the task's own, handed back whole with the facts and the log lines."""
    import ray

    events = RecordingEvents()
    try:
        with tempfile.TemporaryDirectory(prefix="deft-text-") as folder:
            out = Path(folder) / "texts.parquet"
            done = text_step(spec, listing, out, events, Path(store) if store is not None else None, device)
            data = out.read_bytes()
    except DeftError as exc:
        return {"error": as_data(exc)}
    return {"data": data, "embed": done, "logs": events.logs, "node": ray.get_runtime_context().get_node_id()}


def embed_text_on_ray(ray: Any, spec: EmbeddingSpec, listing: Listing, output_path: Path, events: Events,
                      store: Path | None, watch: HeadWatch) -> tuple[BackendEmbed, Workers]:
    """Sentences through the text tower in one task on the cluster (a GPU's when the spec may use
    one and the cluster has one); its file written here, as the local backend writes it."""
    _, gpus, _ = cluster_cpus_gpus(ray, watch)
    on_gpu = spec.device != "cpu" and gpus >= 1
    # Without a GPU given, a cuda spec falls back as an encoder actor's does (auto: the CPU).
    device = "auto" if spec.device.startswith("cuda") else spec.device
    task = ray.remote(text_task).options(num_cpus=1, num_gpus=1 if on_gpu else 0, max_retries=3)
    events.log("info", f"embedding {listing.rows} sentence(s) in one Ray task on a {'GPU' if on_gpu else 'CPU'}")
    ref = task.remote(spec, listing, str(store) if store is not None else None, device)

    def tick(done: list[int]) -> None:  # each second of waiting: where a cancellation is met
        events.progress("embed", listing.rows if done else 0, listing.rows, "one task on the cluster")

    found = gather(ray, [ref], watch, tick)[0]
    if "error" in found:
        raise task_error(found["error"])
    for level, message in found["logs"]:
        events.log(level, message)
    with tables.atomic_output(output_path) as tmp:
        Path(tmp).write_bytes(found["data"])
    return found["embed"], Workers(1, 1, 1.0 if on_gpu else 0.0)
