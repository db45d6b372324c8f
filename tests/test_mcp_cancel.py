"""Cancelling a long MCP call stops the work and leaves no half-written output (real stdio server)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import anyio
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mcp import Client, StdioServerParameters

from conftest import write_image

SERVER = str(Path(sys.executable).parent / "deft-mine")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_cancelled_embed_stops_and_writes_nothing(tmp_path: Path) -> None:
    for i in range(240):
        write_image(tmp_path / f"i{i}.png", seed=i, size=(320, 240))
    pq.write_table(pa.table({"filepath": [f"i{i}.png" for i in range(240)]}), tmp_path / "pool.parquet")
    output = tmp_path / "emb.parquet"
    seen: list[float] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append(progress)

    params = StdioServerParameters(command=SERVER, args=["serve", "--root", str(tmp_path)], cwd=str(tmp_path))
    async with Client(params) as client:
        async with anyio.create_task_group() as group:
            async def embed() -> None:
                await client.call_tool("embed", {"input_parquet": "pool.parquet", "output_parquet": "emb.parquet",
                                                 "overrides": {"model": "thumbnail", "batch_size": 4}},
                                       progress_callback=on_progress)
                pytest.fail("the call finished although it was cancelled")

            group.start_soon(embed)
            with anyio.fail_after(60):
                while len(seen) < 2:  # cancel mid-pool, once work is visibly under way
                    await anyio.sleep(0.01)
            group.cancel_scope.cancel()
        assert 0 < seen[-1] < 240
        # The thumbnail encoder would finish 240 images well within this wait if it went on.
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            assert not output.exists()
            await anyio.sleep(0.1)
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
        # the session goes on, and a cancelled embed did not lock its encoder
        result = await client.call_tool("preflight", {})
        assert not result.is_error and result.structured_content["session_encoder"] is None
