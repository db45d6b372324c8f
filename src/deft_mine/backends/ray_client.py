"""Embedding through Ray Client (ray://…): Ray Data's executor needs a driver inside the cluster
(Ray 2.60 cannot run it on a client), so the embedding's driver loop runs as a task there and
sends its progress and log lines back to this process, which replays them."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from deft_mine.backends.ray import HeadWatch, Workers, as_data, quiet_ray_data, task_error
from deft_mine.engine.embedding import EmbedStats
from deft_mine.engine.listings import Listing
from deft_mine.errors import DeftError
from deft_mine.events import Events
from deft_mine.schemas.specs import EmbeddingSpec


class _QueueEvents:
    """The in-cluster driver's events, put on a Ray queue for the client to replay."""

    def __init__(self, queue: Any) -> None:
        self.queue = queue

    def progress(self, stage: str, done: int, total: int | None, note: str = "") -> None:
        self.queue.put(("progress", (stage, done, total, note)))

    def log(self, level: str, message: str) -> None:
        self.queue.put(("log", (level, message)))


def drive_embedding(spec: EmbeddingSpec, listing: Listing, output_path: str, store: str | None,
                    queue: Any) -> dict[str, Any]:
    """A Ray task holding no resources: the embedding's driver, run inside the cluster. The output and
    the store are written from here: on storage the cluster sees at the same paths, as for every Ray run."""
    import ray

    from deft_mine.backends.local import LocalBackend
    from deft_mine.backends.ray_embed import embed_on_ray

    events = _QueueEvents(queue)
    quiet_ray_data(ray)
    try:
        encoder = LocalBackend.shared().encoder(spec, events)
        stats, used = embed_on_ray(ray, spec, listing, Path(output_path), encoder, events,
                                   Path(store) if store else None, HeadWatch(ray, "the cluster's own head"),
                                   actors=spec.workers)
    except DeftError as exc:
        return {"error": as_data(exc)}
    return {"stats": stats, "used": used}


def embed_through_client(ray: Any, spec: EmbeddingSpec, listing: Listing, output_path: Path, events: Events,
                         store: Path | None, watch: HeadWatch) -> tuple[EmbedStats, Workers]:
    """embed_on_ray's answer, computed by a driver task in the cluster; cancelling here (or
    failing) cancels that task and with it every actor and task it started."""
    from ray.util.queue import Queue

    queue = Queue(actor_options={"num_cpus": 0})
    driver = ray.remote(drive_embedding).options(num_cpus=0, max_retries=0)
    ref = driver.remote(spec, listing, str(output_path), str(store) if store else None, queue)
    last: tuple[str, int, int | None, str] | None = None
    try:
        while True:
            finished, _ = ray.wait([ref], timeout=1.0)
            told = queue.get_nowait_batch(queue.qsize()) if queue.qsize() else []
            for kind, args in told:  # _QueueEvents' calls, made again here
                last = args if kind == "progress" else last
                getattr(events, kind)(*args)
            if finished:
                break
            watch.check()
            if last is not None and not told:  # nothing moved: still where a cancellation is met
                events.progress(*last)
        found = ray.get(ref)
    except BaseException:
        ray.cancel(ref, force=True, recursive=True)
        raise
    finally:
        with contextlib.suppress(Exception):  # a cluster that failed: its error is the one to tell
            ray.kill(queue.actor)
    if "error" in found:
        raise task_error(found["error"])
    return found["stats"], found["used"]
