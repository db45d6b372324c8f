"""The preflight tool: can this backend run here, which encoder is this session bound to, and
which warnings will the given inputs raise, all before any work."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

from pydantic import BaseModel, Field

from deft_mine import __version__
from deft_mine.backends import BACKENDS
from deft_mine.engine import store
from deft_mine.engine.images import resolve_image_path
from deft_mine.engine.mining import normalise_filepath
from deft_mine.errors import DeftError
from deft_mine.schemas.results import EncoderIdentity, ToolWarning
from deft_mine.schemas.specs import MiningSpec, load_spec, split_overrides
from deft_mine.tools.guards import EncoderLock, PathPolicy, check_paths

_IMAGE_SAMPLE = 500  # rows per side whose image files are checked for existence


class Check(BaseModel):
    name: str
    ok: bool = Field(description="false only for status fail")
    status: Literal["ok", "warn", "fail"] = "ok"
    detail: str = Field(description="what was found")
    fix: str | None = Field(None, description="the exact fix, when not ok")


def _check(name: str, status: str, detail: str, fix: str | None = None) -> Check:
    return Check(name=name, ok=status != "fail", status=status, detail=detail, fix=fix)


class PreflightResult(BaseModel):
    ok: bool = Field(description="every check passed: the backend can run here")
    backend: str
    checks: list[Check]
    versions: dict[str, str]
    gpu: list[str] = Field(default_factory=list, description="CUDA devices torch sees")
    session_encoder: EncoderIdentity | None = Field(
        None, description="the encoder this session is bound to (set by its first embed or run)")
    warnings: list[ToolWarning] = Field(default_factory=list,
                                        description="warnings the given inputs will raise")


def preflight(
    backend: str = "local",
    image: str | None = None,
    targets: str | Path | None = None,
    source: str | Path | None = None,
    mining_spec_path: str | Path | None = None,
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
    policy: PathPolicy | None = None,
    lock: EncoderLock | None = None,
    output_dir: str | Path | None = None,
) -> PreflightResult:
    if backend not in BACKENDS:
        raise DeftError("spec_invalid", f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}",
                        fix="use backend=local or docker", field="backend")
    check_paths(policy, targets=targets, source=source, mining_spec_path=mining_spec_path)
    checks: list[Check] = []
    versions = {"deft-mine": __version__, "python": platform.python_version()}
    for package in ("torch", "transformers", "faiss-cpu", "pyarrow", "pillow"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    gpu: list[str] = []
    if backend == "local":
        try:
            import torch

            gpu = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            checks.append(_check("torch", "ok" if gpu else "warn", f"torch {torch.__version__}; "
                                 + (f"CUDA: {', '.join(gpu)}" if gpu else "no CUDA GPU: encoders run on the CPU"),
                                 None if gpu else "fine for thumbnail and small pools; use a GPU machine "
                                 "for SigLIP/CLIP on large pools"))
        except Exception as exc:  # a broken torch install is exactly what preflight is for
            checks.append(_check("torch", "fail", f"cannot import torch: {exc}",
                                 "pip install torch (CPU: torch==2.13.0 from the constraints file)"))
        checks.append(_check("thumbnail encoder", "ok", "always available (no weights)"))
    else:
        checks.extend(_docker_checks(image, Path(output_dir) if output_dir else Path.cwd()))
    warnings = predict_warnings(targets, source, mining_spec_path, overrides)
    return PreflightResult(ok=all(c.ok for c in checks), backend=backend, checks=checks,
                           versions=versions, gpu=gpu,
                           session_encoder=lock.identity if lock is not None else None,
                           warnings=warnings)


def _docker_checks(image: str | None, output_dir: Path) -> list[Check]:
    """Daemon, NVIDIA runtime, GPU, image, disk and mountability — a few seconds at most."""
    import shutil

    from deft_mine.backends.docker import resolve_image

    checks: list[Check] = []
    wanted = resolve_image(image)
    try:
        import docker

        client = docker.from_env(timeout=5)
        info = client.info()
    except Exception as exc:  # not installed, no socket, permission denied, stopped daemon
        return [_check("docker daemon", "fail", f"cannot reach the Docker daemon: {exc}",
                       "start it (`sudo systemctl start docker`, or `dockerd &`) and check that this "
                       "user may use /var/run/docker.sock (e.g. the docker group); or use backend=local")]
    checks.append(_check("docker daemon", "ok", f"Docker {info.get('ServerVersion')} reachable"))
    runtimes = info.get("Runtimes") or {}
    checks.append(_check("nvidia runtime", "ok" if "nvidia" in runtimes else "warn",
                         f"runtimes: {', '.join(runtimes) or 'none'}",
                         None if "nvidia" in runtimes else
                         "install the NVIDIA Container Toolkit for GPU containers (CPU containers work without)"))
    gpu = shutil.which("nvidia-smi")
    checks.append(_check("gpu", "ok" if gpu else "warn", "nvidia-smi found" if gpu else "no nvidia-smi on this host",
                         None if gpu else "TAO checkpoints need a GPU machine; SigLIP/CLIP/thumbnail run on CPU"))
    try:
        client.images.get(wanted)
        checks.append(_check("image", "ok", f"{wanted} is present locally"))
    except docker.errors.ImageNotFound:
        checks.append(_check("image", "fail", f"{wanted} is not on this machine",
                             f"docker pull {wanted} (or build docker/Dockerfile as {wanted}), or pass --image"))
    folder = output_dir if output_dir.exists() else output_dir.parent
    free = shutil.disk_usage(folder).free / 2**30
    checks.append(_check("disk", "ok" if free >= 5 else "warn", f"{free:.1f} GiB free in {folder}",
                         None if free >= 5 else "free space: embeddings of a large pool take GBs"))
    writable = os.access(folder, os.W_OK)
    checks.append(_check("workspace", "ok" if writable else "fail",
                         f"{folder} is {'writable (bind-mounted at the same path)' if writable else 'not writable'}",
                         None if writable else f"make {folder} writable by uid {os.getuid()}"))
    return checks


def predict_warnings(targets: str | Path | None, source: str | Path | None,
                     mining_spec_path: str | Path | None,
                     overrides: Mapping[str, Any] | Sequence[str] | None) -> list[ToolWarning]:
    """The warnings a run on these inputs will raise that the files already show."""
    _, mine_over = split_overrides(overrides or ())
    mining = load_spec(MiningSpec, mining_spec_path, mine_over)
    warnings: list[ToolWarning] = []
    sides = {name: store.require_file(Path(p).expanduser().absolute(), name)
             for name, p in (("targets", targets), ("source", source)) if p is not None}
    schemas = {name: store.schema_of(path) for name, path in sides.items()}
    for name, path in sides.items():
        store.require_columns(path, schemas[name], ["filepath"], name)
    filepaths = {name: store.read_columns(path, ["filepath"]).column("filepath").to_pylist()
                 for name, path in sides.items()}
    if mining.filter_by_label and len(sides) == 2:
        missing = [n for n in ("source", "targets") if "label" not in schemas[n].names]
        if missing:
            warnings.append(ToolWarning(
                code="filter_by_label_noop",
                message=f"filter_by_label=true will do nothing: the {' and '.join(missing)} file has "
                        "no 'label' column, so mining would run unfiltered",
                fields=["filter_by_label", "label"], details={"sides_without_label": missing}))
    if len(sides) == 2:
        queries, pool = store.num_rows(sides["targets"]), store.num_rows(sides["source"])
        if queries and mining.topn * queries > pool:
            warnings.append(ToolWarning(
                code="pool_exhausted",
                message=f"topn × targets = {mining.topn * queries} exceeds the {pool} pool rows; "
                        "fewer unique images than that will be mined",
                fields=["topn"], details={"topn": mining.topn, "queries": queries, "pool": pool}))
        # the same comparison mining makes (normpath of each side's filepath)
        target_paths = {normalise_filepath(str(p)) for p in filepaths["targets"] if p is not None}
        overlap = sum(p is not None and normalise_filepath(str(p)) in target_paths for p in filepaths["source"])
        if overlap:
            warnings.append(ToolWarning(
                code="target_in_pool",
                message=f"{overlap} pool rows are also targets; they will be mined like any other "
                        "row unless exclude_targets=true",
                fields=["filepath", "exclude_targets"], details={"count": overlap}))
    for name, path in sides.items():
        paths = filepaths[name][:_IMAGE_SAMPLE]
        missing_images = [p for p in paths if p is None or not resolve_image_path(str(p), path.parent).is_file()]
        if missing_images:
            warnings.append(ToolWarning(
                code="images_skipped",
                message=f"{name}: {len(missing_images)} of the first {len(paths)} image paths do not "
                        f"exist (relative paths resolve against {path.parent}); e.g. {missing_images[0]}",
                fields=["filepath", "image_root"],
                details={"side": name, "count": len(missing_images), "checked": len(paths),
                         "examples": [str(p) for p in missing_images[:5]]}))
    for name, path in sides.items():
        if not store.is_csv(path) and "embedding" in schemas[name].names and store.read_identity(path) is None:
            warnings.append(ToolWarning(
                code="provenance_unknown",
                message=f"{name}: this embedding parquet records no encoder identity",
                fields=[name], details={"sides": [name]}))
    return warnings
