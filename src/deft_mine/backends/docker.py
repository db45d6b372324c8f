"""The docker backend: runs an image with the TAO entrypoint contract through the Docker SDK.

The workspace (every input, output and image of the call) is bind-mounted at its own path, so
paths mean the same inside and out; model files are mounted read-only; the container runs as the
caller, without network unless asked, and is removed afterwards — also when the call is cancelled.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any, TypeVar

from deft_mine import rules
from deft_mine.backends.base import BackendEmbed, BackendMine, Capabilities, MineOutputs
from deft_mine.engine import tables
from deft_mine.engine.embedding import EmbedStats
from deft_mine.engine.listings import Listing
from deft_mine.engine.store import open_store
from deft_mine.errors import DeftError
from deft_mine.events import Events
from deft_mine.schemas import artifacts
from deft_mine.schemas.results import Check, EmbedResult, EncoderIdentity, MineResult
from deft_mine.schemas.specs import (MINING_CONTROLS, EmbeddingSpec, LabelFilter, MiningSpec, Side, controls_at_default,
                                     spec_to_yaml)

ResultT = TypeVar("ResultT", EmbedResult, MineResult)

DEFAULT_IMAGE = "deft-mine:latest"
SPEC_FOLDER = ".deft-mine"  # beside the outputs: the exact spec each container ran with
_LOG_TAIL = 30
# Warnings of the mining controls that our image's engine raises (read back from its result JSON).
_CONTROL_WARNINGS = ("targets_without_neighbours", "floor_removed_all", "label_missing_in_pool")
_PROGRESS = re.compile(r"^\[(?P<stage>[^\]]+)\] (?P<done>\d+)/(?P<total>\d+|\?)$")
# NVIDIA's image records the filter no-op only as a log sentence about missing labels (ours
# records it in its summary and result JSON).
_NOOP = re.compile(r"filter_by_label_noop|filter_by_label.*(no|without|missing).*label", re.I)


def resolve_image(image: str | None) -> str:
    """--image, else TAO's versions.yaml under $TAO_SKILL_BANK_PATH, else our own image."""
    if image:
        return image
    bank = os.environ.get("TAO_SKILL_BANK_PATH")
    versions = Path(bank) / "versions.yaml" if bank else None
    if versions is not None and versions.is_file():
        from omegaconf import OmegaConf

        found = OmegaConf.select(OmegaConf.load(versions), "images.tao_toolkit.data_services")
        if found:
            return str(found)
    return DEFAULT_IMAGE


def _client() -> Any:
    import docker

    try:
        client = docker.from_env(timeout=30)
        client.ping()
        return client
    except Exception as exc:  # DockerException, connection refused, permission denied
        raise DeftError("docker_unavailable", f"cannot reach the Docker daemon ({exc})",
                        fix="start it (e.g. `dockerd` or `systemctl start docker`) and make sure "
                            "this user may use its socket; or use --backend local") from exc


class DockerBackend:
    name = "docker"
    capabilities = Capabilities(writes_pairs=False, runs_tao_checkpoints=True)

    def __init__(self, image: str | None = None, mounts: list[str] | None = None,
                 network: str = "none") -> None:
        self.image = resolve_image(image)
        self.mounts = [Path(m).expanduser().absolute() for m in (mounts or [])]
        self.network = network
        self.image_id: str | None = None  # the image's content digest, once a container has run

    def check(self, output_dir: Path, store: Path | None = None) -> tuple[list[Check], list[str]]:
        """Daemon, NVIDIA runtime, GPU, image, disk, mountability and whether the image can use
        the embedding store — a few seconds at most."""
        import docker

        try:
            client = docker.from_env(timeout=5)
            info = client.info()
        except Exception as exc:  # not installed, no socket, permission denied, stopped daemon
            return [Check.of("docker daemon", "fail", f"cannot reach the Docker daemon: {exc}",
                             "start it (`sudo systemctl start docker`, or `dockerd &`) and check that this "
                             "user may use /var/run/docker.sock (e.g. the docker group); or use backend=local")], []
        runtimes = info.get("Runtimes") or {}
        gpu = shutil.which("nvidia-smi")
        checks = [Check.of("docker daemon", "ok", f"Docker {info.get('ServerVersion')} reachable"),
                  Check.of("nvidia runtime", "ok" if "nvidia" in runtimes else "warn",
                           f"runtimes: {', '.join(runtimes) or 'none'}", None if "nvidia" in runtimes else
                           "install the NVIDIA Container Toolkit for GPU containers (CPU containers work without)"),
                  Check.of("gpu", "ok" if gpu else "warn", "nvidia-smi found" if gpu else "no nvidia-smi on this host",
                           None if gpu else "TAO checkpoints need a GPU machine; SigLIP/CLIP/thumbnail run on CPU")]
        try:
            entrypoint, ours = _entrypoint(client, self.image)
            checks.append(Check.of("image", "ok", f"{self.image} is present locally"))
            if store is not None:
                checks.append(Check.of("store in container", "ok" if ours else "warn", (
                    f"{store} is mounted read-write: embeddings are reused across rounds" if ours else
                    f"{self.image} is not deft-mine's image (entrypoint {entrypoint}): it cannot use the "
                    f"store {store}, so every round embeds the whole pool"),
                    None if ours else "use deft-mine's image (docker/Dockerfile) or backend=local to reuse embeddings"))
        except docker.errors.ImageNotFound:
            checks.append(Check.of("image", "fail", f"{self.image} is not on this machine",
                                   f"docker pull {self.image} (or build docker/Dockerfile as {self.image}), "
                                   "or pass --image"))
        folder = output_dir if output_dir.exists() else output_dir.parent
        free = shutil.disk_usage(folder).free / 2**30
        writable = os.access(folder, os.W_OK)
        checks += [Check.of("disk", "ok" if free >= 5 else "warn", f"{free:.1f} GiB free in {folder}",
                            None if free >= 5 else "free space: embeddings of a large pool take GBs"),
                   Check.of("workspace", "ok" if writable else "fail",
                            f"{folder} is {'writable (bind-mounted at the same path)' if writable else 'not writable'}",
                            None if writable else f"make {folder} writable by uid {os.getuid()}")]
        return checks, []

    # ------------------------------------------------------------------ the two steps

    def embed(self, spec: EmbeddingSpec, listing: Listing, output_path: Path, events: Events,
              store: Path | None) -> BackendEmbed:
        input_path, image_root = listing.path, listing.images_root
        workspace = Path(os.path.commonpath([input_path.parent, output_path.parent, image_root]))
        self._check_images(listing, workspace)
        hf_home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
        read_only = [Path(p).expanduser().absolute() for p in (spec.model_path, spec.model_config_path)
                     if p and Path(p).expanduser().exists()]
        read_only += [hf_home.expanduser().absolute()] if hf_home.is_dir() else []
        spec_file = self._write_spec(output_path, "embedding_spec.yaml",
                                     spec.model_copy(update={"input_parquet": str(input_path),
                                                             "output_parquet": str(output_path),
                                                             "image_root": str(image_root)}))
        _, timings = self._run(["embedding", "image_embeddings", "-e", str(spec_file)], workspace, read_only, events,
                               [output_path], store)
        told = _task_result(output_path, EmbedResult)  # our image says what it did
        if told is not None:
            stats = EmbedStats(told.input_rows, told.rows, skipped_by_reason=Counter(told.skipped_by_reason), **told.model_dump(
                include={"reused", "embedded", "seconds_saved", "corrupt_shards", "skipped_examples", "columns"}))
            return BackendEmbed(stats, told.encoder, told.embedding_dim, self._device(), timings)
        rows_in, rows = listing.rows, tables.num_rows(output_path)
        dim = 0
        if rows:
            first = next(tables.iter_batches(output_path, 1, ["embedding"]))
            dim = len(first.column("embedding")[0].as_py())
        stats = EmbedStats(rows_in, rows, columns=list(tables.schema_of(output_path).names), skipped_by_reason=Counter(
            {"unreadable (in the container)": rows_in - rows} if rows_in > rows else {}))
        return BackendEmbed(stats, tables.read_identity(output_path) or EncoderIdentity(
            model=spec.model, model_path=spec.model_path, model_config_path=spec.model_config_path,
            preprocessing={"image": self.image}), dim, self._device(), timings)

    def mine(self, spec: MiningSpec, source_path: Path, target_path: Path, outputs: MineOutputs,
             events: Events) -> BackendMine:
        output_path, summary_path = outputs.mined, outputs.summary  # the container writes no pairs
        workspace = Path(os.path.commonpath([source_path.parent, target_path.parent, output_path.parent]))
        unset = controls_at_default(spec)
        if len(unset) < len(MINING_CONTROLS):
            self._require_our_image([k for k in MINING_CONTROLS if k not in unset])
        # The controls at their defaults are left out, so NVIDIA's image reads the spec it always did.
        spec_file = self._write_spec(output_path, "mining_spec.yaml", spec.model_copy(update={
            "source_parquet": str(source_path), "target_parquet": str(target_path),
            "output_parquet": str(output_path)}), exclude=unset)
        lines, timings = self._run(["tmm", "nearest_neighbors", "-e", str(spec_file)], workspace, [], events,
                                   outputs=[output_path, summary_path])
        summary = artifacts.MiningSummary.parse(summary_path.read_text(encoding="utf-8"))
        told = _task_result(output_path, MineResult)
        # An image other than ours may name fewer counts: the files still tell these two.
        summary.queries = tables.num_rows(target_path) if summary.queries is None else summary.queries
        summary.mined = tables.num_rows(output_path) if summary.mined is None else summary.mined
        label_missing = [side for side, path in ((Side.source, source_path), (Side.target, target_path))
                         if "label" not in tables.schema_of(path).names]
        both = [Side.source, Side.target]
        if told is not None:
            summary.label_filter = LabelFilter(told.label_filter)
        elif summary.label_filter is None:  # NVIDIA's image: its log is all there is
            told_noop = any(map(_NOOP.search, lines))
            summary.label_filter = rules.label_filter(spec.filter_by_label, label_missing or (both if told_noop else []))
        # What the mining controls found in the data, as our image's engine said it.
        found = [w for w in (told.warnings if told is not None else []) if w.code in _CONTROL_WARNINGS]
        return BackendMine(
            summary=summary, label_missing=label_missing or (both if summary.label_filter is LabelFilter.noop else []),
            searched_rows=tables.num_rows(source_path) if summary.pool is None else summary.pool,
            timings=timings, warnings=found)

    def _device(self) -> str:
        """Where an embedding ran: the image by name and by content digest (set by _run)."""
        return f"docker:{self.image}@{self.image_id or 'unknown'}"

    def _require_our_image(self, keys: list[str]) -> None:
        """Only deft-mine's own image knows the mining controls; NVIDIA's would ignore them silently."""
        import docker

        try:
            entrypoint, ours = _entrypoint(_client(), self.image)
        except docker.errors.ImageNotFound:
            return  # the run itself says image_missing, with its fix
        if not ours:
            raise DeftError(
                "backend_unsupported", f"{', '.join(keys)}: {self.image} is not deft-mine's image (entrypoint "
                f"{entrypoint}), and the TAO container has no similarity floor or per-label search",
                fix="use deft-mine's image (docker/Dockerfile, --image deft-mine:latest) or backend=local, or "
                    f"leave {', '.join(keys)} out", field=keys[0], image=self.image)

    # ------------------------------------------------------------------ the container

    def _write_spec(self, output_path: Path, name: str, spec: Any, exclude: set[str] | None = None) -> Path:
        path = output_path.parent / SPEC_FOLDER / f"{output_path.stem}.{name}"
        tables.write_text_atomic(path, spec_to_yaml(spec, exclude))
        return path

    def _check_images(self, listing: Listing, workspace: Path) -> None:
        """Every image the container will open must be inside a mount; refuse before starting."""
        allowed = [workspace, *self.mounts]
        for _, filepath, path in listing.outside(lambda p: any(p.absolute() == root or p.absolute().is_relative_to(root)
                                                               for root in allowed), 1):
            raise DeftError("path_outside_workspace", f"{listing.path}: image {filepath} lies outside the workspace "
                            f"{workspace} mounted into the container", path=str(path.absolute()),
                            fix="move the images under the workspace, or add --mount for their folder",
                            workspace=str(workspace))

    def _run(self, command: list[str], workspace: Path, read_only: list[Path], events: Events,
             outputs: list[Path], store: Path | None = None) -> tuple[list[str], dict[str, float]]:
        """Run the container, forwarding its output line by line; the last lines go into the
        error when it fails. Returns every line it printed, and the timings of the step."""
        import docker

        t0 = time.perf_counter()
        client = _client()
        try:
            # The image's id (its content digest) is what ran: a tag can move, the id cannot.
            self.image_id = client.images.get(self.image).id
        except docker.errors.ImageNotFound as exc:
            raise DeftError("image_missing", f"docker image {self.image} is not on this machine",
                            fix=f"docker pull {self.image} (or build docker/Dockerfile), or pass --image",
                            image=self.image) from exc
        volumes = {str(workspace): {"bind": str(workspace), "mode": "rw"}}
        environment = {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
        if store is not None:  # our image reuses and adds vectors there; NVIDIA's ignores it
            volumes[str(open_store(store))] = {"bind": str(store), "mode": "rw"}
            environment["DEFT_MINE_STORE"] = str(store)
        for path in [*read_only, *self.mounts]:
            volumes.setdefault(str(path), {"bind": str(path), "mode": "ro"})
        gpus = []
        if "nvidia" in (client.info().get("Runtimes") or {}):
            gpus = [docker.types.DeviceRequest(count=-1, capabilities=[["gpu"]])]
        events.log("info", f"docker run {self.image} {' '.join(command)} (workspace {workspace})")
        container = client.containers.run(
            self.image, command, detach=True, user=f"{os.getuid()}:{os.getgid()}", ipc_mode="host",
            network_mode=self.network, volumes=volumes, working_dir=str(workspace),
            device_requests=gpus, environment=environment)
        lines: list[str] = []
        try:
            for line in _lines(container.logs(stream=True, follow=True)):
                lines.append(line)
                _forward(line, events)
            status = container.wait()
        finally:
            with contextlib.suppress(docker.errors.APIError):
                container.remove(force=True)  # also stops it when the call was cancelled
        code, tail = status.get("StatusCode", 1), lines[-_LOG_TAIL:]
        if code != 0:
            raise DeftError(
                "container_failed",
                f"{self.image} {' '.join(command[:2])} exited with {code}; last lines:\n" + "\n".join(tail),
                fix="read the log lines above; the spec the container ran is in "
                    f"{SPEC_FOLDER}/ beside the output", exit_code=code, log_tail=tail)
        missing = [str(p) for p in outputs if not p.exists()]
        if missing:
            raise DeftError("container_failed", f"{self.image} finished but wrote no {', '.join(missing)}",
                            fix="check that the image follows the TAO entrypoint contract", log_tail=tail)
        seconds = time.perf_counter() - t0
        return lines, {"container": seconds, "total": seconds}


def _entrypoint(client: Any, image: str) -> tuple[list[Any], bool]:
    """The image's entrypoint, and whether it is deft-mine's own (deft-mine-task)."""
    entrypoint = client.images.get(image).attrs.get("Config", {}).get("Entrypoint") or []
    return entrypoint, any("deft-mine-task" in str(part) for part in entrypoint)


def _lines(chunks: Any) -> Any:
    pending = b""
    for chunk in chunks:
        pending += chunk
        *complete, pending = pending.split(b"\n")
        for raw in complete:
            yield raw.decode("utf-8", "replace").rstrip("\r")
    if pending:
        yield pending.decode("utf-8", "replace")


def _forward(line: str, events: Events) -> None:
    match = _PROGRESS.match(line.strip())
    if match:
        total = None if match["total"] == "?" else int(match["total"])
        events.progress(match["stage"], int(match["done"]), total)  # raises when cancelled
        return
    level = "warning" if line.startswith(("WARNING", "WARN")) else "error" if line.startswith("ERROR") else "info"
    events.log(level, line)


def _task_result(output_path: Path, model: type[ResultT]) -> ResultT | None:
    """What deft-mine-task recorded beside its output (then removed: the run folder stays as
    the TAO contract has it); None from an image that records nothing."""
    path = output_path.parent / artifacts.task_result(output_path.name)
    if not path.is_file():
        return None
    try:
        return model.model_validate_json(path.read_text(encoding="utf-8"))
    except ValueError:
        return None
    finally:
        path.unlink(missing_ok=True)
