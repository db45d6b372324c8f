"""The backend registry: `local` (in-process, the default), `docker` (the TAO entrypoint), `ray` (a cluster)."""

from __future__ import annotations

from typing import Callable, get_args

from deft_mine.backends.base import Backend, BackendMine, Capabilities
from deft_mine.errors import DeftError
from deft_mine.schemas.inputs import BackendName


def _local(image: str | None, mounts: list[str] | None, ray_address: str | None) -> Backend:
    from deft_mine.backends.local import LocalBackend

    return LocalBackend.shared()


def _docker(image: str | None, mounts: list[str] | None, ray_address: str | None) -> Backend:
    from deft_mine.backends.docker import DockerBackend

    return DockerBackend(image, mounts)


def _ray(image: str | None, mounts: list[str] | None, ray_address: str | None) -> Backend:
    from deft_mine.backends.ray import RayBackend, import_ray

    import_ray()  # refused here, before any work, when Ray is not installed
    return RayBackend(ray_address)


#: name -> factory(image, mounts, ray_address); `image` and `mounts` matter only to the docker
#: backend, `ray_address` only to the ray backend.
REGISTRY: dict[str, Callable[[str | None, list[str] | None, str | None], Backend]] = {
    "local": _local, "docker": _docker, "ray": _ray}
BACKENDS = tuple(REGISTRY)
assert BACKENDS == get_args(BackendName), "schemas.inputs.BackendName must list every backend"


def get_backend(name: str, image: str | None = None, mounts: list[str] | None = None,
                ray_address: str | None = None) -> Backend:
    if name not in REGISTRY:
        raise DeftError("spec_invalid", f"unknown backend {name!r}; valid: {', '.join(BACKENDS)}",
                        fix=f"use backend={' or '.join(BACKENDS)}", field="backend")
    return REGISTRY[name](image, mounts, ray_address)


__all__ = ["Backend", "BackendMine", "Capabilities", "get_backend", "BACKENDS"]
