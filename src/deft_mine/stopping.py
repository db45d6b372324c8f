"""SIGTERM as an exception: `docker stop`, systemd and kill unwind the work as Ctrl-C does."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the main thread is, so the work unwinds as on Ctrl-C: temp files
    removed, run.json marked "interrupted"; without a handler Python dies at once (and as a
    container's PID 1 ignores the signal, so `docker stop` waits out its grace period)."""

    number = signal.SIGTERM

    def __str__(self) -> str:
        return "terminated (SIGTERM)"


def _terminate(signum: int, frame: object) -> None:
    raise Terminated()


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """Within the block SIGTERM raises Terminated (signals belong to the main thread; elsewhere,
    e.g. main() called from a test's thread, nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def exit_code(exc: KeyboardInterrupt) -> int:
    """128 + the signal's number, as shells report a death by signal: 130 Ctrl-C, 143 SIGTERM."""
    return 128 + stop_signal(exc)


def stop_signal(exc: KeyboardInterrupt) -> signal.Signals:
    return exc.number if isinstance(exc, Terminated) else signal.SIGINT
