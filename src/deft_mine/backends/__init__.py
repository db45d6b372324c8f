"""The backend registry: `local` (in-process, the default), `docker` (the TAO entrypoint), `ray` (a cluster)."""

from __future__ import annotations

from typing import Callable, get_args

from deft_mine.backends.base import Backend, BackendMine, Capabilities
from deft_mine.schemas.inputs import BackendName, BackendOptions


def _local(options: BackendOptions) -> Backend:
    from deft_mine.backends.local import LocalBackend

    return LocalBackend.shared()


def _docker(options: BackendOptions) -> Backend:
    from deft_mine.backends.docker import DockerBackend

    return DockerBackend(options.image, options.mounts)


def _ray(options: BackendOptions) -> Backend:
    from deft_mine.backends.ray import RayBackend, import_ray

    import_ray()  # refused here, before any work, when Ray is not installed
    return RayBackend(options.ray_address)


#: name -> factory; `image` and `mounts` matter only to the docker backend, `ray_address` only to ray.
REGISTRY: dict[str, Callable[[BackendOptions], Backend]] = {"local": _local, "docker": _docker, "ray": _ray}
BACKENDS = tuple(REGISTRY)
assert BACKENDS == get_args(BackendName), "schemas.inputs.BackendName must list every backend"


def resolve(options: BackendOptions) -> Backend:
    """The backend these options name, made once per tool call and passed down (the input model
    already refused a name not in the registry)."""
    return REGISTRY[options.backend](options)


__all__ = ["Backend", "BackendMine", "BackendOptions", "Capabilities", "resolve", "BACKENDS"]
