"""A run's provenance (`mining_config/`, `session.jsonl`): resolved specs, versions, device, the calls behind it."""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.metadata
import json
import os
import platform
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deft_mine import __version__
from deft_mine.engine import tables
from deft_mine.errors import DeftError
from deft_mine.schemas import artifacts
from deft_mine.schemas.manifest import RunManifest

#: The packages whose versions decide a run's numbers (distribution names).
PACKAGES = ("torch", "transformers", "faiss-cpu", "faiss-gpu", "pyarrow", "numpy", "pillow", "ray", "mcp")


@dataclass(frozen=True)
class Invocation:
    """How a tool was called: from the command line (its words), over MCP or from Python (the
    tool and its arguments). Arguments are the tool's inputs: paths and spec keys, no secrets."""

    via: str  # "cli" | "mcp" | "python"
    tool: str
    arguments: dict[str, Any] = field(default_factory=dict)
    argv: list[str] | None = None  # the command line's words, "deft-mine" first

    def wire(self) -> dict[str, Any]:
        said = {"command": self.argv} if self.argv is not None else {"arguments": self.arguments}
        return {"via": self.via, "tool": self.tool, **said}


class SessionLog:
    """The tool calls of one MCP session, one line each as they finish, appended from then on to every run
    folder the session wrote a report into (a reviewer replays the agent's calls in order)."""

    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []
        self.folders: list[Path] = []
        self._lock = threading.Lock()

    def join(self, folder: Path) -> None:
        """Give `folder` the session's lines so far (after any an earlier session left there);
        every later line goes there too. One hold of the lock: no line falls in between."""
        path = folder / artifacts.SESSION_LOG
        with self._lock:
            if folder in self.folders:
                return
            if path.is_file():
                for line in self.lines:
                    _append_line(path, line)
            else:
                tables.write_text_atomic(path, "".join(json.dumps(line) + "\n" for line in self.lines))
            self.folders.append(folder)

    def record(self, line: dict[str, Any]) -> None:
        with self._lock:
            self.lines.append(line)
            for folder in list(self.folders):
                try:
                    _append_line(folder / artifacts.SESSION_LOG, line)
                except OSError:  # the folder was moved, removed or tampered with: stop following it
                    self.folders.remove(folder)


def call_line(invocation: Invocation, outcome: str, code: str | None = None, warnings: list[str] | None = None,
              run_dir: str | None = None) -> dict[str, Any]:
    """One session.jsonl line: when, which call, how it ended, what it warned, which run folder."""
    return {"time": _now(), **invocation.wire(), "outcome": outcome, "code": code,
            "warnings": warnings or [], "run_dir": run_dir}


def write_provenance(folder: Path, manifest: RunManifest | None, invocation: Invocation | None,
                     session: SessionLog | None, producing: bool) -> list[str]:
    """Write mining_config/ and session.jsonl into a run folder; return what was unavailable. `producing`:
    this call made the run (else a later `report`, adding what it can, never rewriting what the run recorded)."""
    config = folder / artifacts.MINING_CONFIG
    for name in (artifacts.MINING_CONFIG, artifacts.SESSION_LOG):
        if (folder / name).is_symlink():  # writing through it would land wherever it points
            raise DeftError("run_dir_invalid", f"{folder / name} is a symbolic link; deft-mine writes only "
                            "real files into a run folder", fix=f"remove the link {folder / name}",
                            field="run_dir", path=str(folder / name))
    unavailable: list[str] = []
    for name in (artifacts.EMBEDDING_SPEC, artifacts.MINING_SPEC):
        if (folder / name).is_file():
            tables.write_text_atomic(config / name, (folder / name).read_text(encoding="utf-8"))
        else:
            unavailable.append(f"{artifacts.MINING_CONFIG}/{name} (the run folder has no {name})")
    environment = {"recorded_by": "the run" if producing else "a later report (the run's own was not recorded)",
                   "deft_mine": __version__, "python": platform.python_version(),
                   "packages": package_versions(), "device": _device(), "host": platform.node(),
                   "backend": _backend(manifest)}
    made = config / artifacts.ENVIRONMENT
    if producing or not made.is_file():
        tables.write_text_atomic(made, json.dumps(environment, indent=2) + "\n")
        if not producing:
            unavailable.append(f"{artifacts.MINING_CONFIG}/{artifacts.ENVIRONMENT}: the versions and device "
                               "at run time (these are the report writer's)")
    called, wired = config / artifacts.INVOCATION, invocation.wire() if invocation else None
    if producing:
        tables.write_text_atomic(called, json.dumps({"produced_by": wired}, indent=2) + "\n")
    elif not called.is_file():
        tables.write_text_atomic(called, json.dumps({"produced_by": None, "report_by": wired}, indent=2) + "\n")
        unavailable.append(f"{artifacts.MINING_CONFIG}/{artifacts.INVOCATION}: the call that made the run")
    if session is not None:  # MCP: the calls so far; this call's own line follows when it ends
        session.join(folder)
    elif invocation is not None and invocation.via == "cli":  # the command line alone
        _append_line(folder / artifacts.SESSION_LOG, {"time": _now(), **invocation.wire()})
    return unavailable


def _append_line(path: Path, line: dict[str, Any]) -> None:
    # One write of one line in append mode: concurrent appenders never interleave within a line.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb", buffering=0) as out:  # unbuffered: the line is one os.write
        out.write((json.dumps(line) + "\n").encode())


def _backend(manifest: RunManifest | None) -> dict[str, Any] | None:
    """Where the steps ran, as run.json recorded it: the backend, each embedding's device (the
    docker image's digest among them) and the Ray cluster's facts; None without run.json."""
    if manifest is None:
        return None
    embedded = {side: facts.model_dump(mode="json", include={"device", "cluster"}, exclude_none=True)
                for side, facts in (("target", manifest.embeddings.target), ("source", manifest.embeddings.source))}
    cluster = manifest.mining.cluster
    return {"name": manifest.backend, **{f"embed_{side}": facts for side, facts in embedded.items() if facts},
            **({"mine": {"cluster": cluster.model_dump(mode="json")}} if cluster else {})}


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """The installed version of each named distribution; one not installed is left out."""
    found: dict[str, str] = {}
    for name in names:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[name] = importlib.metadata.version(name)
    return found


def _device() -> dict[str, Any]:
    """The CPU model, and the GPUs torch sees when torch is already loaded (importing it only
    to ask would cost a second or two on every report)."""
    torch = sys.modules.get("torch")  # not loaded: the GPUs are None (not asked)
    gpus = None if torch is None else [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    return {"cpu": _cpu_model(), "cpus": os.cpu_count(), "gpus": gpus}


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _now() -> str:
    return dt.datetime.now().astimezone().isoformat(timespec="seconds")
