"""Cancelling a long MCP call stops the work and leaves no half-written output (real stdio server).

The pool opens with slow images: regular PNG files of one grey level, small on disk but
6000x6000 pixels, each taking ~0.2 s to inflate and convert to RGB. Its first five batches
are such images, which keep the server's decode busy for ~1.5 s after it reports progress 0
(measured on an idle 2-core machine; longer on a loaded one). The test cancels as soon as that
first progress notification arrives, so the cancellation reaches the server (in milliseconds)
while it still decodes them; the worker meets it at its next progress report and unwinds.
No sleep is the proof: the waits are bounded, and what is asserted is the outcome (the temp
output there when the call started and gone after, no output, no encoder locked, nothing
past the slow images reported).
"""

from __future__ import annotations

from pathlib import Path

import anyio
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mcp import Client

from conftest import write_image
from mcp_helpers import stdio_params, write_slow_image

POOL = 60
BATCH = 4
SLOW = 5 * BATCH  # the first five batches are slow images

pytestmark = pytest.mark.e2e  # spawns `deft-mine serve` over stdio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.anyio
async def test_cancelled_embed_stops_and_writes_nothing(tmp_path: Path) -> None:
    pool = tmp_path / "pool"
    for i in range(POOL):
        if i < SLOW:
            write_slow_image(pool / f"i{i}.png")
        else:
            write_image(pool / f"i{i}.png", seed=i)
    pq.write_table(pa.table({"filepath": [f"i{i}.png" for i in range(POOL)]}), pool / "pool.parquet")
    output = pool / "emb.parquet"
    seen: list[tuple[float, float | None]] = []
    temp_at_first_progress: list[str] = []
    started = anyio.Event()

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        if not seen:
            # the server opens its temp output before it reports progress 0
            temp_at_first_progress.extend(temp_files(pool))
        seen.append((progress, total))
        started.set()

    async with Client(stdio_params(pool)) as client:
        async with anyio.create_task_group() as group:
            async def embed() -> None:
                await client.call_tool("embed", {"input_parquet": "pool.parquet",
                                                 "output_parquet": "emb.parquet",
                                                 "overrides": {"model": "thumbnail", "batch_size": BATCH}},
                                       progress_callback=on_progress)
                pytest.fail("the call finished although it was cancelled")

            group.start_soon(embed)
            with anyio.fail_after(60):
                await started.wait()  # the call runs: the slow images are ahead of its decode
            group.cancel_scope.cancel()

        # A round trip after the cancellation: stdio is ordered, so the server has read the
        # cancellation (and flagged the call's worker) before it answers this; a cancelled
        # embed has not locked the session's encoder.
        result = await client.call_tool("preflight", {})
        assert not result.is_error and result.structured_content["session_encoder"] is None

        # The worker meets the cancellation at its next progress report and unwinds through
        # its atomic write, removing the temp output (bounded wait, not a guess).
        with anyio.fail_after(60):
            while temp_files(pool):
                await anyio.sleep(0.01)
        assert [name.startswith(".emb.parquet.") for name in temp_at_first_progress] == [True]
        assert not output.exists(), "the worker went on to the end of the pool"  # it would have renamed
        assert seen, "no progress arrived before the cancellation"
        # cancelled mid-pool: nothing past the slow images was reported, let alone the whole pool
        assert max(p for p, _ in seen) < SLOW < POOL, seen
        assert {t for _, t in seen} == {POOL}

        # the session goes on, and still has no encoder
        result = await client.call_tool("preflight", {})
        assert not result.is_error and result.structured_content["session_encoder"] is None
