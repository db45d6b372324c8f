"""What the benchmarks print about the machine they ran on (their figures only compare as ratios)."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np


def machine_lines(*extra: str) -> list[str]:
    lines = [
        f"python {sys.version.split()[0]} on {sys.platform}; os.cpu_count={os.cpu_count()}, "
        f"usable cpus={len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else '?'}",
        *extra,
    ]
    try:
        from threadpoolctl import threadpool_info

        pools = [f"{p.get('internal_api')} {p.get('version')} ({p.get('num_threads')} threads)"
                 for p in threadpool_info()]
        lines.append("thread pools (threadpoolctl): " + "; ".join(pools))
    except ImportError:
        try:
            blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
            lines.append(f"numpy BLAS: {blas.get('name')} {blas.get('version')} "
                         "(threadpoolctl not installed: thread count not shown)")
        except Exception:  # noqa: BLE001 - purely informational
            lines.append("numpy BLAS: unknown (threadpoolctl not installed)")
    if hasattr(os, "getloadavg"):
        load = os.getloadavg()
        lines.append(f"load average before start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
                     "(other work on this machine skews the timings)")
    return lines


@contextlib.contextmanager
def scratch(prefix: str, keep: bool) -> Iterator[Path]:
    """A fresh work folder for one benchmark run: removed afterwards, or kept (and said) with --keep."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield work
    finally:
        if keep:
            print(f"# kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
