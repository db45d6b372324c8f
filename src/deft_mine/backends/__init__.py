"""The backend registry: `local` (in-process, the default) and `docker` (the TAO entrypoint)."""

from __future__ import annotations

from typing import Callable, get_args

from deft_mine.backends.base import Backend, BackendMine, Capabilities
from deft_mine.errors import DeftError
from deft_mine.schemas.inputs import BackendName


def _local(image: str | None, mounts: list[str] | None) -> Backend:
    from deft_mine.backends.local import LocalBackend

    return LocalBackend.shared()


def _docker(image: str | None, mounts: list[str] | None) -> Backend:
    from deft_mine.backends.docker import DockerBackend

    return DockerBackend(image, mounts)


#: name -> factory(image, mounts); `image` and `mounts` matter only to the docker backend.
REGISTRY: dict[str, Callable[[str | None, list[str] | None], Backend]] = {"local": _local, "docker": _docker}
BACKENDS = tuple(REGISTRY)
assert BACKENDS == get_args(BackendName), "schemas.inputs.BackendName must list every backend"


def get_backend(name: str, image: str | None = None, mounts: list[str] | None = None) -> Backend:
    if name not in REGISTRY:
        raise DeftError("spec_invalid", f"unknown backend {name!r}; valid: {', '.join(BACKENDS)}",
                        fix="use backend=local or docker", field="backend")
    return REGISTRY[name](image, mounts)


__all__ = ["Backend", "BackendMine", "Capabilities", "get_backend", "BACKENDS"]
