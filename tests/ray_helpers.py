"""Helpers for the Ray tests: real Ray nodes started with `ray start`, and stopped without
the 30-second drain a signal to their process group would cost."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import psutil

from mcp_helpers import free_port, wait_for_port

RAY_CLI = Path(sys.executable).with_name("ray")


def stop(procs: list[subprocess.Popen]) -> None:
    """Signal each `ray start --block` (not its group: Ray would drain for 30 s), then end by
    pid whatever they started and left behind."""
    started = []
    for proc in procs:
        try:
            started += psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            pass
    for proc in reversed(procs):  # the worker node first, the head last
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(8)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
    for child in started:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(started, timeout=10)


def start_head(port: int, temp: str, env: dict[str, str], cpus: int = 1,
               client_port: int | None = None) -> subprocess.Popen:
    """`ray start --head --block` (with a Ray Client server on `client_port` if given), once
    its ports answer."""
    extra = [f"--ray-client-server-port={client_port}"] if client_port else []
    proc = subprocess.Popen([str(RAY_CLI), "start", "--head", f"--port={port}", "--include-dashboard=false",
                             f"--temp-dir={temp}", f"--num-cpus={cpus}", "--block", "--disable-usage-stats", *extra],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for wanted in [port, *([client_port] if client_port else [])]:
            wait_for_port(wanted, proc, timeout=60)
    except (RuntimeError, TimeoutError) as exc:
        stop([proc])
        raise AssertionError(f"the Ray head did not start: {exc}") from exc
    return proc


def ray_env() -> dict[str, str]:
    """The environment for Ray nodes and drivers the tests start: no usage stats, token auth
    off (Ray turns it on when a token file happens to exist in ~/.ray), no $RAY_ADDRESS (the
    flags alone say where), and gRPC's fork handlers off (grpcio 1.85 aborts in them when the
    Ray Client proxy forks its per-client server)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return env | {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "GRPC_ENABLE_FORK_SUPPORT": "0"}


@contextlib.contextmanager
def own_head(cpus: int, client_port: int | None = None) -> Iterator[tuple[subprocess.Popen, str]]:
    """A one-node cluster of a test's own (the module's two-node cluster lives on beside it):
    its `ray start` process and its address; killed outright afterwards (no drain to wait for)."""
    port, temp = free_port(), tempfile.mkdtemp(prefix="dmhead", dir="/tmp")  # Ray's socket paths stay short
    head = start_head(port, temp, ray_env(), cpus=cpus, client_port=client_port)
    try:
        yield head, f"127.0.0.1:{port}"
    finally:
        left = psutil.Process(head.pid).children(recursive=True) if head.poll() is None else []
        for proc in [*left, head]:
            try:
                proc.kill()
            except (psutil.Error, ProcessLookupError):
                pass
        psutil.wait_procs(left, timeout=10)
        head.wait(10)
        shutil.rmtree(temp, ignore_errors=True)


def summary_text(folder: Path) -> str:
    """A run's mining_summary.txt with its own folder masked: the container block's `Results saved
    to` names the output, which differs between two runs that must otherwise agree to the byte."""
    return (folder / "mining_summary.txt").read_text(encoding="utf-8").replace(str(folder), "<run>")
