"""One run of an image under the TAO entrypoint contract, as the DEFT loop runs NVIDIA's image.

What that image needs (NVIDIA-TAO/tao-skill-bank, skills/applications/tao-run-deft-aoi): an
`experiment_specs/` folder in its working directory (Hydra aborts "Primary config directory not
found" without one); the caller's uid *with* the host's /etc/passwd and /etc/group (an unknown uid
fails in `getpwuid` while transformers is imported), so that what it writes belongs to the caller;
the Hugging Face offline switches; success is exit 0 *and* `Execution status: PASS` in the log;
and each step's whole log kept. Its Hydra schemas refuse unknown keys: `known_keys` asks the image
(`--cfg=job`) which keys it takes, once per image and step.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from deft_mine.engine import tables
from deft_mine.engine.store import open_store
from deft_mine.errors import DeftError
from deft_mine.events import Events, NullEvents

SPECS_FOLDER = "experiment_specs"
PASS, FAIL = "Execution status: PASS", "Execution status: FAIL"
LOG_TAIL = 30
_ACCOUNTS = ("/etc/passwd", "/etc/group")
_PASSED_ENV = ("TRANSFORMERS_OFFLINE", "HF_HOME", "HF_HUB_CACHE")
_PROGRESS = re.compile(r"^\[(?P<stage>[^\]]+)\] (?P<done>\d+)/(?P<total>\d+|\?)$")
_KEY = re.compile(r"^([a-z_][a-z0-9_]*):(?:\s|$)")  # a top-level key of --cfg=job's YAML
_known: dict[tuple[str, str], frozenset[str]] = {}  # (image id, step) -> the keys its schema takes


@dataclass
class Job:
    """One container run: its command, where it runs, what it may read and must write."""

    command: list[str]
    workdir: Path  # its working directory (relative image paths resolve here), inside `workspace`
    workspace: Path  # bind-mounted read-write at its own path
    read_only: list[Path] = field(default_factory=list)
    outputs: list[Path] = field(default_factory=list)  # must exist afterwards
    log: Path | None = None  # the whole log, kept (a failed run's too)
    store: Path | None = None  # our image's embedding store, read-write
    gpu: str | None = None  # "cuda:N": that GPU alone; else every GPU when the NVIDIA runtime is there


def run(client: Any, image: str, job: Job, events: Events, mounts: list[Path], network: str,
        question: bool = False) -> list[str]:
    """Run `job`, forwarding its output line by line; every line it printed is returned (and kept
    in `job.log`). A non-zero exit, a FAIL status, no PASS status (but for a `question`, which
    runs nothing) or a missing output is `container_failed` with the log's last lines."""
    import docker

    volumes = {str(job.workspace): {"bind": str(job.workspace), "mode": "rw"}}
    if job.store is not None:  # our image reuses and adds vectors there; NVIDIA's ignores it
        volumes[str(open_store(job.store))] = {"bind": str(job.store), "mode": "rw"}
    for path in [*job.read_only, *mounts, *(Path(a) for a in _ACCOUNTS if os.path.exists(a))]:
        volumes.setdefault(str(path), {"bind": str(path), "mode": "ro"})
    events.log("info", f"docker run {image} {' '.join(job.command)} (in {job.workdir})")
    lines: list[str] = []
    with _specs_folder(job.workdir):
        container = client.containers.run(
            image, job.command, detach=True, user=f"{os.getuid()}:{os.getgid()}", ipc_mode="host",
            network_mode=network, volumes=volumes, working_dir=str(job.workdir),
            device_requests=_gpus(client, job.gpu), environment=_environment(job.store))
        try:
            for line in _lines(container.logs(stream=True, follow=True)):
                lines.append(line)
                _forward(line, events)
            code = container.wait().get("StatusCode", 1)
        finally:
            with contextlib.suppress(docker.errors.APIError):
                container.remove(force=True)  # also stops it when the call was cancelled
            if job.log is not None:
                tables.write_text_atomic(job.log, "".join(f"{line}\n" for line in lines))
    _judge(image, job, lines, code, question)
    return lines


def known_keys(client: Any, image: str, image_id: str, job: Job, blank: Path, mounts: list[Path],
               network: str) -> frozenset[str]:
    """The spec keys the image's schema takes for this step (`<step> -e BLANK --cfg=job`, asked
    once per image; NVIDIA's entrypoint wants a spec file even for the question: an empty one)."""
    step = " ".join(job.command[:2])
    if (image_id, step) not in _known:
        tables.write_text_atomic(blank, "{}\n")
        asked = Job([*job.command[:2], "-e", str(blank), "--cfg=job"], job.workdir, job.workspace)
        lines = run(client, image, asked, NullEvents(), mounts, network, question=True)
        keys = frozenset(m.group(1) for line in lines if (m := _KEY.match(line)))
        if not keys & {"topn", "model", "desired_unique_count"}:  # no schema read: an empty spec would be silent
            raise DeftError("container_failed", f"{image} {step} --cfg=job printed no spec keys; last lines:\n"
                            + "\n".join(lines[-LOG_TAIL:]), fix="check that the image follows the TAO "
                            "entrypoint contract (`<category> <action> -e SPEC --cfg=job` prints the spec)",
                            image=image, log_tail=lines[-LOG_TAIL:])
        _known[(image_id, step)] = keys
    return _known[(image_id, step)]


def _judge(image: str, job: Job, lines: list[str], code: int, question: bool) -> None:
    tail, step = lines[-LOG_TAIL:], " ".join(job.command[:2])
    fix = "read the log lines above" + (f" (the whole log: {job.log})" if job.log else "")
    if code != 0:
        raise DeftError("container_failed", f"{image} {step} exited with {code}; last lines:\n" + "\n".join(tail),
                        fix=fix, exit_code=code, log_tail=tail)
    said = [line.strip() for line in lines]
    if not question and (FAIL in said or PASS not in said):
        raise DeftError("container_failed", f"{image} {step} exited 0 but its log says "
                        + (f"'{FAIL}'" if FAIL in said else f"no '{PASS}'") + "; last lines:\n" + "\n".join(tail),
                        fix=fix, exit_code=0, log_tail=tail)
    missing = [str(p) for p in job.outputs if not p.exists()]
    if missing:
        raise DeftError("container_failed", f"{image} finished but wrote no {', '.join(missing)}",
                        fix="check that the image follows the TAO entrypoint contract", log_tail=tail)


@contextlib.contextmanager
def _specs_folder(workdir: Path) -> Iterator[None]:
    """An `experiment_specs/` folder in the working directory while the container runs (Hydra's
    config directory); one made here is removed again when it is still empty."""
    folder = workdir / SPECS_FOLDER
    made = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DeftError("output_not_writable", f"cannot make {folder}, the {SPECS_FOLDER}/ folder the image's "
                        f"Hydra needs in its working directory: {exc.strerror or exc}", path=str(folder),
                        fix=f"make {workdir} writable, or create {folder} once yourself") from exc
    try:
        yield
    finally:
        if made:
            with contextlib.suppress(OSError):
                folder.rmdir()


def _environment(store: Path | None) -> dict[str, str]:
    """Offline by default; the caller's name and a writable HOME (the image's is root's)."""
    environment = {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "USER": getpass.getuser(),
                   "HOME": "/tmp", **{k: os.environ[k] for k in _PASSED_ENV if k in os.environ}}
    if store is not None:
        environment["DEFT_MINE_STORE"] = str(store)
    return environment


def _gpus(client: Any, gpu: str | None) -> list[Any]:
    """`cuda:N` asks for that GPU alone (inside, it is the only one: cuda:0); otherwise every GPU."""
    import docker

    if "nvidia" not in (client.info().get("Runtimes") or {}):
        return []
    if gpu and gpu.startswith("cuda:"):
        return [docker.types.DeviceRequest(device_ids=[gpu.split(":")[1]], capabilities=[["gpu"]])]
    return [docker.types.DeviceRequest(count=-1, capabilities=[["gpu"]])]


def _lines(chunks: Any) -> Iterator[str]:
    pending = b""
    for chunk in chunks:
        pending += chunk
        *complete, pending = pending.split(b"\n")
        for raw in complete:
            yield raw.decode("utf-8", "replace").rstrip("\r")
    if pending:
        yield pending.decode("utf-8", "replace")


def _forward(line: str, events: Events) -> None:
    if match := _PROGRESS.match(line.strip()):
        total = None if match["total"] == "?" else int(match["total"])
        events.progress(match["stage"], int(match["done"]), total)  # raises when cancelled
        return
    level = "warning" if line.startswith(("WARNING", "WARN")) else "error" if line.startswith("ERROR") else "info"
    events.log(level, line)
