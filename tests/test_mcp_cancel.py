"""Cancelling a long MCP call stops the work and leaves no half-written output (real stdio server).

No timing is guessed: one image in the middle of the pool is a named pipe, so the server's
decode provably waits there while the test cancels, and gets its bytes only once the server
has read the cancellation. The pool's last image is a pipe the test never feeds: a worker
that went on after the cancellation would block there and never clean up.
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import anyio
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mcp import Client, StdioServerParameters

from conftest import write_image

SERVER = str(Path(sys.executable).parent / "deft-mine")
POOL = 240
GATE = POOL // 2  # image 120: the first of batch 30 of 60 (batch_size 4)
TAIL = POOL - 1

pytestmark = pytest.mark.e2e  # spawns `deft-mine serve` over stdio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def reader_waiting(fifo: Path) -> int | None:
    """A write end of `fifo` when a reader (the server's decode) has it open, else None.

    The reader's open blocks until a writer comes; a non-blocking open for writing fails with
    ENXIO until a reader is there, so success is proof the server reached this image."""
    try:
        return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            return None
        raise


def temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.anyio
async def test_cancelled_embed_stops_and_writes_nothing(tmp_path: Path) -> None:
    pool = tmp_path / "pool"
    for i in range(POOL):
        if i not in (GATE, TAIL):
            write_image(pool / f"i{i}.png", seed=i)
    gate_png = write_image(tmp_path / "gate_source" / "gate.png", seed=GATE).read_bytes()
    gate, tail = pool / f"i{GATE}.png", pool / f"i{TAIL}.png"
    os.mkfifo(gate)
    os.mkfifo(tail)
    pq.write_table(pa.table({"filepath": [f"i{i}.png" for i in range(POOL)]}), pool / "pool.parquet")
    output = pool / "emb.parquet"
    seen: list[tuple[float, float | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total))

    params = StdioServerParameters(command=SERVER, args=["serve", "--root", str(pool)], cwd=str(pool))
    async with Client(params) as client:
        held: int | None = None  # our write end of the gate, once the server waits on it
        try:
            async with anyio.create_task_group() as group:
                async def embed() -> None:
                    await client.call_tool("embed", {"input_parquet": "pool.parquet",
                                                     "output_parquet": "emb.parquet",
                                                     "overrides": {"model": "thumbnail", "batch_size": 4}},
                                           progress_callback=on_progress)
                    pytest.fail("the call finished although it was cancelled")

                group.start_soon(embed)
                with anyio.fail_after(60):
                    while held is None or not seen:  # stuck on the gate, and progress came through
                        if held is None:
                            held = reader_waiting(gate)
                        await anyio.sleep(0.01)
                group.cancel_scope.cancel()

            # A round trip after the cancellation: stdio is ordered, so the server has read the
            # cancellation (and flagged the call's worker) before it answers this. The worker
            # still waits on the gate: its temp output is there, the output is not, and a
            # cancelled embed has not locked the session's encoder.
            result = await client.call_tool("preflight", {})
            assert not result.is_error and result.structured_content["session_encoder"] is None
            assert [name.startswith(".emb.parquet.") for name in temp_files(pool)] == [True]
            assert not output.exists()

            os.set_blocking(held, True)
            os.write(held, gate_png)  # the gate image decodes; the worker's next progress report
            os.close(held)            # meets the cancellation and unwinds, removing its temp file
            held = None
            with anyio.fail_after(60):
                while temp_files(pool):
                    await anyio.sleep(0.01)
            assert not output.exists()
            assert reader_waiting(tail) is None, "the worker went on to the end of the pool"
            assert seen, "no progress arrived before the cancellation"
            assert max(p for p, _ in seen) <= GATE < POOL  # nothing past the gate was reported
            assert {t for _, t in seen} == {POOL}

            # the session goes on, and still has no encoder
            result = await client.call_tool("preflight", {})
            assert not result.is_error and result.structured_content["session_encoder"] is None
        finally:
            # Let any decode still waiting on a pipe go (only when the test failed), so the
            # server can stop.
            if held is not None:
                os.close(held)
            for fifo in (gate, tail):
                stuck = reader_waiting(fifo)
                if stuck is not None:
                    os.close(stuck)  # end of file: the image is skipped as unreadable
