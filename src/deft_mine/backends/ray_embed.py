"""Embedding on Ray Data: the listing read in blocks, images read and decoded in CPU tasks, the
encoder in an actor pool; the driver streams the results in listing order into the same parquet
the local backend writes, reusing and filling the embedding store."""

from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa

from deft_mine.backends.ray import HeadWatch, Workers, cluster_cpus_gpus
from deft_mine.engine.embedding import EmbedStats, Prepared, Preparer, embedding_step, encode, held_in, timed
from deft_mine.engine.encoders import Encoder, build_encoder, build_preprocessor
from deft_mine.engine.images import LoadFailure
from deft_mine.engine.listings import Listing, filepaths_of
from deft_mine.engine.store import Shelf
from deft_mine.errors import DeftError
from deft_mine.events import Events
from deft_mine.schemas.specs import EmbeddingSpec

FAILED, STORED, NEW = 0, 1, 2  # what became of a row in the read task
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
    """Encoder actors sized from the cluster so that the read tasks always keep a CPU: an
    actor pool holding every CPU starves the reads and the pipeline never moves.

    A read task asks for half a CPU (it waits on the disk part of the time); asking for other
    resources than the actors also keeps Ray Data from fusing the reads into the actors, which
    would leave every CPU beside them idle. A cluster of fewer than two CPUs works with a
    single actor that holds no CPU.
    """
    if use_gpu and gpus >= 1:
        count = actors or int(gpus)
        return PoolPlan(count, 1.0 if cpus >= count + 1 else 0.0, 1.0, READ_CPUS)
    if cpus >= 2:
        count = max(1, min(actors or int(cpus) // 2, int(cpus) - 1))
        return PoolPlan(count, 1.0, 0.0, READ_CPUS)
    # Under two CPUs, an actor holding any share of the CPU starves Ray Data's own one-CPU tasks
    # (the parquet read, the repartition) and nothing moves: the actor holds none (it still runs,
    # on the CPU the reads leave between them).
    return PoolPlan(1, 0.0, 0.0, min(READ_CPUS, cpus))


_PREPROCESS: dict[tuple[str, str | None], Callable[[list[Any]], np.ndarray]] = {}


def _preprocessor(model: str, model_path: str | None) -> Callable[[list[Any]], np.ndarray]:
    """The encoder's CPU half, without its weights (once per worker process)."""
    key = (model, model_path)
    if key not in _PREPROCESS:
        _PREPROCESS[key] = build_preprocessor(model, model_path)
    return _PREPROCESS[key]


def read_decode(batch: pa.Table, image_root: str, model: str, model_path: str | None,
                stored: np.ndarray) -> pa.Table:
    """A read task: the batch step's prepare stage, its outcome as a table for the actors (the
    pixels of each row to encode, flattened) and the driver (digests, failures, seconds)."""
    prep = Preparer(Path(image_root), held_in(stored), _preprocessor(model, model_path))(filepaths_of(batch))
    status = [FAILED if isinstance(r, LoadFailure) else STORED if r is None else NEW for r in prep.rows]
    failed = [r if isinstance(r, LoadFailure) else None for r in prep.rows]
    pixels = [r if isinstance(r, np.ndarray) else None for r in prep.rows]
    return pa.table({"digest": pa.array(prep.digests, pa.binary(32)), "status": pa.array(status, pa.int8()),
                     "reason": pa.array([f and f.reason for f in failed], pa.string()),
                     "failpath": pa.array([f and f.filepath for f in failed], pa.string()),
                     "pixels": pa.array([p if p is None else p.tobytes() for p in pixels], pa.large_binary()),
                     "shape": pa.array([p if p is None else list(p.shape) for p in pixels], pa.list_(pa.int64())),
                     "seconds": pa.array(prep.seconds)})


class EncodeActor:
    """One encoder per actor (weights loaded once): the batch step's encode stage, run on the
    rows the read tasks decoded."""

    def __init__(self, model: str, model_path: str | None, device: str, pooling: str | None = None) -> None:
        import ray

        self.encoder = build_encoder(model, model_path, device, pooling)
        self.node = ray.get_runtime_context().get_node_id()  # the report says how many nodes did the work

    def __call__(self, batch: pa.Table) -> pa.Table:
        new = np.flatnonzero(batch.column("status").to_numpy() == NEW)
        vectors: list[bytes | None] = [None] * batch.num_rows
        seconds = batch.column("seconds").to_numpy().copy()
        if len(new):
            blobs, shapes = batch.column("pixels").to_pylist(), batch.column("shape").to_pylist()
            t0 = time.perf_counter()
            fresh = encode(self.encoder, [np.frombuffer(blobs[i], np.float32).reshape(shapes[i]) for i in new])
            seconds[new] += (time.perf_counter() - t0) / len(new)
            for row, vector in zip(new, fresh):
                vectors[row] = vector.tobytes()
        out = batch.drop_columns(["pixels", "shape", "seconds"])
        return out.append_column("vector", pa.array(vectors, pa.binary())).append_column(
            "seconds", pa.array(seconds)).append_column("node", pa.array([self.node] * batch.num_rows, pa.string()))


def prepared(got: pa.Table) -> Prepared:
    """The cluster's answer for one listing batch as the batch step's prepared form, its new
    rows encoded already."""
    status, seconds = got.column("status").to_numpy(), got.column("seconds").to_numpy()
    reasons, failpaths = got.column("reason").to_pylist(), got.column("failpath").to_pylist()
    blobs = got.column("vector").to_pylist()
    return Prepared([LoadFailure(failpaths[i], reasons[i]) if status[i] == FAILED else None for i in range(len(status))],
                    got.column("digest").to_pylist(), seconds, float(seconds.sum()),
                    encoded={int(i): np.frombuffer(blobs[i], np.float32) for i in np.flatnonzero(status == NEW)})


def listing_blocks(rows: int, batch_size: int, actors: int) -> int:
    """How many blocks the listing is cut into. Ray Data hands each actor whole blocks, so a
    listing read as one block (one row group) would keep every actor but one idle: four blocks
    per actor at least, none over eight batches."""
    per_block = max(batch_size, min(rows // max(1, 4 * actors), 8 * batch_size))
    return max(1, -(-rows // per_block))


def _listing(ray: Any, listing: Listing, read_cpus: float, blocks: int) -> Any:
    """The listing's filepaths as a Ray dataset of `blocks` blocks, in file order."""
    # Without a shuffle, blocks are split and joined where they stand: the order stays the file's.
    return listing.ray_dataset(ray, read_cpus).repartition(blocks, shuffle=False)


class _Results:
    """The pipeline's output rows, in order, handed out by count; a pipeline that yields
    nothing for `stall` seconds is a coded error, not a hang. Each second of waiting checks the
    head (`watch`) and calls `waiting` (where a cancellation is met)."""

    def __init__(self, batches: Iterator[pa.Table], stall: float, watch: HeadWatch,
                 waiting: Callable[[], None]) -> None:
        self._watch = watch
        self._waiting = waiting
        self._queue: queue.Queue = queue.Queue(maxsize=2)
        self._stop = threading.Event()
        self._stall = stall
        self._buffer: list[pa.Table] = []
        self._rows = 0
        self._ended = False
        threading.Thread(target=self._pump, args=(batches,), name="ray-results", daemon=True).start()

    def _pump(self, batches: Iterator[pa.Table]) -> None:
        try:
            for batch in batches:
                while not self._stop.is_set():
                    try:
                        self._queue.put(("batch", batch), timeout=0.2)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            self._queue.put(("end", None))
        except BaseException as exc:  # handed to the consumer, which raises it
            self._queue.put(("error", exc))
        finally:  # closing the iterator shuts Ray Data's execution down: its actors and tasks end
            close = getattr(batches, "close", None)
            if close is not None:
                close()

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


@dataclass
class _Progress:
    """What the progress bar and the MCP notifications say: rows, and listing batches back from
    the cluster."""

    events: Events
    total: int
    stats: EmbedStats
    store: bool
    batches: int = 0

    def report(self) -> None:
        # no batch total: a parquet's row groups may cut the listing into a few more than rows/batch
        note = f"{self.batches} batch(es) done on the cluster"
        if self.store:
            note += f", {self.stats.reused} reused from the store"
        self.events.progress("embed", self.stats.rows_in, self.total, note)


def embed_on_ray(ray: Any, spec: EmbeddingSpec, listing: Listing, output_path: Path, encoder: Encoder,
                 events: Events, store: Path | None, watch: HeadWatch,
                 actors: int | None = None) -> tuple[EmbedStats, Workers]:
    """Embed `listing` into `output_path` on the cluster (the batch step's prepare in read tasks,
    its encode in an actor pool, its finish here); the stats, and the encoder actors that did it."""
    shelf = Shelf(store, encoder.identity) if store else None
    cpus, gpus, nodes = cluster_cpus_gpus(ray)
    model, model_path = spec.encoder_key()[0], spec.encoder_key()[1]
    use_gpu = spec.device != "cpu" and model != "thumbnail"
    plan = plan_pool(cpus, gpus, use_gpu, actors)
    events.log("info", f"Ray: {nodes} node(s), {cpus:g} CPU(s), {gpus:g} GPU(s); {plan.actors} encoder "
                       f"actor(s) of {plan.actor_cpus:g} CPU / {plan.actor_gpus:g} GPU")
    with embedding_step(listing, output_path, encoder, shelf, events) as step:
        # The read tasks skip what the store holds: only the other rows reach the encoder actors.
        ds = _listing(ray, listing, plan.read_cpus, listing_blocks(listing.rows, spec.batch_size, plan.actors))
        ds = ds.map_batches(read_decode, batch_size=spec.batch_size, batch_format="pyarrow", num_cpus=plan.read_cpus,
                            fn_kwargs={"image_root": str(listing.images_root), "model": model,
                                       "model_path": model_path,
                                       "stored": shelf.digests() if shelf is not None else np.zeros(0, "S32")})
        ds = ds.map_batches(
            EncodeActor, batch_size=spec.batch_size, batch_format="pyarrow",
            fn_constructor_kwargs={"model": model, "model_path": model_path, "pooling": spec.pooling,
                                   "device": "auto" if spec.device.startswith("cuda") else spec.device},
            compute=ray.data.ActorPoolStrategy(size=plan.actors), num_cpus=plan.actor_cpus,
            num_gpus=plan.actor_gpus)
        used: set[str] = set()
        progress = _Progress(events, listing.rows, step.stats, shelf is not None)
        results = _Results(ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1),
                           STALL_SECONDS, watch, progress.report)
        progress.report()
        try:
            for batch in timed(listing.batches(spec.batch_size), step.stats.timings):
                got = results.take(batch.num_rows)
                used.update(got.column("node").unique().to_pylist())
                step.finish(batch, prepared(got))
                progress.batches += 1
                progress.report()
        finally:
            results.close()
    return step.stats, Workers(plan.actors, len(used), plan.actors * plan.actor_gpus)
