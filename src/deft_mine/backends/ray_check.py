"""Preflight for the ray backend, asked of every node: the driver's versions, the files the work reads and writes."""

from __future__ import annotations

import os
import platform
import tempfile
from pathlib import Path
from typing import Any

from deft_mine import __version__
from deft_mine.schemas.results import Check

PROBE_SECONDS = 60.0
SHARED_FS_FIX = ("every node must see the images, the inputs and the output folder at the same paths: put them "
                 "on a filesystem all nodes mount (NFS, a cluster volume; on KubeRay a shared PersistentVolume)")


def probe_node(samples: list[str], output_dir: str) -> dict[str, Any]:
    """On one node: its versions, the sample images it cannot read, and whether it can write
    where the outputs go (the nearest folder that exists: the rest is made by the run)."""
    import ray

    unreadable = []
    for path in samples:
        try:
            with open(path, "rb") as file:
                file.read(1)
        except OSError as exc:
            unreadable.append(f"{path} ({exc.strerror or exc})")
    folder = Path(output_dir)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    write_error = None
    try:
        handle, name = tempfile.mkstemp(prefix=".deft-mine-probe-", dir=folder)
        os.close(handle)
        os.unlink(name)
    except OSError as exc:
        write_error = f"{folder}: {exc.strerror or exc}"
    return {"ray": ray.__version__, "python": platform.python_version(), "deft_mine": __version__,
            "host": platform.node(), "unreadable": unreadable, "write_error": write_error}


def _versions(found: dict[str, Any]) -> str:
    return f"Ray {found['ray']}, Python {found['python']}, deft-mine {found['deft_mine']}"


def _verdict(name: str, failures: list[str], passed: str, fix: str) -> Check:
    """Failed, naming every failure, with its `fix`; else passed, saying `passed`."""
    return Check.of(name, "fail" if failures else "ok", "; ".join(failures) or passed, fix if failures else None)


def node_checks(ray: Any, samples: list[Path], output_dir: Path) -> list[Check]:
    """One probe task pinned to each alive node (no CPU asked, so a busy cluster answers too)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    task = ray.remote(probe_node)
    refs = {task.options(num_cpus=0, max_retries=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
        n["NodeID"], soft=False)).remote([str(p) for p in samples], str(output_dir)): n for n in nodes}
    ready, late = ray.wait(list(refs), num_returns=len(refs), timeout=PROBE_SECONDS)
    for ref in late:
        ray.cancel(ref, force=True)
    answers = {refs[ref]["NodeManagerAddress"] + " " + refs[ref]["NodeID"][:8]: ray.get(ref) for ref in ready}
    here = {"ray": ray.__version__, "python": platform.python_version(), "deft_mine": __version__}
    checks = []
    if late:
        names = ", ".join(f"{refs[r]['NodeManagerAddress']} {refs[r]['NodeID'][:8]}" for r in late)
        checks.append(Check.of("ray nodes", "fail", f"{len(late)} of {len(nodes)} node(s) did not answer a probe "
                               f"within {PROBE_SECONDS:.0f}s: {names}", "check those nodes (ray status)"))
    differ = [f"node {node}: {_versions(found)}" for node, found in answers.items()
              if any(found[key] != here[key] for key in here)]
    unreadable = [f"node {node} cannot read {len(bad)} of {len(samples)} sample image(s), e.g. {bad[0]}"
                  for node, found in answers.items() if (bad := found["unreadable"])]
    unwritable = [f"node {node} cannot write to {found['write_error']}" for node, found in answers.items()
                  if found["write_error"]]
    return [*checks,
            _verdict("ray versions", [f"this driver: {_versions(here)}", *differ] if differ else [],
                     f"{len(answers)} node(s) run {_versions(here)}, as this driver does",
                     f"install Python {here['python']}, ray=={here['ray']} and deft-mine {here['deft_mine']} on "
                     "every node (or run the driver with the cluster's versions)"),
            _verdict("node reads", unreadable, f"{len(answers)} node(s) read all {len(samples)} sample image(s)"
                     if samples else "no inputs given: no sample images read (give --targets/--source to check them)",
                     SHARED_FS_FIX),
            _verdict("node writes", unwritable, f"{len(answers)} node(s) can write under {output_dir}", SHARED_FS_FIX)]
