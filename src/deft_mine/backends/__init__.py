"""Backends do the embedding and mining work: `local` (in-process) today, `docker` later."""

from __future__ import annotations

from deft_mine.backends.base import Backend, BackendEmbed, BackendMine
from deft_mine.errors import DeftError

BACKENDS = ("local", "docker")


def get_backend(name: str, image: str | None = None, mounts: list[str] | None = None) -> Backend:
    """`image` and `mounts` (extra read-only bind mounts) matter only to the docker backend."""
    if name == "local":
        from deft_mine.backends.local import LocalBackend

        return LocalBackend.shared()
    if name == "docker":
        from deft_mine.backends.docker import DockerBackend

        return DockerBackend(image, mounts)
    raise DeftError("spec_invalid", f"unknown backend {name!r}; valid: {', '.join(BACKENDS)}",
                    fix="use --backend local or docker", field="backend")


__all__ = ["Backend", "BackendEmbed", "BackendMine", "get_backend", "BACKENDS"]
