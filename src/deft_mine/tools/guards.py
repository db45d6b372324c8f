"""What a caller may touch and which encoder a session is bound to: allowed roots and the lock."""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from typing import Iterable, Iterator

from pydantic import BaseModel

from deft_mine.engine.listings import Listing
from deft_mine.errors import DeftError
from deft_mine.schemas.inputs import PathField
from deft_mine.schemas.results import EncoderIdentity
from deft_mine.schemas.specs import EmbeddingSpec


def _real(path: str | Path) -> Path:
    """Symlinks and `..` resolved; os.path.realpath, unlike Path.resolve in 3.11, leaves a
    symlink loop as it is instead of raising (reading it fails later, as a counted skip)."""
    return Path(os.path.realpath(os.path.expanduser(path)))


class PathPolicy:
    """Paths are allowed only under these roots, judged after resolving symlinks and `..`."""

    def __init__(self, roots: Iterable[str | Path]) -> None:
        self.roots = [_real(r) for r in roots]

    def allows(self, path: str | Path) -> bool:
        resolved = _real(path)
        return any(resolved == root or resolved.is_relative_to(root) for root in self.roots)

    def check(self, path: str | Path, field: str) -> Path:
        resolved = _real(path)
        if not self.allows(resolved):  # already real: resolving it again changes nothing
            raise DeftError(
                "path_outside_roots",
                f"{field}: {path} resolves to {resolved}, outside the allowed roots "
                f"({', '.join(map(str, self.roots))})",
                fix="use a path under an allowed root, or start the server with --root for it",
                field=field, path=str(path), resolved=str(resolved), roots=[str(r) for r in self.roots],
            )
        return resolved

    def check_listing(self, listing: Listing, shown: int = 5) -> None:
        """The images a listing names (resolved, symlinks too) must lie under the roots, or nothing is read."""
        outside = listing.outside(self.allows, shown)
        if outside:
            row, first, _ = outside[0]
            raise DeftError(
                "path_outside_roots",
                f"{listing.path}: row {row} names the image {first}, outside the allowed roots "
                f"({', '.join(map(str, self.roots))})" + (f"; so do rows {', '.join(str(r) for r, _, _ in outside[1:])}"
                                                          if len(outside) > 1 else ""),
                fix="list only images under an allowed root, or start the server with --root for their folder",
                field="filepath", rows=[r for r, _, _ in outside], paths=[p for _, p, _ in outside],
                roots=[str(r) for r in self.roots])

    def check_model(self, model: BaseModel) -> None:
        """Every path field of a tool input or a spec (marked `PathField`), lists included."""
        for name, path in path_fields(model):
            self.check(path, name)


def path_fields(model: BaseModel) -> Iterator[tuple[str, str]]:
    """(field, path) for each path a tool input or a spec names (`PathField`), lists included."""
    for name, info in type(model).model_fields.items():
        if any(isinstance(m, PathField) for m in info.metadata):
            value = getattr(model, name)
            for path in value if isinstance(value, list) else [value]:
                if path is not None:
                    yield name, str(path)


#: Linux's limits (NAME_MAX, PATH_MAX): past them every system call fails with ENAMETOOLONG.
NAME_MAX, PATH_MAX = 255, 4095


def check_well_formed(model: BaseModel) -> None:
    """A path no file system could hold is refused by name, before any work (not an OSError
    from deep inside a tool): a NUL byte, a name over NAME_MAX bytes, a path over PATH_MAX."""
    for name, path in path_fields(model):
        encoded = os.fsencode(path)
        longest = max((len(part) for part in encoded.split(b"/")), default=0)
        if b"\0" in encoded or longest > NAME_MAX or len(encoded) > PATH_MAX:
            problem = ("holds a NUL byte" if b"\0" in encoded else
                       f"has a name of {longest} bytes (at most {NAME_MAX})" if longest > NAME_MAX else
                       f"is {len(encoded)} bytes long (at most {PATH_MAX})")
            raise DeftError("path_invalid", f"{name}: the path {path[:120]!r}{'…' if len(path) > 120 else ''} {problem}",
                            fix=f"give {name} as a real path", field=name)


_KEY_FIELDS = ("model", "model_path", "model_config_path", "pooling")


class EncoderLock:
    """One encoder per session: the first successful embed fixes it; a different one is refused.

    An embed holds the lock (`with lock.bind(spec): ...`) while it works, so two concurrent
    calls of one session cannot bind two different encoders.
    """

    def __init__(self) -> None:
        self.identity: EncoderIdentity | None = None
        self._claim: tuple[str | None, ...] | None = None  # an unfinished first embed's
        self._key: tuple[str | None, ...] | None = None  # the bound encoder's, as its spec asked
        self._mutex = threading.Lock()

    @contextlib.contextmanager
    def bind(self, spec: EmbeddingSpec) -> Iterator[tuple[str | None, ...]]:
        """Hold the session's encoder for the block; yields the key to `record` when it succeeds."""
        # The pooling is asked for by the spec and, for `hf`, only resolved when the weights
        # load, so the session keeps the key its spec asked for (a model's known default
        # filled in: DINOv2 without pooling is DINOv2 with pooling=cls).
        wanted = (*spec.encoder_key(), spec.asked_pooling)
        with self._mutex:
            held = self._key if self.identity is not None else self._claim
            claimed = held is None
            if claimed:
                self._claim = wanted
        if held is not None and held != wanted:
            shown = self.identity.model_dump() if self.identity is not None else dict(zip(_KEY_FIELDS, held))
            raise DeftError(
                "encoder_mismatch",
                f"this session already embeds with {held[0]} ({held[1]}); embedding with {wanted[0]} "
                f"({wanted[1]}) would make embeddings that cannot be mined against each other",
                fix="keep the session's encoder (batch_size may differ), or start a new session "
                    "for a different encoder",
                locked_encoder=shown, requested_encoder=dict(zip(_KEY_FIELDS, wanted)),
                differing=[k for k, a, b in zip(_KEY_FIELDS, held, wanted) if a != b],
            )
        try:
            yield wanted
        finally:
            if claimed:
                with self._mutex:
                    self._claim = None

    def record(self, identity: EncoderIdentity, key: tuple[str | None, ...]) -> None:
        """The first successful embed binds the session: its identity, and the key it was asked
        by (its own, not the claim of a concurrent call that may have failed meanwhile)."""
        with self._mutex:
            if self.identity is None:
                self.identity, self._key = identity, key
