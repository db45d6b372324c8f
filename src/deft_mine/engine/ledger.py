"""The history ledger: which image paths earlier DEFT iterations selected, with file hashes.

One JSON file, keyed by normalised filepath, rewritten atomically (temp + fsync + rename) under
an exclusive lock, so a crash leaves the old ledger or the new one and two writers never both win.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from deft_mine.engine import tables
from deft_mine.errors import DeftError

FORMAT = "deft-mine-ledger"
VERSION = 1
COUNTS = ("candidates", "previously_selected", "duplicates_in_candidates", "newly_selected")


def absolute_normal(filepath: str, base: Path) -> str:
    """Absolute (relative paths join `base`), `os.path.normpath`, no trailing slash, case kept."""
    # os.path.join drops `base` when filepath is absolute
    return os.path.normpath(os.path.join(str(base), filepath)).rstrip("/") or "/"


@dataclass
class Ledger:
    path: Path
    selected: dict[str, int] = field(default_factory=dict)  # normalised filepath -> iteration
    iterations: list[dict[str, Any]] = field(default_factory=list)

    @property
    def last_iteration(self) -> int:
        return self.iterations[-1]["iteration"] if self.iterations else 0

    def entry(self, iteration: int) -> dict[str, Any]:
        """A recorded iteration (`load` checks they are numbered 1, 2, … in order)."""
        return self.iterations[iteration - 1]


def load(path: Path) -> Ledger:
    """The ledger at `path` (an empty one if the file does not exist yet)."""
    if not path.exists():
        return Ledger(path)

    def corrupt(why: str) -> DeftError:
        return DeftError("ledger_corrupt", f"ledger {path} is unreadable: {why}; it was left as it is",
                         fix="restore the ledger from a backup, or name the right ledger file",
                         path=str(path))

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise corrupt(str(exc)) from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise corrupt(f"not a {FORMAT} file")
    if data.get("version") != VERSION:
        raise corrupt(f"version {data.get('version')!r}, this deft-mine reads version {VERSION}")
    selected, iterations = data.get("selected"), data.get("iterations")
    if not isinstance(selected, dict) or not isinstance(iterations, list):
        raise corrupt("'selected' must be an object and 'iterations' a list")
    numbers = [it.get("iteration") if isinstance(it, dict) else None for it in iterations]
    if numbers != list(range(1, len(numbers) + 1)):
        raise corrupt(f"iterations are {numbers}, not 1..{len(numbers)}")
    recorded: dict[str, int] = {}
    for it in iterations:
        paths = it.get("selected")
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise corrupt(f"iteration {it['iteration']}: 'selected' must be a list of paths")
        if not isinstance(it.get("files"), dict) or not all(
                isinstance(it.get(key), int) for key in COUNTS):
            raise corrupt(f"iteration {it['iteration']}: 'files' or its counts are missing")
        for selected_path in paths:
            if selected_path in recorded:
                raise corrupt(f"{selected_path} is selected by iterations {recorded[selected_path]} "
                              f"and {it['iteration']}")
            recorded[selected_path] = it["iteration"]
    if recorded != selected:
        raise corrupt("'selected' does not match the paths (and iterations) the iterations recorded")
    return Ledger(path, selected=dict(selected), iterations=list(iterations))


def save(ledger: Ledger) -> None:
    data = {"format": FORMAT, "version": VERSION, "selected": ledger.selected, "iterations": ledger.iterations}
    tables.write_text_atomic(ledger.path, json.dumps(data, indent=2) + "\n")


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold the ledger's lock file exclusively; refuse at once if another writer holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = path.with_name(path.name + ".lock")
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise DeftError("ledger_busy", f"ledger {path} is being written by another process",
                            fix="wait for the other selection to finish, then retry",
                            path=str(path)) from exc
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
