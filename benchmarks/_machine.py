"""What the benchmarks print about the machine they ran on (their figures only compare as ratios)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


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


def peak_rss_mib() -> float:
    """This process's peak RSS. On Linux, ru_maxrss of a freshly exec'd child starts at the
    parent's high-water mark (the kernel carries the old mm's peak across exec, and subprocess
    forks with vfork), so a worker started by a parent that once held the pool would report the
    parent's peak. VmHWM belongs to the new address space alone, so it is used where it exists."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return ru_maxrss_mib()


def ru_maxrss_mib() -> float:
    import resource

    # Linux reports ru_maxrss in KiB, macOS in bytes.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def write_vector_parquet(path: Path, rows: int, dim: int, seed: int, prefix: str, row_group_rows: int,
                         chunk_rows: int = 65536) -> None:
    """`rows` seeded random-normal float32 vectors as an embedding parquet (`filepath` +
    `embedding` list<float32>), generated and written a chunk at a time so a 1M x 768 pool
    never sits in memory whole. The same (seed, rows, dim) always gives the same file."""
    from deft_mine.engine import tables

    rng = np.random.default_rng(seed)
    schema = pa.schema([("filepath", pa.string()), ("embedding", pa.list_(pa.float32()))])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, chunk_rows):
            n = min(chunk_rows, rows - start)
            vectors = rng.standard_normal((n, dim), dtype=np.float32)
            writer.write_table(pa.table({
                "filepath": pa.array([f"{prefix}/{i:07d}.jpg" for i in range(start, start + n)], pa.string()),
                "embedding": tables.vector_array(vectors)}, schema=schema), row_group_size=row_group_rows)


def torch_line() -> str:
    """The machine line the encoder benchmarks add: torch's threads and device, numpy, pyarrow."""
    import torch

    return (f"torch {torch.__version__} threads={torch.get_num_threads()} "
            f"interop={torch.get_num_interop_threads()} cuda={torch.cuda.is_available()}; "
            f"numpy {np.__version__}; pyarrow {pa.__version__}")


# A tower the benchmark does not measure: as small as transformers allows, so loading and the
# encoder's probe pass cost next to nothing.
TINY_VISION = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                   num_attention_heads=4)
TINY_TEXT = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4, vocab_size=99)


def save_random_two_tower(folder: Path, model: str, vision: dict, text: dict, seed: int,
                          **config: object) -> None:
    """A SigLIP or CLIP (`model`) with the given tower configs and seeded random weights, and the
    image processor sized to its vision tower, saved offline with save_pretrained."""
    import torch
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, SiglipConfig, SiglipImageProcessor,
                              SiglipModel)
    from transformers.utils import logging as hf_logging

    # Random weights trip harmless notices (token ids, the load report); the figures speak for the run.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(seed)
    side = vision["image_size"]
    if model == "CLIP":
        CLIPModel(CLIPConfig(vision_config=vision, text_config=text, **config)).save_pretrained(folder)
        CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side}) \
            .save_pretrained(folder)
    else:
        SiglipModel(SiglipConfig(vision_config=vision, text_config=text, **config)).save_pretrained(folder)
        SiglipImageProcessor(size={"height": side, "width": side}).save_pretrained(folder)


def add_worker_flags(parser: argparse.ArgumentParser) -> None:
    """--keep, and the hidden flags a bench passes to itself to run one measurement as a worker."""
    parser.add_argument("--keep", action="store_true", help="keep the temp dir and print its path")
    parser.add_argument("--_worker", dest="w_mode", help=argparse.SUPPRESS)
    parser.add_argument("--_dir", dest="w_dir", help=argparse.SUPPRESS)


def in_fresh_interpreter(script: str, mode: str, root: Path, flags: list[str], result: str | None = None) -> dict:
    """One measurement in a fresh interpreter, so its peak RSS (VmHWM) is its own: `script --_worker
    MODE --_dir ROOT FLAGS…`, then the JSON it wrote (root / result, default result_<mode>.json)."""
    subprocess.run([sys.executable, os.path.abspath(script), "--_worker", mode, "--_dir", str(root), *flags],
                   check=True)
    return json.loads((root / (result or f"result_{mode}.json")).read_text())
