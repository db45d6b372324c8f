"""The MCP server over streamable HTTP: one `deft-mine serve --transport streamable-http` process,
several clients connected to it at once through the SDK client (`mcp.Client(url)`)."""

from __future__ import annotations

import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import write_image
from mcp_helpers import (LEGACY, MODERN, SyncClient, deft_mine_command, free_port, ok, refused, server_env,
                         stop, wait_for_port)

pytestmark = pytest.mark.e2e  # every test uses the `url` fixture's spawned HTTP server


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory, tiny_siglip: Path) -> Path:
    """The server's root: six images with a targets/pool pair, and a tiny real SigLIP checkpoint."""
    folder = tmp_path_factory.mktemp("mcp_http")
    for i in range(6):
        write_image(folder / "imgs" / f"{i}.png", seed=i)
    pq.write_table(pa.table({"filepath": [f"imgs/{i}.png" for i in range(2)], "label": ["a", "b"]}),
                   folder / "targets.parquet")
    pq.write_table(pa.table({"filepath": [f"imgs/{i}.png" for i in range(2, 6)], "label": ["a", "b", "a", "b"]}),
                   folder / "pool.parquet")
    shutil.copytree(tiny_siglip, folder / "siglip")  # a model folder must be under a root too
    return folder


@pytest.fixture(scope="module")
def url(root: Path):
    """Start the HTTP server, wait (bounded) until it accepts connections, always stop it."""
    port = free_port()
    log = (root.parent / f"{root.name}_server.log").open("w")
    process = subprocess.Popen(
        [deft_mine_command(), "serve", "--transport", "streamable-http", "--host", "127.0.0.1",
         "--port", str(port), "--root", str(root)],
        cwd=root, env=server_env(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        try:
            wait_for_port(port, process, timeout=30)
        except Exception as exc:
            log.flush()
            raise RuntimeError(f"{exc}; server log:\n{Path(log.name).read_text()[-3000:]}") from exc
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        stop(process)
        log.close()
    assert process.returncode is not None


def test_two_clients_at_once_each_get_their_own_results_and_progress(url: str, root: Path) -> None:
    """A 2026-07-28 client and a 2025-11-25 (handshake) client, connected together and calling
    at the same time: each gets its own result and only its own call's progress."""
    progress: dict[str, list[tuple[float, float | None]]] = {"a": [], "b": []}

    def recorder(name: str):
        async def on_progress(value: float, total: float | None, message: str | None) -> None:
            progress[name].append((value, total))
        return on_progress

    with SyncClient(url) as a, SyncClient(url, mode="legacy") as b:
        assert (a.protocol_version, b.protocol_version) == (MODERN, LEGACY)
        with ThreadPoolExecutor(2) as pool:
            fa = pool.submit(a.call, "embed", {"input_parquet": "pool.parquet", "output_parquet": "a.parquet",
                                               "overrides": {"model": "thumbnail", "batch_size": 1}}, recorder("a"))
            fb = pool.submit(b.call, "embed", {"input_parquet": "targets.parquet", "output_parquet": "b.parquet",
                                               "overrides": {"model": "thumbnail", "batch_size": 1}}, recorder("b"))
            ra, rb = ok(fa.result(timeout=120)), ok(fb.result(timeout=120))
    assert (ra["rows"], ra["output_parquet"]) == (4, str(root / "a.parquet"))
    assert (rb["rows"], rb["output_parquet"]) == (2, str(root / "b.parquet"))
    assert pq.read_table(root / "a.parquet").num_rows == 4
    assert pq.read_table(root / "b.parquet").num_rows == 2
    assert progress["a"] and {t for _, t in progress["a"]} == {4}, progress
    assert progress["b"] and {t for _, t in progress["b"]} == {2}, progress
    assert progress["a"][-1][0] == 4 and progress["b"][-1][0] == 2


def test_http_refuses_a_path_outside_the_root(url: str, root: Path) -> None:
    with SyncClient(url) as client:
        error = refused(client.call("embed", {"input_parquet": "pool.parquet",
                                              "output_parquet": "../escaped.parquet",
                                              "overrides": {"model": "thumbnail"}}), "path_outside_roots")
    assert error["resolved"] == str(root.parent / "escaped.parquet")
    assert not (root.parent / "escaped.parquet").exists()


# Handshake-era clients: there a connection is a session (Mcp-Session-Id). The 2026-07-28
# protocol has no session at all: each HTTP request stands alone, so two such clients cannot
# be told apart and per-client locks cannot exist there.
def test_each_http_session_has_its_own_encoder_lock(url: str, root: Path) -> None:
    siglip = {"model": "SigLIP", "model_path": str(root / "siglip")}
    thumbnail = {"model": "thumbnail"}
    with SyncClient(url, mode="legacy") as a, SyncClient(url, mode="legacy") as b:
        assert ok(a.call("embed", {"input_parquet": "pool.parquet", "output_parquet": "lock_a1.parquet",
                                   "overrides": thumbnail}))["encoder"]["model"] == "thumbnail"
        # B is another session: A's lock does not bind it
        b_first = ok(b.call("embed", {"input_parquet": "pool.parquet", "output_parquet": "lock_b1.parquet",
                                      "overrides": siglip}))
        assert b_first["encoder"]["model"] == "SigLIP"
        assert b_first["encoder"]["model_path"] == str((root / "siglip").resolve())
        assert b_first["embedding_dim"] == 32

        a_refused = refused(a.call("embed", {"input_parquet": "pool.parquet", "output_parquet": "lock_a2.parquet",
                                             "overrides": siglip}), "encoder_mismatch")
        assert a_refused["locked_encoder"]["model"] == "thumbnail"
        assert a_refused["requested_encoder"]["model"] == "SigLIP"
        b_refused = refused(b.call("embed", {"input_parquet": "pool.parquet", "output_parquet": "lock_b2.parquet",
                                             "overrides": thumbnail}), "encoder_mismatch")
        assert b_refused["locked_encoder"] == b_first["encoder"]
        assert b_refused["requested_encoder"]["model"] == "thumbnail"
        assert not (root / "lock_a2.parquet").exists() and not (root / "lock_b2.parquet").exists()

        assert ok(a.call("preflight"))["session_encoder"]["model"] == "thumbnail"
        assert ok(b.call("preflight"))["session_encoder"]["model"] == "SigLIP"


def _post(url: str, headers: dict[str, str]) -> int:
    """The status of a raw initialize request (what any HTTP client, not just ours, would send)."""
    import json
    import urllib.error
    import urllib.request

    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}})
    request = urllib.request.Request(url, body.encode(), method="POST", headers={
        "Content-Type": "application/json", "Accept": "application/json, text/event-stream", **headers})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_any_address_but_loopback_needs_a_token(tmp_path: Path) -> None:
    done = subprocess.run([deft_mine_command(), "serve", "--transport", "streamable-http", "--host", "0.0.0.0",
                           "--port", str(free_port()), "--root", str(tmp_path)], env={**server_env(),
                          "DEFT_MINE_AUTH_TOKEN": ""}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "auth_token_required" in done.stderr and "--auth-token" in done.stderr


def test_a_token_server_refuses_requests_without_it_and_checks_host_and_origin(tmp_path: Path) -> None:
    port = free_port()
    process = subprocess.Popen(
        [deft_mine_command(), "serve", "--transport", "streamable-http", "--host", "0.0.0.0", "--port", str(port),
         "--root", str(tmp_path), "--auth-token", "s3cret", "--allowed-host", "deft.example"],
        cwd=tmp_path, env=server_env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, process, timeout=30)
        url = f"http://127.0.0.1:{port}/mcp"
        assert _post(url, {}) == 401
        assert _post(url, {"Authorization": "Bearer wrong"}) == 401
        assert _post(url, {"Authorization": "Bearer s3cret"}) == 200
        assert _post(url, {"Authorization": "Bearer s3cret", "Host": "deft.example"}) == 200
        assert _post(url, {"Authorization": "Bearer s3cret", "Host": "evil.example"}) in (400, 421)
        assert _post(url, {"Authorization": "Bearer s3cret", "Origin": "http://evil.example"}) in (400, 403)
    finally:
        stop(process)
