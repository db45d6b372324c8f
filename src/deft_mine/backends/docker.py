"""The docker backend: runs an image with the TAO entrypoint contract through the Docker SDK.

The workspace (every input, output and image of the call) is bind-mounted at its own path, so
paths mean the same inside and out; model files are mounted read-only; the container runs as the
caller, without network unless asked, and is removed afterwards — also when the call is cancelled.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, TypeVar

from deft_mine import rules
from deft_mine.backends import container
from deft_mine.backends.base import BackendEmbed, BackendMatch, BackendMine, Capabilities, MineOutputs
from deft_mine.backends.container import Job
from deft_mine.backends.local import write_floor_stage, write_mining
from deft_mine.engine import tables
from deft_mine.engine.embedding import EmbedStats
from deft_mine.engine.listings import Listing
from deft_mine.engine.mining import mine_files
from deft_mine.errors import DeftError
from deft_mine.events import Events
from deft_mine.schemas import artifacts, warnings
from deft_mine.schemas.results import Check, EmbedResult, EncoderIdentity, MatchResult, MineResult
from deft_mine.schemas.specs import (AllocationPolicy, EmbeddingSpec, ExcludeBy, LabelFilter, MiningSpec, Side,
                                     UniqueMatchingSpec, spec_to_yaml)

ResultT = TypeVar("ResultT", EmbedResult, MineResult, MatchResult)

DEFAULT_IMAGE = "deft-mine:latest"
SPEC_FOLDER = ".deft-mine"  # beside the outputs: the exact spec each container ran with
# Warnings of the mining controls that our image's engine raises (read back from its result JSON).
_CONTROL_WARNINGS = ("targets_without_neighbours", "floor_removed_all", "label_missing_in_pool")
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
    # pairs: recomputed on the host; the image reads parquet listings only; unique matching and
    # text embeddings when the image has the action (match() and accepts_text() ask its schema first)
    capabilities = Capabilities(writes_pairs=True, runs_tao_checkpoints=True, reads_parquet_only=True,
                                runs_unique_matching=True, runs_text_embeddings=True)

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
        # Relative filepaths resolve in the working directory, for an image that knows no image_root.
        job = Job(["embedding", "image_embeddings", "-e"], image_root, workspace, _model_mounts(spec), [output_path],
                  output_path.with_suffix(".log"), store, spec.device)
        known = self._known_keys(job, output_path.parent)
        _refuse_unknown(spec, known, ("pooling",))  # device, image_root, workers: met another way, or moot
        inside = spec.model_copy(update={"input_parquet": str(input_path), "output_parquet": str(output_path),
                                         "image_root": str(image_root)} | (
            {"device": "cuda:0"} if spec.device.startswith("cuda:") else {}))  # the one GPU it is given
        job.command.append(str(self._write_spec(output_path, "embedding_spec.yaml", inside, known)))
        timings = self._run(job, events)
        return self._read_back(spec, output_path, listing.rows, timings, "unreadable (in the container)")

    def accepts_text(self) -> None:
        """Refuse, before any work (and before a run folder exists), sentences for an image whose
        schema has no `embedding text_embeddings`: the question is asked in a folder of its own."""
        with tempfile.TemporaryDirectory(prefix="deft-mine-question-") as folder:
            self._text_keys(Path(folder))

    def embed_text(self, spec: EmbeddingSpec, listing: Listing, output_path: Path, events: Events,
                   store: Path | None) -> BackendEmbed:
        """`embedding text_embeddings -e SPEC` in the image (refused naming the action where its
        schema lacks it). Null and blank texts, which the container's tokenizer cannot take, are
        left out beforehand and counted, as the local backend counts them."""
        known = self._text_keys(output_path.parent)
        given, skipped, examples = _texts_for_container(listing.path, output_path)
        try:
            workspace = Path(os.path.commonpath([given.parent, output_path.parent]))
            job = Job(list(TEXT_STEP), output_path.parent / SPEC_FOLDER, workspace, _model_mounts(spec), [output_path],
                      output_path.with_suffix(".log"), store, spec.device)
            inside = spec.model_copy(update={"input_parquet": str(given), "output_parquet": str(output_path)} | (
                {"device": "cuda:0"} if spec.device.startswith("cuda:") else {}))
            job.command.append(str(self._write_spec(output_path, "embedding_spec.yaml", inside, known)))
            timings = self._run(job, events)
        finally:
            if given != listing.path:
                given.unlink(missing_ok=True)
        done = self._read_back(spec, output_path, listing.rows, timings, "")
        done.stats.rows_in = listing.rows  # our image counted the rows it was given
        done.stats.skipped_by_reason += skipped
        done.stats.skipped_examples = (examples + done.stats.skipped_examples)[:_EXAMPLES]
        return done

    def _text_keys(self, folder: Path) -> frozenset[str]:
        """The image's `embedding text_embeddings` keys (asked once per image), or the refusal."""
        job = Job(list(TEXT_STEP), folder, folder)
        try:
            known = self._known_keys(job, folder)
        except DeftError as exc:
            if exc.code != "container_failed":
                raise
            raise text_unsupported(self.image, "it could not answer `--cfg=job` for the action") from exc
        if not {"input_parquet", "model", "model_path"} <= known:
            raise text_unsupported(self.image, "its `embedding text_embeddings --cfg=job` schema has no "
                                               "input_parquet, model and model_path")
        return known

    def _read_back(self, spec: EmbeddingSpec, output_path: Path, rows_in: int, timings: dict[str, float],
                   lost: str) -> BackendEmbed:
        """What an embedding container did: our image's result JSON, else the file's counts (rows
        it did not write counted as `lost`), with the identity the spec names and the image."""
        told = _task_result(output_path, EmbedResult)  # our image says what it did
        if told is not None:
            stats = EmbedStats(told.input_rows, told.rows, skipped_by_reason=Counter(told.skipped_by_reason), **told.model_dump(
                include={"reused", "embedded", "seconds_saved", "corrupt_shards", "skipped_examples", "columns"}))
            return BackendEmbed(stats, told.encoder, told.embedding_dim, self._device(), timings)
        rows = tables.num_rows(output_path)
        dim = 0
        if rows:
            first = next(tables.iter_batches(output_path, 1, ["embedding"]))
            dim = len(first.column("embedding")[0].as_py())
        stats = EmbedStats(rows_in, rows, columns=list(tables.schema_of(output_path).names), skipped_by_reason=Counter(
            {lost: rows_in - rows} if lost and rows_in > rows else {}))
        return BackendEmbed(stats, tables.read_identity(output_path) or EncoderIdentity(
            model=spec.model, model_path=spec.model_path, model_config_path=spec.model_config_path,
            preprocessing={"image": self.image}), dim, self._device(), timings)

    def mine(self, spec: MiningSpec, source_path: Path, target_path: Path, outputs: MineOutputs,
             events: Events) -> BackendMine:
        job = self._mining_job(outputs.mined, source_path, target_path)
        known = self._known_keys(job, outputs.mined.parent)  # asked already by accepts(): cached
        # Keys of ours the image does not know that change the answer: the host then mines the two
        # embedding parquets itself with the whole spec; the image's own output is kept as a record
        # (mined_raw.parquet, its log), and the answer is the host's.
        on_host = [key for key in _HOST_KEYS if key not in known and _set(spec, key)]
        given = outputs.mined.parent / artifacts.MINED_RAW if on_host else outputs.mined
        job.outputs = [given, given.parent / artifacts.SUMMARY]
        job.command.append(str(self._write_spec(given, "mining_spec.yaml", spec.model_copy(update={
            "source_parquet": str(source_path), "target_parquet": str(target_path), "output_parquet": str(given)}),
            known)))
        timings = self._run(job, events)
        if on_host:
            events.log("info", f"{', '.join(on_host)}: {self.image} does not know it; applied on the host")
        if on_host or outputs.pairs is not None:  # the pairs the image kept, recomputed exactly here
            done = mine_files(source_path, target_path, spec, events=events)
            if on_host:
                return write_mining(done, outputs)
            if done.near_duplicates is not None:  # mined files with identical bytes (identical_images, always
                # on): the host's answer, which mines each once; the image's is kept as a record
                os.replace(outputs.mined, outputs.mined.parent / artifacts.MINED_RAW)
                events.log("info", f"{done.summary.identical_images} mined file(s) repeat another's bytes: "
                                   "mined once, on the host")
                return write_mining(done, outputs)
            tables.write_table_atomic(outputs.pairs, done.pairs)
            if done.floor is not None:  # the loop checks kept_count against the file the image wrote
                done.floor.kept = tables.num_rows(outputs.mined)
            for raw_only in (True, False):  # the loop's floor-stage files (a run's), from the same pairs
                write_floor_stage(done, outputs, raw_only)
            mined = self._read_mining(spec, source_path, target_path, outputs, timings, job.log)
            # what the host saw in the same pairs (e.g. label_null: the image matched two null labels)
            mined.warnings += [w for w in done.warnings if w.code not in {x.code for x in mined.warnings}]
            return mined
        return self._read_mining(spec, source_path, target_path, outputs, timings, job.log)

    def accepts(self, spec: MiningSpec) -> None:
        """Refuse, before any container works, a mining key neither the image nor the host can apply."""
        output = Path(str(spec.output_parquet)).expanduser().absolute()
        job = self._mining_job(output, *(Path(str(p)).expanduser().absolute() for p in (spec.source_parquet,
                                                                                           spec.target_parquet)))
        _refuse_unknown(spec, self._known_keys(job, output.parent), _REFUSED)

    def match(self, spec: UniqueMatchingSpec, events: Events) -> BackendMatch:
        """`tmm unique_neighbor_matching -e SPEC` in the image, when its schema shows the action
        (refused naming the image otherwise); summary.json and the warning read back."""
        out = Path(spec.output_dir).expanduser().absolute()
        paths = {key: Path(value).expanduser().absolute() for key in UNIQUE_PATHS if (value := getattr(spec, key))}
        workspace = Path(os.path.commonpath([out, *(p if p.is_dir() else p.parent for p in paths.values())]))
        job = Job(list(UNIQUE_STEP), out / SPEC_FOLDER, workspace, log=out / SPEC_FOLDER / f"{UNIQUE_STEP[1]}.log")
        with tempfile.TemporaryDirectory(prefix="deft-mine-question-") as folder:  # a refusal writes nothing
            asked = Job(list(UNIQUE_STEP), Path(folder), Path(folder))
            try:
                known = self._known_keys(asked, Path(folder))
            except DeftError as exc:
                if exc.code != "container_failed":
                    raise
                raise unique_unsupported(self.image, "it could not answer `--cfg=job` for the action") from exc
        has_unique_action(self.image, known)
        if not _entrypoint(_client(), self.image)[1]:
            _refuse_ours_only(spec, self.image)
        final, summary = out / artifacts.UNIQUE_FINAL, out / artifacts.UNIQUE_SUMMARY
        job.outputs = [final, summary]
        inside = spec.model_copy(update={key: str(path) for key, path in paths.items()} | {"output_dir": str(out)})
        # the container's rare_class_list is one comma-separated string (a list is refused by its schema)
        job.command.append(str(self._write_spec(final, "unique_matching_spec.yaml", inside, known,
                                                {"rare_class_list": ",".join(spec.rare_class_list)})))
        timings = self._run(job, events)
        written = json.loads(summary.read_text(encoding="utf-8"))
        told = _task_result(final, MatchResult)  # our image says what it warned
        return BackendMatch(written, told.warnings if told is not None else _short_from(written), timings)

    def _mining_job(self, output: Path, source_path: Path, target_path: Path) -> Job:
        """The mining container's job: it runs in the spec folder beside the output."""
        workspace = Path(os.path.commonpath([source_path.parent, target_path.parent, output.parent]))
        return Job(["tmm", "nearest_neighbors", "-e"], output.parent / SPEC_FOLDER, workspace,
                   log=output.parent / artifacts.KNN_LOG)

    def _read_mining(self, spec: MiningSpec, source_path: Path, target_path: Path, outputs: MineOutputs,
                     timings: dict[str, float], log: Path | None) -> BackendMine:
        """What the image's mining step wrote: its summary (either release's, or ours), the label
        filter's outcome from our image's result or NVIDIA's log, the counts the files tell."""
        summary = artifacts.MiningSummary.parse(outputs.summary.read_text(encoding="utf-8"))
        told = _task_result(outputs.mined, MineResult)
        # An image other than ours may name fewer counts: the files still tell these two.
        summary.queries = tables.num_rows(target_path) if summary.queries is None else summary.queries
        summary.mined = tables.num_rows(outputs.mined) if summary.mined is None else summary.mined
        label_missing = [side for side, path in ((Side.source, source_path), (Side.target, target_path))
                         if "label" not in tables.schema_of(path).names]
        both = [Side.source, Side.target]
        if told is not None:
            summary.label_filter = LabelFilter(told.label_filter)
        elif summary.label_filter is None:  # NVIDIA's image: its log is all there is
            lines = log.read_text(encoding="utf-8").splitlines() if log is not None and log.is_file() else []
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

    # ------------------------------------------------------------------ the container

    def _write_spec(self, output_path: Path, name: str, spec: Any, known: frozenset[str],
                    spelled: dict[str, Any] | None = None) -> Path:
        """The spec the image gets: only the keys its schema takes (the rest are ours), none left
        unset (a typed schema refuses a null; its own default applies), and the values `spelled`
        as the image's schema types them."""
        path = output_path.parent / SPEC_FOLDER / f"{output_path.stem}.{name}"
        left_out = (set(type(spec).model_fields) - known) | {key for key, value in spec if value is None}
        tables.write_text_atomic(path, spec_to_yaml(spec, left_out, spelled))
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

    def _image_id(self, client: Any) -> str:
        """The image's id (its content digest: a tag can move, the id cannot), or image_missing."""
        import docker

        try:
            self.image_id = client.images.get(self.image).id
        except docker.errors.ImageNotFound as exc:
            raise DeftError("image_missing", f"docker image {self.image} is not on this machine",
                            fix=f"docker pull {self.image} (or build docker/Dockerfile), or pass --image",
                            image=self.image) from exc
        return self.image_id

    def _known_keys(self, job: Job, beside: Path) -> frozenset[str]:
        client = _client()
        return container.known_keys(client, self.image, self._image_id(client), job,
                                    beside / SPEC_FOLDER / f"{job.command[1]}.cfg_job.yaml", self.mounts, self.network)

    def _run(self, job: Job, events: Events) -> dict[str, float]:
        """Run the step's container; its timings."""
        t0 = time.perf_counter()
        client = _client()
        self._image_id(client)
        container.run(client, self.image, job, events, self.mounts, self.network)
        seconds = time.perf_counter() - t0
        return {"container": seconds, "total": seconds}


# Mining keys of ours the host applies when the image does not know them (the floor in any of its
# three spellings and its rule, exclude_targets, the leakage guard's leaks_parquet: the rows its search
# leaves out, or protected_parquet: what a `mine` spec's search judges its candidates against, the
# near-duplicate collapse); label_mode=per_label it cannot apply afterwards (refused).
_HOST_KEYS = ("distance_threshold", "min_similarity", "max_distance", "floor_rule", "exclude_targets",
              "leaks_parquet", "protected_parquet", "dedup_similarity", "dedup_distance")
_REFUSED = ("label_mode",)


UNIQUE_STEP = ("tmm", "unique_neighbor_matching", "-e")
TEXT_STEP = ("embedding", "text_embeddings", "-e")
_EXAMPLES = 5  # skipped rows named by example


def _model_mounts(spec: EmbeddingSpec) -> list[Path]:
    """What an embedding container reads besides its workspace: the model's files and the
    Hugging Face cache, read-only."""
    hf_home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    read_only = [Path(p).expanduser().absolute() for p in (spec.model_path, spec.model_config_path)
                 if p and Path(p).expanduser().exists()]
    return read_only + ([hf_home.expanduser().absolute()] if hf_home.is_dir() else [])


def text_unsupported(image: str, why: str) -> DeftError:
    return DeftError("backend_unsupported", f"{image} cannot run embedding text_embeddings: {why}",
                     fix="use backend=local (the text tower runs in-process), or an image that has the action "
                         "(NVIDIA's data-services 7.1.0 or later, or deft-mine's: docker/Dockerfile)",
                     field="backend", image=image, action="embedding text_embeddings")


def _texts_for_container(path: Path, output_path: Path) -> tuple[Path, Counter[str], list[str]]:
    """The text parquet the container reads: `path` itself, or (when some texts are null or
    blank) its other rows written beside the output as a hidden parquet; and the rows left out."""
    import pyarrow as pa

    table = tables.read_columns(path, tables.schema_of(path).names)
    texts = table.column("text").to_pylist()
    reasons = {i: "null text" if text is None else "empty text" for i, text in enumerate(texts)
               if not (isinstance(text, str) and text.strip())}
    if not reasons:
        return path, Counter(), []
    given = output_path.with_name(f".{output_path.name}.texts.parquet")
    keep = pa.array([i for i in range(len(texts)) if i not in reasons], pa.int64())
    tables.write_table_atomic(given, table.take(keep))
    return given, Counter(reasons.values()), [f"row {i}: {why}" for i, why in list(reasons.items())[:_EXAMPLES]]


def unique_unsupported(image: str, why: str) -> DeftError:
    return DeftError("backend_unsupported", f"{image} cannot run tmm unique_neighbor_matching: {why}",
                     fix="use backend=local, or an image that has the action (deft-mine's: docker/Dockerfile)",
                     field="backend", image=image, action="tmm unique_neighbor_matching")


def has_unique_action(image: str, known: frozenset[str]) -> None:
    """The image's `--cfg=job` keys must be unique matching's (its required key among them)."""
    if "desired_unique_count" not in known:
        raise unique_unsupported(image, "its `tmm unique_neighbor_matching --cfg=job` schema has no "
                                        "desired_unique_count")


def _short_from(summary: dict[str, Any]) -> list[Any]:
    """unique_count_short from an image that records no result JSON: summary.json's counts."""
    desired, got = summary.get("desired_unique_count"), summary.get("retrieved_unique_count")
    if desired is None or got is None or got >= desired:
        return []
    return [warnings.unique_count_short(desired, got, (summary.get("shortfall") or {}).get("groups", []))]


def _set(spec: Any, key: str) -> bool:
    """Whether a spec gives `key` a value other than its default (a negative distance_threshold is off)."""
    if key == "distance_threshold":
        return spec.distance_threshold >= 0
    return getattr(spec, key) != type(spec).model_fields[key].default


def _refuse_unknown(spec: Any, known: frozenset[str], keys: tuple[str, ...]) -> None:
    """Keys that change the answer, which neither the image nor the host can apply, are refused."""
    for key in keys:
        if key not in known and _set(spec, key):
            raise DeftError("backend_unsupported", f"{key}={getattr(spec, key)}: the image's schema has no "
                            f"`{key}` (it would refuse or ignore it), and the host cannot apply it afterwards",
                            fix=f"use deft-mine's image (docker/Dockerfile, --image deft-mine:latest) or "
                                f"backend=local, or leave {key} out", field=key)


UNIQUE_PATHS = ("source_path", "target_path", "exclude_path", "source_detection_file", "target_detection_file")


def _refuse_ours_only(spec: UniqueMatchingSpec, image: str) -> None:
    """What NVIDIA's unique matching cannot be asked: classes from `label` (it reads COCO/KITTI
    files only), exclusion by full path alone (it also drops every file of the same name), and the
    near-duplicate rule while claiming."""
    if spec.allocation_policy is AllocationPolicy.class_stratified and not (
            spec.source_detection_file and spec.target_detection_file):
        raise unique_unsupported(image, "its class_stratified reads each image's classes from COCO/KITTI detection "
                                 "files only (source_detection_file, target_detection_file, detection_format), "
                                 "not from the rows' `label`s")
    if spec.exclude_by is ExcludeBy.path:
        raise unique_unsupported(image, "its exclude_path also excludes every pool file of the same file name "
                                 "(exclude_by=path is deft-mine's)")
    if spec.dedup is not None:
        raise unique_unsupported(image, "it claims near-duplicate files side by side (dedup_similarity / "
                                 "dedup_distance while claiming is deft-mine's)")
    if spec.leaks_parquet or spec.protected_parquet:
        raise unique_unsupported(image, "it cannot be told to leave the leakage guard's rows out (leaks_parquet "
                                 "and protected_parquet are deft-mine's)")


def _entrypoint(client: Any, image: str) -> tuple[list[Any], bool]:
    """The image's entrypoint, and whether it is deft-mine's own (deft-mine-task)."""
    entrypoint = client.images.get(image).attrs.get("Config", {}).get("Entrypoint") or []
    return entrypoint, any("deft-mine-task" in str(part) for part in entrypoint)


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
