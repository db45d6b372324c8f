"""The MCP server over stdio, as a client sees it: `deft-mine serve` is spawned as a subprocess
and driven by the official SDK client (mcp 2.3). Every assertion is on what came over the wire.

Most tests share one server (module scope; its encoder stays thumbnail throughout). Tests whose
subject is per-session state or first-call behaviour start their own server.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mcp_types import CallToolResult

from conftest import THUMB_ID, write_embeddings, write_image
from test_leaks import guarded_set  # noqa: F401 - the fixture: targets, a protect listing, a pool of copies
from mcp_helpers import (LEGACY, MODERN, REFERENCES, TOOL_NAMES, SyncClient, compare_snapshot, ok, write_slow_image,
                         refused, stdio_params, tool_snapshot, warning)

# every test talks to a spawned `deft-mine serve` (the module's shared one or its own)
pytestmark = pytest.mark.e2e

# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """base/root is the server's only root (and its working directory); base/outside is not."""
    folder = tmp_path_factory.mktemp("mcp_stdio")
    (folder / "root").mkdir()
    (folder / "outside").mkdir()
    pq.write_table(pa.table({"filepath": ["x.png"]}), folder / "outside" / "targets.parquet")
    return folder


@pytest.fixture(scope="module")
def root(base: Path) -> Path:
    return base / "root"


@pytest.fixture(scope="module")
def outside(base: Path) -> Path:
    return base / "outside"


@pytest.fixture(scope="module")
def server(root: Path):
    """One stdio server for the module, with the SDK's default client (negotiates 2026-07-28)."""
    with SyncClient(stdio_params(root)) as client:
        yield client


@pytest.fixture
def data(image_set: Path, root: Path, request: pytest.FixtureRequest) -> Path:
    """conftest's image_set, copied under the server's root into a folder named after the test."""
    folder = root / request.node.name.replace("[", "_").replace("]", "")
    shutil.copytree(image_set, folder)
    return folder


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# --------------------------------------------------------------------------- tools/list


def test_tools_list_matches_snapshot(server: SyncClient) -> None:
    """A schema change must be a deliberate diff of tests/snapshots/tools.json
    (regenerate with DEFT_UPDATE_SNAPSHOTS=1)."""
    assert server.protocol_version == MODERN
    tools = server.run(server.client.list_tools).tools
    assert sorted(t.name for t in tools) == TOOL_NAMES
    snapshot = tool_snapshot(tools)
    by_name = {t["name"]: t for t in snapshot}
    # the contract in words, so a blind snapshot rewrite cannot hide these
    assert by_name["preflight"]["annotations"]["readOnlyHint"] is True
    assert by_name["run"]["annotations"]["idempotentHint"] is False
    assert all(t["annotations"]["destructiveHint"] is False for t in snapshot)
    # targets or text (sentences), exactly one, checked by the tool: only the pool is required
    assert by_name["run"]["inputSchema"]["required"] == ["source"]
    assert by_name["run"]["inputSchema"]["properties"]["text"]["anyOf"][0]["type"] == "array"
    assert {"run_dir", "mined", "mine", "warnings"} <= set(by_name["run"]["outputSchema"]["properties"])
    assert {"code"} <= set(by_name["embed"]["outputSchema"]["$defs"]["ToolWarning"]["properties"])
    codes = by_name["embed"]["outputSchema"]["$defs"]["ToolWarning"]["properties"]["code"]["enum"]
    assert {"filter_by_label_noop", "provenance_unknown", "pool_exhausted", "images_skipped"} <= set(codes)
    compare_snapshot(snapshot)


# --------------------------------------------------------------------------- run


def test_run_writes_a_run_folder(server: SyncClient, data: Path, root: Path) -> None:
    rel = data.relative_to(root)  # relative paths resolve against the server's working directory
    result = server.call("run", {"targets": f"{rel}/targets.parquet", "source": f"{rel}/pool.parquet",
                                 "output_dir": f"{rel}/out", "overrides": {"model": "thumbnail", "topn": 2}})
    sc = ok(result)
    run_dir = Path(sc["run_dir"])
    assert run_dir.parent == data / "out" / "mining_results"
    assert sc["mined"] == 4
    assert sc["mined_parquet"] == str(run_dir / "mined.parquet")
    assert sc["mine"]["summary"]["queries"] == 2
    assert sc["mine"]["summary"]["mined"] == 4
    assert sc["mine"]["topn"] == 2
    assert sc["target_embed"]["encoder"]["model"] == "thumbnail"
    assert sc["target_embed"]["rows"] == 2 and sc["source_embed"]["rows"] == 4
    assert sc["warnings"] == []
    assert result.content[0].text.startswith(f"run folder {run_dir}: mined 4 unique images")
    assert {"embedding_spec.yaml", "mining_spec.yaml", "target_embeddings.parquet",
            "source_embeddings.parquet", "mined.parquet", "mining_summary.txt",
            "run.json"} <= {p.name for p in run_dir.iterdir()}
    mined = pq.read_table(run_dir / "mined.parquet")
    assert mined.num_rows == 4
    assert set(mined.column("filepath").to_pylist()) <= {f"imgs/{i}.png" for i in range(2, 6)}
    manifest = json.loads((run_dir / "run.json").read_text())
    assert manifest["status"] == "finished"
    assert manifest["mining"]["summary"] == sc["mine"]["summary"]
    assert sc["report"]["report_path"] == str(run_dir / "Mining_Report.md")
    assert (run_dir / "Mining_Report.md").is_file()


def test_run_with_protect_leaves_the_leaks_out(server: SyncClient, root: Path, guarded_set: Path,
                                              request: pytest.FixtureRequest) -> None:
    """The leakage guard over the wire: a protect listing and leak_similarity as MCP arguments; the
    pool's copies of the targets and of the validation images are left out, listed and warned."""
    folder = root / request.node.name
    shutil.copytree(guarded_set, folder)
    sc = ok(server.call("run", {"targets": str(folder / "targets.parquet"), "source": str(folder / "pool.parquet"),
                                "run_dir": str(folder / "run"), "protect": [str(folder / "val.parquet")],
                                "overrides": {"model": "thumbnail", "topn": 2, "leak_similarity": 0.9}}))
    # leak_scope=mined (the default): the leaks among the rows the search would take are judged and listed
    assert sc["leaks"]["scope"] == "mined" and sc["leaks"]["by_kind"]["identical_bytes"] >= 1
    assert warning(sc, "leaks_excluded")["details"]["by_kind"] == sc["leaks"]["by_kind"]
    every = {"pool/copy_t0.png", "pool/copy_v0.png", "pool/reenc_v0.png", "pool/noisy_v1.png"}
    leaks = pq.read_table(folder / "run" / "leaks.parquet").column("filepath").to_pylist()
    assert "pool/copy_t0.png" in leaks and set(leaks) <= every
    mined = pq.read_table(sc["mined_parquet"]).column("filepath").to_pylist()
    assert mined and not set(mined) & every
    assert {"leak_pairs.png", "leak_nearest.png"} <= set(sc["report"]["pictures"])


def test_report_rewrites_the_report_of_a_run_folder(server: SyncClient, data: Path) -> None:
    run_dir = data / "run"
    ok(server.call("run", {"targets": str(data / "targets.parquet"), "source": str(data / "pool.parquet"),
                           "run_dir": str(run_dir), "overrides": {"model": "thumbnail", "topn": 2}}))
    (run_dir / "Mining_Report.md").unlink()
    sc = ok(server.call("report", {"run_dir": str(run_dir)}))
    assert sc["report_path"] == str(run_dir / "Mining_Report.md")
    text = (run_dir / "Mining_Report.md").read_text(encoding="utf-8")
    assert sc["words"] > 0 and text.strip()
    # one encoder on both sides, every image read, 2 targets x topn 2 from a pool of 4, no target
    # in the pool: nothing for the report to flag
    assert sc["verdict"] == "ok"
    assert [w["code"] for w in sc["warnings"]] == []
    assert all((run_dir / name).is_file() for name in sc["pictures"])
    assert sc["missing_facts"] == []  # a run folder of ours records every fact


# --------------------------------------------------------------------------- progress and logs


MIN_GAP = 0.25  # seconds; the slow batches keep the server busy >= 0.8 s even on many fast cores


@pytest.mark.parametrize("mode", ["auto", "legacy"])
def test_progress_and_log_notifications_arrive_during_the_call(tmp_path: Path, mode: str) -> None:
    """Progress (for the call's progressToken) and logging/message notifications reach the
    client while the tool works, not with or after the result. The first four batches are
    slow images: after it sends progress 0 (and, before that, the "loading encoder" log) the
    server decodes for ~1.3 s more (~0.32 s a batch on an idle 2-core machine, at least one
    image's ~0.2 s on any number of cores), and says how long in its result (`timings.decode`,
    all of it spent after progress 0). Had the notifications come only with the result, they
    would arrive (almost) together with it; they must arrive at least half that time, and
    MIN_GAP, before it and before the last progress."""
    slow = 16
    for i in range(60):
        if i < slow:
            write_slow_image(tmp_path / "many" / f"{i}.png")
        else:
            write_image(tmp_path / "many" / f"{i}.png", seed=i, size=(24, 16))
    pq.write_table(pa.table({"filepath": [f"many/{i}.png" for i in range(60)]}), tmp_path / "many.parquet")
    out = tmp_path / "many_embeddings.parquet"
    progress: list[tuple[float, float, float | None, str | None]] = []  # (arrived, value, total, message)

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append((time.monotonic(), value, total, message))

    # log_level="info": the 2026-07-28 per-request opt-in (no effect on the 2025 handshake era)
    with SyncClient(stdio_params(tmp_path), mode=mode, log_level="info") as client:
        assert client.protocol_version == (MODERN if mode == "auto" else LEGACY)

        async def call() -> tuple[CallToolResult, float]:  # on the client's loop, as the callbacks
            result = await client.client.call_tool(
                "embed", {"input_parquet": "many.parquet", "output_parquet": out.name,
                          "overrides": {"model": "thumbnail", "batch_size": 4}},
                progress_callback=on_progress)
            return result, time.monotonic()

        result, answered = client.run(call)
        sc = ok(result)
    assert sc["rows"] == 60 and sc["skipped"] == 0 and out.is_file()
    assert len(progress) >= 2, progress
    values = [p[1] for p in progress]
    assert values == sorted(set(values)), f"progress must only grow: {values}"
    assert values[0] < values[-1] == 60
    assert all(p[2] == 60 for p in progress), progress
    assert all(p[3].startswith("embed: ") for p in progress), progress
    loading = [(arrived, params) for arrived, params in client.logs if str(params.data) == "loading encoder thumbnail"]
    assert loading, client.logs
    assert (loading[0][1].level, loading[0][1].logger) == ("info", "deft-mine")

    # while the call still ran: before the last progress and the result, by what the slow
    # batches guarantee (the server's own decode time after progress 0), with room for jitter
    busy = sc["timings"]["decode"]
    margin = max(MIN_GAP, busy / 2)
    last_progress = progress[-1][0]
    for what, arrived in (("first progress", progress[0][0]), ("'loading encoder' log", loading[0][0])):
        assert last_progress - arrived >= margin and answered - arrived >= margin, (
            f"the {what} arrived {answered - arrived:.3f} s before the result and "
            f"{last_progress - arrived:.3f} s before the last progress, although the server decoded "
            f"for {busy:.3f} s after sending it: the notifications came with the result, not during the call")


# --------------------------------------------------------------------------- session lock

@pytest.mark.parametrize("mode", ["legacy", "auto"])  # handshake-era and 2026-07-28 clients
def test_session_lock_fixes_the_encoder(image_set: Path, mode: str) -> None:
    clip_dir = image_set / "clip_checkpoint"  # a local folder: the lock refuses before loading anything
    clip_dir.mkdir()
    with SyncClient(stdio_params(image_set), mode=mode) as client:
        assert ok(client.call("preflight"))["session_encoder"] is None
        first = ok(client.call("embed", {"input_parquet": "pool.parquet", "output_parquet": "e1.parquet",
                                         "overrides": {"model": "thumbnail"}}))
        assert first["encoder"]["model"] == "thumbnail"

        other = refused(client.call("embed", {"input_parquet": "pool.parquet", "output_parquet": "e2.parquet",
                                              "overrides": {"model": "CLIP", "model_path": str(clip_dir)}}),
                        "encoder_mismatch")
        assert other["locked_encoder"]["model"] == "thumbnail"
        assert other["locked_encoder"]["model_path"] is None
        assert other["requested_encoder"] == {"model": "CLIP", "model_path": str(clip_dir.resolve()),
                                              "model_config_path": None, "pooling": None}
        assert set(other["differing"]) == {"model", "model_path"}
        assert not (image_set / "e2.parquet").exists()

        again = ok(client.call("embed", {"input_parquet": "targets.parquet", "output_parquet": "e3.parquet",
                                         "overrides": {"model": "thumbnail", "batch_size": 1}}))
        assert again["encoder"] == first["encoder"]  # batch_size is not part of the identity

        session = ok(client.call("preflight"))["session_encoder"]
        assert session is not None and session["model"] == "thumbnail"
        assert session == first["encoder"]


# --------------------------------------------------------------------------- warnings as data


def test_mine_warns_filter_by_label_noop(server: SyncClient, root: Path) -> None:
    folder = root / "label_noop"
    folder.mkdir()
    rng = np.random.default_rng(0)
    source = write_embeddings(folder / "pool.parquet", rng.normal(size=(4, 8)), labels=["a", "b", "a", "b"],
                              identity=THUMB_ID)
    target = write_embeddings(folder / "targets.parquet", rng.normal(size=(2, 8)), identity=THUMB_ID)
    out = folder / "mined.parquet"
    sc = ok(server.call("mine", {"source_parquet": str(source), "target_parquet": str(target),
                                 "output_parquet": str(out), "overrides": {"filter_by_label": True, "topn": 1}}))
    assert [w["code"] for w in sc["warnings"]] == ["filter_by_label_noop"]
    noop = warning(sc, "filter_by_label_noop")
    assert noop["details"]["sides_without_label"] == ["target"]
    assert sc["label_filter"] == "noop" and sc["filter_by_label"] is True
    assert sc["encoder"]["model"] == "thumbnail"
    assert out.is_file() and (folder / "mining_summary.txt").is_file()


def test_mine_warns_provenance_unknown(server: SyncClient, root: Path) -> None:
    folder = root / "provenance"
    folder.mkdir()
    rng = np.random.default_rng(1)
    source = write_embeddings(folder / "pool.parquet", rng.normal(size=(4, 8)), identity=THUMB_ID)
    target = write_embeddings(folder / "targets.parquet", rng.normal(size=(2, 8)), identity=None)
    sc = ok(server.call("mine", {"source_parquet": str(source), "target_parquet": str(target),
                                 "output_parquet": str(folder / "mined.parquet"), "overrides": {"topn": 2}}))
    assert warning(sc, "provenance_unknown")["details"] == {"sides": ["target"]}
    assert sc["encoder"] is None
    assert sc["mined"] == 4


def test_embed_warns_images_skipped(server: SyncClient, data: Path) -> None:
    pq.write_table(pa.table({"filepath": ["imgs/2.png", "imgs/gone.png", "imgs/3.png"]}), data / "holes.parquet")
    sc = ok(server.call("embed", {"input_parquet": str(data / "holes.parquet"),
                                  "output_parquet": str(data / "holes_emb.parquet"),
                                  "overrides": {"model": "thumbnail"}}))
    assert (sc["rows"], sc["input_rows"], sc["skipped"]) == (2, 3, 1)
    skipped = warning(sc, "images_skipped")
    assert skipped["details"]["count"] == 1
    assert "imgs/gone.png" in " ".join(skipped["details"]["examples"])
    assert pq.read_table(data / "holes_emb.parquet").num_rows == 2


@pytest.fixture(scope="module")
def risky_inputs(root: Path) -> tuple[Path, Path]:
    """Inputs that trip every warning preflight predicts: the targets have no label and no
    encoder identity and list a missing image; the pool holds one of the targets."""
    folder = root / "risky"
    for i in range(4):
        write_image(folder / "imgs" / f"{i}.png", seed=i)
    targets = write_embeddings(folder / "targets.parquet", [[1.0, 0.0], [0.0, 1.0]], identity=None,
                               filepaths=["imgs/0.png", "imgs/missing.png"])
    source = write_embeddings(folder / "pool.parquet", [[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]],
                              labels=["a", "b", "a"], identity=THUMB_ID,
                              filepaths=["imgs/0.png", "imgs/2.png", "imgs/3.png"])
    return targets, source


@pytest.mark.parametrize("code, details", [
    ("filter_by_label_noop", {"sides_without_label": ["targets"]}),
    ("pool_exhausted", {"topn": 50, "queries": 2, "pool": 3}),
    ("target_in_pool", {"count": 1}),
    ("images_skipped", {"side": "targets", "count": 1, "checked": 2, "examples": ["imgs/missing.png"]}),
    ("provenance_unknown", {"sides": ["targets"]}),
])
def test_preflight_predicts_warning(server: SyncClient, risky_inputs: tuple[Path, Path],
                                    code: str, details: dict) -> None:
    targets, source = risky_inputs
    sc = ok(server.call("preflight", {"targets": str(targets), "source": str(source),
                                      "overrides": {"filter_by_label": True, "topn": 50}}))
    assert sc["ok"] is True and sc["backend"] == "local"
    assert warning(sc, code)["details"] == details
    assert len(sc["warnings"]) == 5


def test_preflight_predicts_nothing_for_clean_inputs(server: SyncClient, data: Path) -> None:
    sc = ok(server.call("preflight", {"targets": str(data / "targets.parquet"), "source": str(data / "pool.parquet"),
                                      "overrides": {"filter_by_label": True, "topn": 2}}))
    assert sc["warnings"] == []
    assert {c["name"] for c in sc["checks"]} == {"torch", "thumbnail encoder", "store"}


# --------------------------------------------------------------------------- refusals


def test_refuses_unknown_spec_key_naming_the_closest(server: SyncClient, data: Path) -> None:
    error = refused(server.call("run", {"targets": str(data / "targets.parquet"), "source": str(data / "pool.parquet"),
                                        "output_dir": str(data / "typo_out"),
                                        "overrides": {"model": "thumbnail", "topm": 2}}), "spec_unknown_key")
    assert (error["field"], error["closest"]) == ("topm", "topn")
    assert not (data / "typo_out").exists()

    error = refused(server.call("embed", {"input_parquet": str(data / "pool.parquet"),
                                          "output_parquet": str(data / "typo.parquet"),
                                          "overrides": {"model": "thumbnail", "batch_sise": 4}}), "spec_unknown_key")
    assert (error["field"], error["closest"]) == ("batch_sise", "batch_size")
    assert not (data / "typo.parquet").exists()


def test_refuses_missing_column(server: SyncClient, data: Path) -> None:
    pool = write_embeddings(data / "pool_emb.parquet", [[1.0, 0.0], [0.0, 1.0]], identity=THUMB_ID)
    out = data / "never.parquet"
    error = refused(server.call("mine", {"source_parquet": str(pool), "target_parquet": str(data / "targets.parquet"),
                                         "output_parquet": str(out)}), "column_missing")
    assert error["missing"] == ["embedding"]
    assert error["columns"] == ["filepath", "label", "siamese_score"]
    assert not out.exists() and not (data / "mining_summary.txt").exists()

    pq.write_table(pa.table({"path": ["imgs/0.png"]}), data / "no_filepath.parquet")
    error = refused(server.call("embed", {"input_parquet": str(data / "no_filepath.parquet"),
                                          "output_parquet": str(out), "overrides": {"model": "thumbnail"}}),
                    "column_missing")
    assert error["missing"] == ["filepath", "text"]  # an image listing or a text one
    assert not out.exists()


def _attack(server: SyncClient, base: Path, tool: str, field: str, arguments: dict, resolved: Path) -> None:
    """Call a tool with one path aimed outside the root: refused, naming the field and where
    the path really leads, and nothing written anywhere (inside the root or out of it)."""
    before = listing(base)
    existed = resolved.exists()
    error = refused(server.call(tool, arguments), "path_outside_roots")
    assert error["field"] == field
    assert error["resolved"] == str(resolved)
    assert error["roots"] == [str(base / "root")]
    assert resolved.exists() == existed
    assert listing(base) == before


def test_roots_attack_dotdot_traversal_is_refused(server: SyncClient, data: Path, base: Path, outside: Path) -> None:
    rel = data.relative_to(base / "root")
    _attack(server, base, "embed", "output_parquet",
            {"input_parquet": f"{rel}/pool.parquet", "output_parquet": "../outside/stolen.parquet",
             "overrides": {"model": "thumbnail"}}, outside / "stolen.parquet")
    _attack(server, base, "run", "output_dir",
            {"targets": f"{rel}/targets.parquet", "source": f"{rel}/pool.parquet",
             "output_dir": f"{rel}/../../outside/runs", "overrides": {"model": "thumbnail"}}, outside / "runs")
    _attack(server, base, "run", "targets",  # reading is refused too
            {"targets": "../outside/targets.parquet", "source": f"{rel}/pool.parquet",
             "run_dir": f"{rel}/never", "overrides": {"model": "thumbnail"}}, outside / "targets.parquet")


def test_roots_attack_absolute_path_outside_is_refused(server: SyncClient, data: Path, base: Path,
                                                       outside: Path) -> None:
    _attack(server, base, "embed", "output_parquet",
            {"input_parquet": str(data / "pool.parquet"), "output_parquet": str(outside / "abs.parquet"),
             "overrides": {"model": "thumbnail"}}, outside / "abs.parquet")
    _attack(server, base, "run", "run_dir",
            {"targets": str(data / "targets.parquet"), "source": str(data / "pool.parquet"),
             "run_dir": str(outside / "abs_run"), "overrides": {"model": "thumbnail"}}, outside / "abs_run")


def test_roots_attack_symlink_inside_root_pointing_outside_is_refused(server: SyncClient, data: Path, base: Path,
                                                                      outside: Path) -> None:
    (data / "escape").symlink_to(outside, target_is_directory=True)
    _attack(server, base, "embed", "output_parquet",
            {"input_parquet": str(data / "pool.parquet"), "output_parquet": str(data / "escape" / "sym.parquet"),
             "overrides": {"model": "thumbnail"}}, outside / "sym.parquet")
    _attack(server, base, "run", "output_dir",
            {"targets": str(data / "targets.parquet"), "source": str(data / "pool.parquet"),
             "output_dir": str(data / "escape" / "runs"), "overrides": {"model": "thumbnail"}}, outside / "runs")


def test_roots_attack_path_smuggled_in_a_spec_file_or_overrides_is_refused(server: SyncClient, data: Path,
                                                                           base: Path, outside: Path) -> None:
    """The path arguments are not the only way in: a spec file or `overrides` may name a path
    too, and it passes the same door once the spec is loaded."""
    rel = data.relative_to(base / "root")
    (data / "leaky.yaml").write_text(f"model: thumbnail\noutput_parquet: {outside / 'spec.parquet'}\n")
    _attack(server, base, "embed", "output_parquet",
            {"input_parquet": f"{rel}/pool.parquet", "spec_path": f"{rel}/leaky.yaml"}, outside / "spec.parquet")
    _attack(server, base, "embed", "image_root",
            {"input_parquet": f"{rel}/pool.parquet", "output_parquet": f"{rel}/e.parquet",
             "overrides": {"model": "thumbnail", "image_root": str(outside)}}, outside)


def test_roots_attack_images_listed_inside_a_parquet_are_refused(server: SyncClient, data: Path, base: Path,
                                                                outside: Path) -> None:
    """A listing inside the root that names images outside it (absolute, `../`) would leak
    them into embeddings and the contact sheet: refused before any image is read."""
    shutil.copy(data / "imgs" / "0.png", outside / "leak.png")
    pq.write_table(pa.table({"filepath": ["imgs/0.png", str(outside / "leak.png"), "../../outside/leak.png"]}),
                   data / "leaky.parquet")
    before = listing(base)
    error = refused(server.call("embed", {"input_parquet": str(data / "leaky.parquet"),
                                          "output_parquet": str(data / "leaky_emb.parquet"),
                                          "overrides": {"model": "thumbnail"}}), "path_outside_roots")
    assert (error["field"], error["rows"]) == ("filepath", [1, 2])
    assert listing(base) == before


def test_unknown_tools_and_bad_arguments_get_the_specifications_answers(server: SyncClient, data: Path) -> None:
    """An unknown tool is a JSON-RPC error -32602; arguments that fail the input schema are an
    isError result with our error model (no raw pydantic text); the server serves on."""
    from mcp.shared.exceptions import MCPError

    with pytest.raises(MCPError) as exc:
        server.call("no_such_tool", {})
    assert exc.value.error.code == -32602 and "no_such_tool" in exc.value.error.message
    error = refused(server.call("select", {"candidates": "c.parquet", "ledger": "l.json", "iteration": "three",
                                           "output": "o.parquet"}), "invalid_arguments")
    assert error["field"] == "iteration" and "pydantic.dev" not in error["message"]
    error = refused(server.call("embed", {"input_parquet": 42}), "invalid_arguments")
    assert error["field"] == "input_parquet"
    assert ok(server.call("preflight", {}))["ok"] is True  # and the next request is served


def test_embed_and_mine_take_their_paths_from_the_spec_file(server: SyncClient, data: Path) -> None:
    """As in a TAO spec (and on the command line), the paths may live in the spec file; a
    path named nowhere is refused with the field to set."""
    (data / "embed.yaml").write_text(f"model: thumbnail\ninput_parquet: {data / 'pool.parquet'}\n"
                                     f"output_parquet: {data / 'pool_emb.parquet'}\n")
    embedded = ok(server.call("embed", {"spec_path": str(data / "embed.yaml")}))
    assert embedded["output_parquet"] == str(data / "pool_emb.parquet") and embedded["rows"] == 4
    error = refused(server.call("mine", {"target_parquet": str(data / "pool_emb.parquet"),
                                         "output_parquet": str(data / "m.parquet")}), "spec_missing_value")
    assert error["field"] == "source_parquet" and not (data / "m.parquet").exists()


# --------------------------------------------------------------------------- resources


def test_references_are_listed_and_readable(server: SyncClient) -> None:
    listed = server.run(server.client.list_resources).resources
    names = ["invocation.md", "report-spec.md", "troubleshooting.md"]
    assert sorted(str(r.uri) for r in listed) == [f"deft-mine://references/{n}" for n in names]
    assert all(r.mime_type == "text/markdown" for r in listed)
    for name in names:
        uri = f"deft-mine://references/{name}"
        contents = server.run(server.client.read_resource, uri).contents
        assert len(contents) == 1
        assert str(contents[0].uri) == uri and contents[0].mime_type == "text/markdown"
        assert contents[0].text == (REFERENCES / name).read_text(encoding="utf-8")
        assert contents[0].text.startswith("# ")
