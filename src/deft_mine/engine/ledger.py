"""The history ledger: which image paths earlier DEFT iterations selected, with file hashes.

One JSON file in one of two formats (LedgerFormat): ours (keyed by absolute normalised filepath)
or the DEFT loop's `mining_history.json` (filter_mined_history.py's: paths normalised as written,
every artifact's SHA-256 verified on load). Either is rewritten atomically (temp + fsync +
rename) under an exclusive lock, so a crash leaves the old ledger or the new one and two writers
never both win.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from deft_mine.engine import tables
from deft_mine.errors import DeftError
from deft_mine.schemas.inputs import LedgerFormat

FORMAT = "deft-mine-ledger"
VERSION = 1
COUNTS = ("candidates", "previously_selected", "duplicates_in_candidates", "newly_selected")
# The DEFT loop's ledger: its version, its identity key, and each entry's artifacts (path, hash).
SKILL_VERSION = 1
SKILL_IDENTITY = "filepath"
SKILL_ARTIFACTS = (("candidate_parquet", "candidate_sha256"), ("output_parquet", "output_sha256"),
                   ("summary_file", "summary_sha256"))
# Per format: an entry's selected paths, and its (candidates, previously selected, newly selected).
_KEYS = {LedgerFormat.deft_mine: ("selected", "candidates", "previously_selected", "newly_selected"),
         LedgerFormat.tao_skill: ("selected_filepaths", "candidate_unique_count", "already_mined_count",
                                  "selected_count")}


def absolute_normal(filepath: str, base: Path) -> str:
    """Absolute (relative paths join `base`), `os.path.normpath`, no trailing slash, case kept."""
    # os.path.join drops `base` when filepath is absolute
    return os.path.normpath(os.path.join(str(base), filepath)).rstrip("/") or "/"


def skill_identity(filepath: str) -> str | None:
    """The DEFT loop's identity of a filepath: stripped, backslashes made slashes, POSIX-normalised,
    relative paths kept relative; None for a path that names nothing ('', '.')."""
    text = filepath.strip().replace("\\", "/")
    normal = posixpath.normpath(text) if text else ""
    return None if normal in ("", ".") else normal


def identity(filepath: str, fmt: LedgerFormat, base: Path) -> str | None:
    """A filepath's identity in a ledger of `fmt`: ours absolute and normalised (relative paths join
    `base`), the DEFT loop's normalised as written (None: it names no file)."""
    return absolute_normal(filepath, base) if fmt is LedgerFormat.deft_mine else skill_identity(filepath)


@dataclass
class Ledger:
    path: Path
    selected: dict[str, int] = field(default_factory=dict)  # normalised filepath -> iteration
    iterations: list[dict[str, Any]] = field(default_factory=list)
    format: LedgerFormat = LedgerFormat.deft_mine
    extra: dict[str, Any] = field(default_factory=dict)  # a skill ledger's other top-level keys, kept

    @property
    def last_iteration(self) -> int:
        return self.iterations[-1]["iteration"] if self.iterations else 0

    def entry(self, iteration: int) -> dict[str, Any]:
        """A recorded iteration (`load` checks they are numbered 1, 2, … in order)."""
        return self.iterations[iteration - 1]

    def counts(self, iteration: int) -> tuple[int, int, int]:
        """(candidates, previously selected, newly selected) of a recorded iteration, in the
        ledger's own meaning (a skill ledger counts unique candidates)."""
        _, *keys = _KEYS[self.format]
        entry = self.entry(iteration)
        return entry[keys[0]], entry[keys[1]], entry[keys[2]]

    def selected_before(self, iteration: int) -> set[str]:
        return {path for path, it in self.selected.items() if it < iteration}


def load(path: Path, verify: bool = True) -> Ledger:
    """The ledger at `path` (an empty one if the file does not exist yet), in whichever format the
    file is; a skill ledger's artifacts are hashed unless `verify` is False."""
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
    if isinstance(data, dict) and "format" not in data and "identity" in data:
        return _load_skill(path, data, verify)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise corrupt(f"neither a {FORMAT} file nor a DEFT loop mining_history.json")
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


def _load_skill(path: Path, data: dict[str, Any], verify: bool) -> Ledger:
    """A DEFT loop ledger, checked by the loop's own rules, each breach named by iteration and field."""

    def corrupt(why: str, iteration: int | None = None, key: str | None = None) -> DeftError:
        where = f"iteration {iteration}: " if iteration is not None else ""
        return DeftError("ledger_corrupt", f"mining history {path} is damaged: {where}{why}; it was left "
                         "as it is", fix="restore the ledger from a backup, or name the right ledger file",
                         path=str(path), iteration=iteration, field=key)

    if data.get("version") != SKILL_VERSION:
        raise corrupt(f"version {data.get('version')!r}, this deft-mine reads version {SKILL_VERSION}", key="version")
    if data.get("identity") != SKILL_IDENTITY:
        raise corrupt(f"identity {data.get('identity')!r}, not {SKILL_IDENTITY!r}", key="identity")
    entries = data.get("iterations")
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise corrupt("'iterations' must be a list of objects", key="iterations")
    numbers = [e.get("iteration") for e in entries]
    if numbers != list(range(1, len(entries) + 1)):
        raise corrupt(f"iterations are numbered {numbers}, not contiguous from 1 to {len(entries)}",
                      key="iteration")
    selected: dict[str, int] = {}
    for number, entry in enumerate(entries, start=1):
        for normal in _skill_paths(entry, number, corrupt):
            if normal in selected:
                raise corrupt(f"selected_filepaths {normal!r} was already selected by iteration {selected[normal]}"
                              if selected[normal] != number else f"selected_filepaths repeats {normal!r}",
                              number, "selected_filepaths")
            selected[normal] = number
        if entry.get("selected_count") != len(entry["selected_filepaths"]):
            raise corrupt(f"selected_count {entry.get('selected_count')!r} disagrees with the "
                          f"{len(entry['selected_filepaths'])} selected_filepaths", number, "selected_count")
        if verify:
            _verify_artifacts(path, entry, number, corrupt)
    if data.get("cumulative_unique_count") != len(selected):
        raise corrupt(f"cumulative_unique_count {data.get('cumulative_unique_count')!r} disagrees with the "
                      f"{len(selected)} selected_filepaths", key="cumulative_unique_count")
    extra = {k: v for k, v in data.items() if k not in ("version", "identity", "iterations", "cumulative_unique_count")}
    return Ledger(path, selected=selected, iterations=entries, format=LedgerFormat.tao_skill, extra=extra)


def _skill_paths(entry: dict[str, Any], number: int, corrupt: Any) -> Iterator[str]:
    """An entry's selected_filepaths, each by the skill's identity rule."""
    paths = entry.get("selected_filepaths")
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise corrupt("'selected_filepaths' must be a list of paths", number, "selected_filepaths")
    for position, value in enumerate(paths):
        normal = skill_identity(value)
        if normal is None:
            raise corrupt(f"selected_filepaths[{position}] {value!r} names no file", number, "selected_filepaths")
        yield normal


def _verify_artifacts(path: Path, entry: dict[str, Any], number: int, corrupt: Any) -> None:
    """Each artifact an entry names: an absolute path to a file whose SHA-256 is the one recorded."""
    for path_key, hash_key in SKILL_ARTIFACTS:
        artifact, recorded = entry.get(path_key), entry.get(hash_key)
        if not isinstance(artifact, str) or not Path(artifact).is_absolute():
            raise corrupt(f"{path_key} {artifact!r} is not an absolute path", number, path_key)
        if not isinstance(recorded, str) or not recorded:
            raise corrupt(f"{hash_key} is missing", number, hash_key)
        file = Path(artifact)
        current = tables.sha256_of(file) if file.is_file() else None
        if current != recorded:
            raise DeftError("ledger_hash_mismatch",
                            f"mining history {path}: iteration {number}'s {path_key} {artifact} "
                            + ("is gone" if current is None else "changed since it was recorded")
                            + "; the ledger was left as it is",
                            fix=f"restore {artifact} (the ledger's {hash_key} is its SHA-256), or restore "
                                "the ledger and its run folders together", field=path_key, iteration=number,
                            path=artifact, recorded_sha256=recorded, current_sha256=current)


def save(ledger: Ledger) -> None:
    if ledger.format is LedgerFormat.tao_skill:
        # the loop's key order, any other keys of the file kept where the loop ignores them
        data = {"version": SKILL_VERSION, "identity": SKILL_IDENTITY, **ledger.extra,
                "iterations": ledger.iterations, "cumulative_unique_count": len(ledger.selected)}
        text = json.dumps(data, indent=2, ensure_ascii=False)
    else:
        data = {"format": FORMAT, "version": VERSION, "selected": ledger.selected, "iterations": ledger.iterations}
        text = json.dumps(data, indent=2)
    tables.write_text_atomic(ledger.path, text + "\n")


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
