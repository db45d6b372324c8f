"""What a caller may touch and which encoder a session is bound to: allowed roots and the lock."""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Any, Iterable, Iterator

from deft_mine.errors import DeftError
from deft_mine.schemas.results import EncoderIdentity
from deft_mine.schemas.specs import EmbeddingSpec


class PathPolicy:
    """Paths are allowed only under these roots, judged after resolving symlinks and `..`."""

    def __init__(self, roots: Iterable[str | Path]) -> None:
        self.roots = [Path(r).expanduser().resolve() for r in roots]

    def check(self, path: str | Path | None, field: str) -> Path | None:
        if path is None:
            return None
        resolved = Path(path).expanduser().absolute().resolve()
        if not any(resolved == root or resolved.is_relative_to(root) for root in self.roots):
            raise DeftError(
                "path_outside_roots",
                f"{field}: {path} resolves to {resolved}, outside the allowed roots "
                f"({', '.join(map(str, self.roots))})",
                fix="use a path under an allowed root, or start the server with --root for it",
                field=field, path=str(path), resolved=str(resolved), roots=[str(r) for r in self.roots],
            )
        return resolved


def check_paths(policy: PathPolicy | None, **paths: Any) -> None:
    if policy is not None:
        for field, value in paths.items():
            policy.check(value, field)


def encoder_key(spec: EmbeddingSpec) -> dict[str, str | None]:
    """The part of the identity a spec fixes before any weights are read."""
    if spec.model == "thumbnail":
        return {"model": "thumbnail", "model_path": None, "model_config_path": None}
    local = Path(spec.model_path).expanduser()
    model_path = str(local.resolve()) if local.exists() else spec.model_path
    return {"model": spec.model, "model_path": model_path, "model_config_path": spec.model_config_path}


class EncoderLock:
    """One encoder per session: the first successful embed fixes it; a different one is refused.

    An embed holds the lock (`with lock.bind(spec): ...`) while it works, so two concurrent
    calls of one session cannot bind two different encoders.
    """

    def __init__(self) -> None:
        self.identity: EncoderIdentity | None = None
        self._claim: dict[str, str | None] | None = None  # an unfinished first embed's encoder
        self._mutex = threading.Lock()

    def _held(self) -> tuple[dict[str, str | None], dict[str, Any]] | None:
        if self.identity is not None:
            held = {k: getattr(self.identity, k) for k in ("model", "model_path", "model_config_path")}
            return held, self.identity.model_dump()
        if self._claim is not None:
            return self._claim, dict(self._claim)
        return None

    @contextlib.contextmanager
    def bind(self, spec: EmbeddingSpec) -> Iterator[None]:
        wanted = encoder_key(spec)
        with self._mutex:
            held = self._held()
            claimed = held is None
            if claimed:
                self._claim = wanted
        if held is not None and held[0] != wanted:
            key, shown = held
            raise DeftError(
                "encoder_mismatch",
                f"this session already embeds with {key['model']} ({key['model_path']}); "
                f"embedding with {wanted['model']} ({wanted['model_path']}) would make embeddings "
                "that cannot be mined against each other",
                fix="keep the session's encoder (batch_size may differ), or start a new session "
                    "for a different encoder",
                locked_encoder=shown, requested_encoder=wanted,
                differing=[k for k in key if key[k] != wanted[k]],
            )
        try:
            yield
        finally:
            if claimed:
                with self._mutex:
                    self._claim = None

    def record(self, identity: EncoderIdentity) -> None:
        with self._mutex:
            if self.identity is None:
                self.identity = identity
