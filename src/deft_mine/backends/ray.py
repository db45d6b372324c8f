"""The Ray backend: embedding on Ray Data, exact mining and unique matching's searches as Ray tasks over pool
shards, sentences in one task; the local backend's answer."""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, TypeVar
from urllib.parse import urlsplit

from deft_mine.backends.base import BackendEmbed, BackendMatch, BackendMine, Capabilities, MineOutputs
from deft_mine.errors import DeftError
from deft_mine.events import Events
from deft_mine.schemas.results import Check, ClusterFacts
from deft_mine.schemas.specs import EmbeddingSpec, MiningSpec, UniqueMatchingSpec

if TYPE_CHECKING:
    from deft_mine.engine.listings import Listing

DoneT = TypeVar("DoneT", BackendEmbed, BackendMine, BackendMatch)
T = TypeVar("T")

INSTALL_FIX = "pip install 'deft-mine[ray]'"
# A Ray started here (no address given) takes at most this many CPUs: the driver, the store and
# the writer keep working beside it.
LOCAL_MAX_CPUS = 8
_CONNECT_SECONDS = 60.0  # ray.init against a head that does not answer retries for minutes
_PROBE_SECONDS = 5.0
# A head whose port refuses connections this long is lost (a restart takes less). Ray itself would
# end this whole process once its head has been gone a minute (gcs_rpc_server_reconnect_timeout_s),
# leaving no word in the run folder: that limit is raised so that our coded error comes first.
HEAD_GRACE_SECONDS = float(os.environ.get("DEFT_MINE_RAY_HEAD_SECONDS", "15"))
_RAY_ENDS_PROCESS_AFTER = "3600"

_lock = threading.Lock()
_attached: str | None = None  # the address this process's Ray driver is attached to
_keepers: list[threading.Event] = []  # set to let the thread that started Ray end
_steps = 0  # Ray steps running now (embed or mine calls side by side): no re-attach meanwhile


def import_ray() -> Any:
    """The ray module, or the coded refusal that says how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401  (the embedding side needs Ray Data, not just the core)
    except ImportError as exc:
        raise DeftError("backend_unavailable", f"backend=ray needs Ray (ray[data]), which is not installed "
                        f"here ({exc})", fix=INSTALL_FIX, field="backend") from exc
    return ray


def wanted_address(address: str | None) -> str:
    """--ray-address, else $RAY_ADDRESS (Ray's own convention), else "local": start one here."""
    return address or os.environ.get("RAY_ADDRESS") or "local"


def _probe(address: str) -> None:
    """A head given as host:port (or ray://host:port) must accept a TCP connection: ray.init
    would otherwise retry for minutes before saying anything."""
    if address in ("local", "auto"):
        return
    parts = urlsplit(address if "://" in address else f"//{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if not host or not port:
        raise DeftError("ray_address_invalid", f"ray_address {address!r} is not host:port, ray://host:port, "
                        "auto or local", fix="e.g. --ray-address 10.0.0.5:6379 (the head's GCS port) or "
                        "ray://10.0.0.5:10001", field="ray_address", address=address)
    try:
        socket.create_connection((host, port), timeout=_PROBE_SECONDS).close()
    except OSError as exc:
        raise unreachable(address, f"{exc.__class__.__name__}: {exc}") from exc


def unreachable(address: str, why: str) -> DeftError:
    return DeftError("ray_unreachable", f"cannot reach the Ray cluster at {address} ({why})",
                     fix="start the cluster (ray start --head) or give its address with --ray-address "
                         "(host:port of the head, ray://host:10001, or auto)",
                     field="ray_address", address=address)


@contextlib.contextmanager
def attached(address: str | None) -> Iterator[Any]:
    """Ray, attached to `address`, for one step: while any step runs, no call re-attaches the
    process elsewhere (the MCP server runs calls side by side)."""
    global _steps
    ray = connect(address)
    with _lock:
        _steps += 1
    try:
        yield ray
    finally:
        with _lock:
            _steps -= 1


def connect(address: str | None) -> Any:
    """Attach this process's Ray driver to `address` (once; another address re-attaches)."""
    global _attached
    ray = import_ray()
    wanted = wanted_address(address)
    with _lock:
        if ray.is_initialized() and _attached == wanted:
            return ray
        if _steps:  # re-attaching would shut Ray down under a step another call is running
            raise DeftError("ray_busy", f"this process is attached to the Ray cluster at {_attached} and a step "
                            f"is running there; it cannot switch to {wanted} until that step ends",
                            fix="wait for the running step, or run one deft-mine process per cluster",
                            field="ray_address", address=wanted, attached=_attached)
        _probe(wanted)
        _detach(ray)
        os.environ.setdefault("RAY_gcs_rpc_server_reconnect_timeout_s", _RAY_ENDS_PROCESS_AFTER)
        kwargs: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING,
                                  "configure_logging": False}
        if wanted == "local":  # a fresh Ray of our own, never one another process started here
            kwargs |= {"num_cpus": min(LOCAL_MAX_CPUS, os.cpu_count() or 1), "include_dashboard": False}
        failure: list[BaseException] = []
        ready, release = threading.Event(), threading.Event()

        def keep() -> None:
            # Ray ties the processes it starts to the life of the *thread* that started them
            # (PR_SET_PDEATHSIG), so they are started from a thread that lives on: not the
            # caller's, which may be a server's short-lived worker, and not one that ends here.
            try:
                ray.init(address=wanted, **kwargs)
            except BaseException as exc:  # handed to the caller below
                failure.append(exc)
                return
            finally:
                ready.set()
            release.wait()

        threading.Thread(target=keep, name="ray-driver", daemon=True).start()
        if not ready.wait(_CONNECT_SECONDS):
            raise unreachable(wanted, f"no answer within {_CONNECT_SECONDS:.0f}s")
        if failure:
            raise unreachable(wanted, f"{failure[0].__class__.__name__}: {failure[0]}") from failure[0]
        _keepers.append(release)
        _attached = wanted
        quiet_ray_data(ray)
        _cluster_messages_to_stderr()
        return ray


def quiet_ray_data(ray: Any) -> None:
    """Ray Data keeps rows in order here (the output must match the listing), and its own
    progress bars and logs stay off: ours speak for the work."""
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def _cluster_messages_to_stderr() -> None:
    """Ray prints the raylets' warnings (e.g. "N worker processes have been started") on the
    driver's stdout, even with log_to_driver off, and flushes repeats when the process exits,
    after our result: stdout is ours (the run folder is its last line, --json is parsed), so
    they go to stderr. Ray has no setting for it; its printer is wrapped, if it is where 2.60 has it."""
    from ray._private import worker

    original = getattr(worker, "print_worker_logs", None)
    if original is None or getattr(original, "_deft_mine", False):
        return

    def to_stderr(data: Any, print_file: Any, *args: Any, **kwargs: Any) -> None:
        original(data, sys.stderr, *args, **kwargs)

    to_stderr._deft_mine = True  # type: ignore[attr-defined]
    worker.print_worker_logs = to_stderr


def _detach(ray: Any) -> None:
    """Shut the driver down and let the threads that started Ray end (a Ray started here stops
    with them); called with _lock held."""
    global _attached
    if ray.is_initialized():
        ray.shutdown()
    _attached = None
    while _keepers:
        _keepers.pop().set()


def disconnect() -> None:
    """Detach the driver (tests; a Ray we started here stops with it)."""
    with _lock, contextlib.suppress(ImportError):
        import ray

        _detach(ray)


class HeadWatch:
    """Tells a lost head from a busy cluster while the driver waits on it: the head's port
    refusing connections for HEAD_GRACE_SECONDS is `ray_head_lost`, naming the address."""

    def __init__(self, ray: Any, address: str) -> None:
        self.address = address
        if address.startswith("ray://"):  # a Ray Client reaches the head through this port only
            given = urlsplit(address)
            self._gcs = (given.hostname or "127.0.0.1", given.port or 10001)
        else:
            host, _, port = ray.get_runtime_context().gcs_address.rpartition(":")
            self._gcs = (host, int(port))
        self._lost_since: float | None = None
        self._next = 0.0

    def check(self) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + 1.0
        try:
            socket.create_connection(self._gcs, timeout=1.0).close()
            self._lost_since = None
            return
        except OSError:
            self._lost_since = self._lost_since or now
        if now - self._lost_since >= HEAD_GRACE_SECONDS:
            global _attached
            with _lock:
                _attached = None  # the next call attaches afresh
            raise DeftError("ray_head_lost", f"lost the Ray cluster's head at {self.address} (its port "
                            f"{self._gcs[0]}:{self._gcs[1]} has refused connections for {HEAD_GRACE_SECONDS:.0f}s); "
                            "the step stopped before writing its output",
                            fix="restart the head (ray start --head …, the worker nodes re-join) and run again; "
                                "the embedding store keeps the vectors already made",
                            field="ray_address", address=self.address)

    def call(self, ask: Callable[[], T]) -> T:
        """`ask()`, a direct question to the head, watched: with the head gone it would block until
        Ray ends the whole process (exit 1, a minute on); asked on a side thread, the wait ends in
        ray_head_lost after the grace time instead."""
        box: queue.Queue = queue.Queue(maxsize=1)

        def run() -> None:
            try:
                box.put((True, ask()))
            except BaseException as exc:  # handed to the caller's thread, raised there
                box.put((False, exc))

        threading.Thread(target=run, name="ray-head-call", daemon=True).start()
        while True:
            try:
                answered, value = box.get(timeout=0.5)
            except queue.Empty:
                self.check()
                continue
            if answered:
                return value
            raise value


def gather(ray: Any, refs: list[Any], watch: HeadWatch, tick: Callable[[list[int]], None]) -> list[Any]:
    """The answers of the tasks `refs`, in their order: waited on a second at a time, the head
    watched meanwhile, `tick(done)` (the indices answered so far) called at the start, after each
    answer and each second of waiting (where a cancellation is met). Anything raised on the way
    (cancelled, the cluster failing) cancels every task first: none runs on for nobody."""
    index = {ref: i for i, ref in enumerate(refs)}
    answers: dict[int, Any] = {}
    try:
        tick([])
        waiting = list(refs)
        while waiting:
            done, waiting = ray.wait(waiting, num_returns=1, timeout=1.0)
            if done:
                answers[index[done[0]]] = ray.get(done[0])
            else:
                watch.check()
            tick(sorted(answers))
    except BaseException:
        for ref in refs:
            ray.cancel(ref, force=True)
        raise
    return [answers[i] for i in range(len(refs))]


def cluster_cpus_gpus(ray: Any, watch: HeadWatch | None = None) -> tuple[float, float, int]:
    """The cluster's CPUs, GPUs and alive nodes (asked under `watch` while a step runs)."""
    def ask() -> tuple[dict[str, float], list[dict[str, Any]]]:
        return ray.cluster_resources(), ray.nodes()

    resources, listed = watch.call(ask) if watch is not None else ask()
    nodes = sum(1 for n in listed if n.get("Alive"))
    return float(resources.get("CPU", 0.0)), float(resources.get("GPU", 0.0)), nodes


@dataclass(frozen=True)
class Workers:
    """What a step ran on the cluster: how many workers, on how many nodes, holding how many GPUs."""

    count: int
    nodes: int
    gpus: float = 0.0


def task_error(found: dict[str, Any]) -> DeftError:
    """A DeftError a Ray task caught and sent back as data (it does not survive pickling)."""
    return DeftError(found["code"], found["message"], fix=found.get("fix"), **found.get("details", {}))


def as_data(exc: DeftError) -> dict[str, Any]:
    return {"code": exc.code, "message": exc.message, "fix": exc.fix, "details": exc.details}


class RayBackend:
    name = "ray"
    capabilities = Capabilities(writes_pairs=True, runs_tao_checkpoints=False, runs_unique_matching=True,
                                runs_text_embeddings=True, guards_in_search=True)

    def __init__(self, address: str | None = None) -> None:
        self.address = wanted_address(address)

    def check(self, output_dir: Path, store: Path | None = None) -> tuple[list[Check], list[str]]:
        try:
            ray = connect(self.address)
        except DeftError as exc:
            if "version mismatch" in exc.message.lower():  # ray.init compares Ray and Python with the head's
                return [Check.of("ray versions", "fail", exc.message, "install the cluster's Python and Ray "
                                 "versions here (or run deft-mine from a node of the cluster)")], []
            return [Check.of("ray", "fail", exc.message, exc.fix)], []
        cpus, gpus, nodes = cluster_cpus_gpus(ray)
        return [Check.of("ray", "ok" if cpus >= 1 else "fail",
                         f"Ray {ray.__version__} at {self.address}: {nodes} node(s), "
                         f"{cpus:g} CPU(s), {gpus:g} GPU(s)" + ("" if gpus else " (encoders run on CPUs)"),
                         None if cpus >= 1 else "add a node with CPUs to the cluster")], []

    def check_nodes(self, samples: list[Path], output_dir: Path) -> list[Check]:
        """Preflight from every node: the driver's versions, the sample images readable, the output
        folder writable (nothing when the cluster is unreachable: check() said so)."""
        from deft_mine.backends.ray_check import node_checks

        try:
            ray = connect(self.address)
        except DeftError:
            return []
        with self._cluster_errors(ray):
            return node_checks(ray, samples, output_dir)

    def accepts(self, spec: MiningSpec) -> None:
        """Every mining key runs here."""

    def embed(self, spec: EmbeddingSpec, listing: Listing, output_path: Path, events: Events,
              store: Path | None) -> BackendEmbed:
        from deft_mine.backends.local import LocalBackend, embedded_with
        from deft_mine.backends.ray_client import embed_through_client
        from deft_mine.backends.ray_embed import embed_on_ray

        def work(ray: Any, watch: HeadWatch) -> tuple[BackendEmbed, Workers]:
            t0 = time.perf_counter()
            # The driver holds one encoder too: its identity names the output and keys the store.
            encoder = LocalBackend.shared().encoder(spec, events)
            load_seconds = time.perf_counter() - t0
            if self.address.startswith("ray://"):
                stats, used = embed_through_client(ray, spec, listing, output_path, events, store, watch)
            else:
                stats, used = embed_on_ray(ray, spec, listing, output_path, encoder, events, store, watch,
                                           actors=spec.workers)
            return embedded_with(encoder, stats, load_seconds), used

        return self._step(work)

    def mine(self, spec: MiningSpec, source_path: Path, target_path: Path, outputs: MineOutputs,
             events: Events) -> BackendMine:
        from deft_mine.backends.ray_mine import mine_on_ray

        return self._step(lambda ray, watch: mine_on_ray(ray, spec, source_path, target_path, outputs, events, watch))

    def accepts_text(self) -> None:
        """Sentences run here: the text tower runs in a task on the cluster."""

    def embed_text(self, spec: EmbeddingSpec, listing: Listing, output_path: Path, events: Events,
                   store: Path | None) -> BackendEmbed:
        from deft_mine.backends.ray_embed import embed_text_on_ray

        return self._step(lambda ray, watch: embed_text_on_ray(ray, spec, listing, output_path, events, store, watch))

    def match(self, spec: UniqueMatchingSpec, events: Events) -> BackendMatch:
        """The engine's passes here (the claims are one after another), each pass's pool search one
        task per pool shard on the cluster."""
        from deft_mine.backends.ray_match import match_on_ray

        return self._step(lambda ray, watch: match_on_ray(ray, spec, events, watch))

    def _step(self, work: Callable[[Any, HeadWatch], tuple[DoneT, Workers]]) -> DoneT:
        """`work(ray, watch)` on the attached cluster, its failures coded; its answer says where
        it ran: the cluster as it is now, and the workers the step used."""
        with attached(self.address) as ray:
            with self._cluster_errors(ray):
                watch = HeadWatch(ray, self.address)
                done, used = work(ray, watch)
                cpus, gpus, nodes = cluster_cpus_gpus(ray, watch)
            done.cluster = ClusterFacts(address=self.address, ray_version=ray.__version__, nodes=nodes, cpus=cpus,
                                        gpus=gpus, workers=used.count, nodes_used=used.nodes, gpus_used=used.gpus)
        return done

    @contextlib.contextmanager
    def _cluster_errors(self, ray: Any) -> Iterator[None]:
        """The cluster failing under the work (a node or the head lost, an actor that cannot be
        restarted) is a coded error naming the address; a bug in a task stays a bug."""
        try:
            yield
        except ray.exceptions.RayTaskError:
            raise
        except ray.exceptions.RayError as exc:
            raise DeftError("ray_failed", f"the Ray cluster at {self.address} failed during the work "
                            f"({exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''})",
                            fix="check the cluster (ray status) and run again; outputs were not written",
                            field="ray_address", address=self.address) from exc
