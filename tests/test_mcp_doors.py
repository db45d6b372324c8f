"""The MCP server's doors: what a real `deft-mine serve` answers, byte for byte on the wire, to
messages no well-behaved client sends (malformed JSON, objects that are no JSON-RPC, unknown
methods and tools, arguments of the wrong type, arguments too large) and to a flood of calls.
Over stdio and over streamable HTTP (2025-11-25, one Mcp-Session-Id), each against one server
process for the module; after every case the same process still answers `tools/call preflight`.

The specification's answers (JSON-RPC 2.0, MCP 2025-11-25): not JSON → -32700 with id null; JSON
but no JSON-RPC message → -32600 (with the request's id when it can be read, else null); unknown
method → -32601; unknown tool → -32602; arguments that fail the input schema → an isError result
(ours carries the error model in `_meta`). A message over MAX_MESSAGE_BYTES (4 MiB, the SDK's HTTP
body limit, which we apply to stdio lines too) → -32600 "Request too large", over HTTP with 413.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import write_image
from mcp_helpers import MODERN, TOOL_NAMES, RawHttp, RawStdio, wire

from deft_mine.server import ERROR_META_KEY
from deft_mine.wire import MAX_MESSAGE_BYTES

pytestmark = pytest.mark.e2e  # every test drives a spawned `deft-mine serve`

INVALID_REQUEST = {"code": -32600, "message": "Invalid Request: not a JSON-RPC 2.0 request, notification or response"}
TOO_LARGE = {"code": -32600, "message": f"Request too large: a message may be at most {MAX_MESSAGE_BYTES} bytes"}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("mcp_doors") / "root"
    for i in range(4):
        write_image(folder / "imgs" / f"{i}.png", seed=i)
    pq.write_table(pa.table({"filepath": [f"imgs/{i}.png" for i in range(4)]}), folder / "pool.parquet")
    return folder


@pytest.fixture(scope="module")
def stdio(root: Path) -> Iterator[RawStdio]:
    server = RawStdio(root)
    yield server
    server.close()


@pytest.fixture(scope="module")
def http(root: Path) -> Iterator[RawHttp]:
    server = RawHttp(root)
    yield server
    server.close()


class Door:
    """One transport of the module's servers: `exchange` sends bytes and returns (HTTP status or
    None over stdio, the JSON-RPC answer); `pid` is the serving process, the same after every case."""

    def __init__(self, name: str, server: RawStdio | RawHttp) -> None:
        self.name, self.server, self.pid = name, server, server.process.pid
        self._ids = 0

    def exchange(self, data: bytes) -> tuple[int | None, dict[str, Any]]:
        if isinstance(self.server, RawHttp):
            return self.server.exchange(data)
        return None, self.server.exchange(data)

    def request(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        self._ids += 1
        return {"jsonrpc": "2.0", "id": f"{self.name}-{self._ids}", "method": method,
                **({"params": params} if params is not None else {})}

    def still_serving(self) -> None:
        """The same process answers a normal `tools/call preflight` correctly."""
        assert self.server.process.poll() is None and self.server.process.pid == self.pid
        request = self.request("tools/call", {"name": "preflight", "arguments": {}})
        status, answer = self.exchange(wire(request))
        assert status in (None, 200) and answer["id"] == request["id"], answer
        assert_preflight(answer["result"])


def assert_preflight(result: dict[str, Any]) -> None:
    assert result["isError"] is False, result
    assert result["structuredContent"]["backend"] == "local"
    assert result["content"][0]["text"].startswith(("ready (local)", "not ready (local)"))


@pytest.fixture(params=["stdio", "http"])
def door(request: pytest.FixtureRequest) -> Iterator[Door]:
    opened = Door(request.param, request.getfixturevalue(request.param))
    yield opened
    opened.still_serving()  # after every case, whatever it asserted


# --------------------------------------------------------------------------- not JSON-RPC


@pytest.mark.parametrize("data", [b"{not json\n", b"\xff\xfe\n", b'{"jsonrpc": "2.0", "id": 1, "method": "ping"\n'],
                         ids=["garbage", "not-utf8", "truncated"])
def test_malformed_json_is_a_parse_error(door: Door, data: bytes) -> None:
    status, answer = door.exchange(data)
    assert answer["error"]["code"] == -32700 and answer["id"] is None
    if door.name == "stdio":
        assert answer == {"jsonrpc": "2.0", "id": None, "error": {"code": -32700, "message": "Parse error"}}
    else:  # the SDK's HTTP transport adds the parser's reason
        assert status == 400 and answer["error"]["message"].startswith("Parse error: ")
        assert answer.keys() == {"jsonrpc", "id", "error"}


@pytest.mark.parametrize("message, stdio_id", [
    ({"jsonrpc": "2.0", "id": 5}, 5),                                           # no method, no result
    ({"jsonrpc": "1.0", "id": 6, "method": "ping"}, 6),                         # wrong version
    ({"id": 7, "method": "ping"}, 7),                                           # no version
    ({"jsonrpc": "2.0", "id": 8, "method": "tools/call", "params": "x"}, 8),    # params not an object
    ([{"jsonrpc": "2.0", "id": 9, "method": "ping"}], None),                    # a batch: gone since 2025-06-18
    ("hello", None),
], ids=["no-method", "version-1.0", "no-version", "params-string", "batch", "string"])
def test_json_that_is_no_json_rpc_message_is_an_invalid_request(door: Door, message: Any, stdio_id: Any) -> None:
    status, answer = door.exchange(wire(message))
    # Over HTTP the SDK cannot name the id (it answers before reading one); over stdio we do when there is one.
    assert answer == {"jsonrpc": "2.0", "id": stdio_id if door.name == "stdio" else None, "error": INVALID_REQUEST}
    assert status in (None, 400)


def test_unknown_method_is_method_not_found(door: Door) -> None:
    request = door.request("tools/explode", {})
    status, answer = door.exchange(wire(request))
    assert status in (None, 200)
    assert answer == {"jsonrpc": "2.0", "id": request["id"],
                      "error": {"code": -32601, "message": "Method not found", "data": "tools/explode"}}


def test_unknown_tool_is_invalid_params(door: Door) -> None:
    request = door.request("tools/call", {"name": "explode", "arguments": {}})
    status, answer = door.exchange(wire(request))
    assert status in (None, 200)
    assert answer == {"jsonrpc": "2.0", "id": request["id"],
                      "error": {"code": -32602, "message": "Unknown tool: explode", "data": {"tool": "explode"}}}


def test_http_without_a_session_gets_the_sdk_s_own_spec_answers(http: RawHttp) -> None:
    """The 2026-07-28 (sessionless) side of the same endpoint: parse error and invalid request."""
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream",
               "MCP-Protocol-Version": MODERN}
    garbage = http.http.post(http.url, content=b"{not json", headers=headers)
    assert (garbage.status_code, garbage.json()) == (400, {"jsonrpc": "2.0", "id": None, "error": {
        "code": -32700, "message": "Parse error"}})
    batch = http.http.post(http.url, content=b"[]", headers=headers)
    assert batch.status_code == 400 and batch.json()["error"]["code"] == -32600 and batch.json()["id"] is None
    Door("http", http).still_serving()


# --------------------------------------------------------------------------- arguments


@pytest.mark.parametrize("tool, arguments, field, problem", [
    ("select", {"candidates": "c.parquet", "ledger": "l.json", "iteration": "three", "output": "o.parquet"},
     "iteration", "Input should be a valid integer, unable to parse string as an integer"),
    ("embed", {"input_parquet": 123, "output_parquet": "o.parquet"}, "input_parquet", "Input should be a valid string"),
    ("embed", {"input_parquet": "pool.parquet", "output_parquet": "o.parquet", "overrides": "model=thumbnail"},
     "overrides", "Input should be a valid dictionary"),
    ("report", {}, "run_dir", "Field required"),
    ("report", {"run_dir": ["a", "b"]}, "run_dir", "Input should be a valid string"),
], ids=["int-string", "path-int", "overrides-string", "missing", "path-list"])
def test_wrong_argument_types_are_invalid_arguments_naming_the_field(door: Door, tool: str, arguments: dict[str, Any],
                                                                     field: str, problem: str) -> None:
    request = door.request("tools/call", {"name": tool, "arguments": arguments})
    status, answer = door.exchange(wire(request))
    assert status in (None, 200) and answer["id"] == request["id"]
    error = {"code": "invalid_arguments", "message": f"{tool}: {field}: {problem}",
             "fix": f"give {field} as the tool's inputSchema describes it", "field": field}
    assert answer["result"] == {"_meta": {ERROR_META_KEY: error}, "isError": True, "content": [
        {"type": "text", "text": f"invalid_arguments: {error['message']}\nfix: {error['fix']}"}]}


@pytest.mark.parametrize("where", ["overrides", "path"])
def test_a_message_over_the_limit_is_refused_whole(door: Door, where: str) -> None:
    """20 MB in one argument: refused before parsing, as too large (HTTP: 413), the id unread."""
    huge = "x" * 20_000_000
    arguments = ({"input_parquet": "pool.parquet", "output_parquet": "o.parquet", "overrides": {"model": huge}}
                 if where == "overrides" else {"input_parquet": huge, "output_parquet": "o.parquet"})
    status, answer = door.exchange(wire(door.request("tools/call", {"name": "embed", "arguments": arguments})))
    assert answer == {"jsonrpc": "2.0", "id": None, "error": TOO_LARGE}
    assert status in (None, 413)


def test_a_large_argument_under_the_limit_gets_the_tool_s_answer(door: Door) -> None:
    """3 MB in a spec value: the message is taken and the tool refuses the value in our model."""
    request = door.request("tools/call", {"name": "embed", "arguments": {
        "input_parquet": "pool.parquet", "output_parquet": "o.parquet", "overrides": {"model": "x" * 3_000_000}}})
    status, answer = door.exchange(wire(request))
    assert status in (None, 200) and answer["id"] == request["id"]
    error = answer["result"]["_meta"][ERROR_META_KEY]
    assert answer["result"]["isError"] is True and error["code"] == "spec_invalid" and error["fix"]


@pytest.mark.parametrize("tool, field", [("report", "run_dir"), ("embed", "output_parquet")])
def test_a_path_longer_than_the_system_allows_is_refused_as_path_invalid(door: Door, tool: str,
                                                                            field: str) -> None:
    arguments = {"report": {"run_dir": "d" * 5000},
                 "embed": {"input_parquet": "pool.parquet", "output_parquet": "o" * 5000 + ".parquet",
                           "overrides": {"model": "thumbnail"}}}[tool]
    request = door.request("tools/call", {"name": tool, "arguments": arguments})
    status, answer = door.exchange(wire(request))
    assert status in (None, 200) and answer["id"] == request["id"]
    result = answer["result"]
    error = result["_meta"][ERROR_META_KEY]  # never the SDK's bare "Error executing tool"
    assert result["isError"] is True and error["code"] == "path_invalid" and error["field"] == field, result
    assert result["content"] == [{"type": "text", "text": f"{error['code']}: {error['message']}\nfix: {error['fix']}"}]
    assert "(at most 255)" in error["message"] and len(error["message"]) < 400  # not echoed whole


# --------------------------------------------------------------------------- floods


def _check_flood_answers(requests: list[dict[str, Any]], answers: dict[Any, dict[str, Any]]) -> None:
    assert sorted(answers, key=str) == sorted((r["id"] for r in requests), key=str)
    for request in requests:
        answer = answers[request["id"]]
        assert "error" not in answer, answer
        if request["method"] == "ping":
            assert answer["result"] == {}
        elif request["method"] == "tools/list":
            assert sorted(t["name"] for t in answer["result"]["tools"]) == TOOL_NAMES
        else:
            assert_preflight(answer["result"])


def _flood(door: Door) -> list[dict[str, Any]]:
    """500 pings and tools/lists, then 20 preflights."""
    return [*(door.request("ping" if i % 2 else "tools/list") for i in range(500)),
            *(door.request("tools/call", {"name": "preflight", "arguments": {}}) for _ in range(20))]


def test_stdio_a_flood_sent_without_waiting_is_answered_in_full(stdio: RawStdio) -> None:
    door = Door("stdio", stdio)
    requests = _flood(door)
    stdio.send(b"".join(wire(r) for r in requests))  # one write: the server reads while we do not
    _check_flood_answers(requests, stdio.answers([r["id"] for r in requests], timeout=120))
    door.still_serving()


def test_http_a_flood_of_concurrent_posts_is_answered_in_full(http: RawHttp) -> None:
    import httpx2

    door = Door("http", http)
    requests = _flood(door)

    async def post_all() -> list[tuple[int, dict[str, Any]]]:
        async with httpx2.AsyncClient(timeout=120, limits=httpx2.Limits(max_connections=200)) as client:
            async def post(request: dict[str, Any]) -> tuple[int, dict[str, Any]]:
                response = await client.post(http.url, content=wire(request), headers=http.headers)
                return response.status_code, RawHttp.answer(response)
            return await asyncio.gather(*(post(r) for r in requests))

    results = asyncio.run(post_all())
    assert {status for status, _ in results} == {200}
    _check_flood_answers(requests, {answer["id"]: answer for _, answer in results})
    door.still_serving()


def test_stdio_more_concurrent_calls_than_threads_do_not_hang_the_server(stdio: RawStdio, root: Path) -> None:
    """60 embeds at once, each reporting progress: tool calls used to share the SDK's 40-thread
    pool with the stdio reader and writer, and the server hung (not even `ping` came back)."""
    door = Door("stdio", stdio)
    requests = [door.request("tools/call", {"name": "embed", "_meta": {"progressToken": i}, "arguments": {
        "input_parquet": "pool.parquet", "output_parquet": f"many/{i}.parquet",
        "overrides": {"model": "thumbnail", "batch_size": 1}}}) for i in range(60)]
    (root / "many").mkdir(exist_ok=True)
    stdio.send(b"".join(wire(r) for r in requests))
    answers = stdio.answers([r["id"] for r in requests], timeout=120)
    for answer in answers.values():
        assert answer["result"]["isError"] is False and answer["result"]["structuredContent"]["rows"] == 4, answer
    door.still_serving()

