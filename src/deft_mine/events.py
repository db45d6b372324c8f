"""The callback interface tools use to report progress and log lines to whichever face drives them."""

from __future__ import annotations

from typing import Protocol


class Cancelled(Exception):
    """Raised from `Events.progress` when whoever drives the work has cancelled it; the work
    unwinds through its atomic writes, so nothing half-written is left."""


class Events(Protocol):
    def progress(self, stage: str, done: int, total: int | None, note: str = "") -> None:
        """`done` of `total` units finished in `stage` (total None when unknown); `note` says
        more about them (e.g. how many the embedding store supplied). Work that waits long on
        others (a cluster) reports the same `done` again as it waits: each report is where a
        cancellation is met."""

    def log(self, level: str, message: str) -> None:
        """A log line: level is 'debug' | 'info' | 'warning' | 'error'."""


class NullEvents(Events):
    """Drops everything (the interface's methods do nothing): the default when nobody listens
    (pytest, library use)."""


class RecordingEvents:
    """Keeps every event in memory; handy for tests and for the run manifest."""

    def __init__(self) -> None:
        self.progress_events: list[tuple[str, int, int | None]] = []
        self.logs: list[tuple[str, str]] = []

    def progress(self, stage: str, done: int, total: int | None, note: str = "") -> None:
        self.progress_events.append((stage, done, total))

    def log(self, level: str, message: str) -> None:
        self.logs.append((level, message))


class StageEvents:
    """Passes events on under another stage name (e.g. 'embed' → 'embed source')."""

    def __init__(self, inner: Events, stage: str) -> None:
        self.inner = inner
        self.stage = stage

    def progress(self, stage: str, done: int, total: int | None, note: str = "") -> None:
        self.inner.progress(self.stage, done, total, note)

    def log(self, level: str, message: str) -> None:
        self.inner.log(level, f"[{self.stage}] {message}")
