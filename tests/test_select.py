"""History-aware selection across DEFT iterations: the select tool and its verified ledger.

Real parquet files on disk; crashes and concurrent writers are real subprocesses.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deft_mine.engine.ledger import absolute_normal
from deft_mine.errors import DeftError
from deft_mine.events import RecordingEvents
from deft_mine.tools.guards import PathPolicy
from deft_mine.tools.select import select

CANDIDATES = "mined_candidates.parquet"
SUMMARY = "mining_summary.txt"


# ---------------------------------------------------------------- helpers

def write_candidates(path: Path, filepaths: list[str], summary: str | None = "summary\n") -> Path:
    """A candidates parquet (filepath + extra columns) and, optionally, the summary beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n = len(filepaths)
    pq.write_table(pa.table({
        "filepath": pa.array(filepaths, pa.string()),
        "score": pa.array([round(1.0 - i / 100, 2) for i in range(n)], pa.float64()),
        "label": pa.array([f"L{i}" for i in range(n)], pa.string()),
    }), path)
    if summary is not None:
        (path.parent / SUMMARY).write_text(summary, encoding="utf-8")
    return path


def rows(path: Path) -> list[dict[str, Any]]:
    return pq.read_table(path).to_pylist()


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def refused(code: str, *args: Any, **kwargs: Any) -> DeftError:
    with pytest.raises(DeftError) as info:
        select(*args, **kwargs)
    assert info.value.code == code, str(info.value)
    return info.value


def tree(root: Path) -> dict[str, bytes]:
    """Every file under root with its bytes (lock files left out: they carry no data)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.endswith(".lock")}


def py(script: str, *args: str, **popen: Any) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


@pytest.fixture
def first(tmp_path: Path) -> dict[str, Path]:
    """Iteration 1 recorded: five distinct candidates (relative to the candidates' folder)."""
    cands = write_candidates(tmp_path / "it1" / CANDIDATES, [f"img/{i}.png" for i in range(5)])
    ledger, out = tmp_path / "LEDGER.json", tmp_path / "it1" / "mined.parquet"
    result = select(cands, ledger, 1, out)
    assert (result.newly_selected, result.resumed) == (5, False)
    return {"cands": cands, "ledger": ledger, "out": out, "root": tmp_path}


# ---------------------------------------------------------------- normalisation

@pytest.mark.parametrize("given, expected", [
    ("a/./b.png", "/base/a/b.png"),
    ("a/b.png/", "/base/a/b.png"),
    ("a//b.png", "/base/a/b.png"),
    ("x/../a/b.png", "/base/a/b.png"),
    ("/base/a/b.png", "/base/a/b.png"),
    ("/other/A.PNG/", "/other/A.PNG"),  # case kept
    ("../up.png", "/up.png"),
])
def test_absolute_normal(given: str, expected: str) -> None:
    assert absolute_normal(given, Path("/base")) == expected


# ---------------------------------------------------------------- 1. three iterations

def test_three_iterations_with_overlapping_candidates(tmp_path: Path) -> None:
    images = tmp_path / "images"
    ledger = tmp_path / "history" / "LEDGER.json"  # its folder does not exist yet
    I = str(images)

    # Iteration 1: relative to image_root; "c.png" twice; "A.png" and (later) "a.png" differ by case.
    c1 = write_candidates(tmp_path / "it1" / CANDIDATES,
                          ["a/./b.png", "c.png", "A.png", "c.png", "d/e.png"], summary="round 1\n")
    o1 = tmp_path / "it1" / "mined.parquet"
    events = RecordingEvents()
    r1 = select(c1, ledger, 1, o1, image_root=images, topn=5, events=events)
    assert (r1.iteration, r1.candidates, r1.previously_selected, r1.duplicates_in_candidates,
            r1.newly_selected, r1.cumulative_selected, r1.resumed) == (1, 5, 0, 1, 4, 4, False)
    assert (r1.output, r1.ledger, r1.warnings) == (str(o1), str(ledger), [])
    assert rows(o1) == [
        {"filepath": "a/./b.png", "score": 1.0, "label": "L0"},
        {"filepath": "c.png", "score": 0.99, "label": "L1"},
        {"filepath": "A.png", "score": 0.98, "label": "L2"},
        {"filepath": "d/e.png", "score": 0.96, "label": "L4"},
    ]
    assert any("4 of 5" in message for _, message in events.logs)

    # Iteration 2: the same images spelt differently (trailing slash, absolute, doubled slash),
    # a lower-case "a.png" (new: case is kept), "f.png" and its repeat "./f.png".
    c2 = write_candidates(tmp_path / "it2" / CANDIDATES,
                          ["a/b.png/", f"{I}/c.png", "a.png", "f.png", "d//e.png", "./f.png"],
                          summary="round 2\n")
    o2 = tmp_path / "it2" / "mined.parquet"
    r2 = select(c2, ledger, 2, o2, image_root=images)
    assert (r2.candidates, r2.previously_selected, r2.duplicates_in_candidates, r2.newly_selected,
            r2.cumulative_selected, r2.resumed) == (6, 3, 1, 2, 6, False)
    assert rows(o2) == [{"filepath": "a.png", "score": 0.98, "label": "L2"},
                        {"filepath": "f.png", "score": 0.97, "label": "L3"}]

    # Iteration 3: no image_root, so relative paths join the candidates' own folder (it3/).
    c3 = write_candidates(tmp_path / "it3" / CANDIDATES,
                          ["../images/g.png", "../images/A.png", f"{I}/sub/../f.png", "../images/h.png"],
                          summary="round 3\n")
    o3 = tmp_path / "it3" / "mined.parquet"
    r3 = select(c3, ledger, 3, o3)
    assert (r3.candidates, r3.previously_selected, r3.duplicates_in_candidates, r3.newly_selected,
            r3.cumulative_selected) == (4, 2, 0, 2, 8)
    assert [r["filepath"] for r in rows(o3)] == ["../images/g.png", "../images/h.png"]
    assert [r["score"] for r in rows(o3)] == [1.0, 0.97]

    data = json.loads(ledger.read_text(encoding="utf-8"))
    assert (data["format"], data["version"]) == ("deft-mine-ledger", 1)
    assert data["selected"] == {
        f"{I}/a/b.png": 1, f"{I}/c.png": 1, f"{I}/A.png": 1, f"{I}/d/e.png": 1,
        f"{I}/a.png": 2, f"{I}/f.png": 2,
        f"{I}/g.png": 3, f"{I}/h.png": 3,
    }
    its = data["iterations"]
    assert [it["iteration"] for it in its] == [1, 2, 3]
    assert [it["selected"] for it in its] == [
        [f"{I}/a/b.png", f"{I}/c.png", f"{I}/A.png", f"{I}/d/e.png"],
        [f"{I}/a.png", f"{I}/f.png"],
        [f"{I}/g.png", f"{I}/h.png"],
    ]
    assert [(it["candidates"], it["previously_selected"], it["duplicates_in_candidates"],
             it["newly_selected"]) for it in its] == [(5, 0, 1, 4), (6, 3, 1, 2), (4, 2, 0, 2)]
    assert [it["topn"] for it in its] == [5, None, None]
    assert [it["image_root"] for it in its] == [I, I, str(tmp_path / "it3")]
    for it, (cands, out) in zip(its, [(c1, o1), (c2, o2), (c3, o3)]):
        stamp = dt.datetime.fromisoformat(it["timestamp"])
        assert stamp.tzinfo is not None
        assert abs((dt.datetime.now(dt.timezone.utc) - stamp).total_seconds()) < 120
        summary = cands.parent / SUMMARY
        assert it["files"] == {
            "candidates": {"path": str(cands), "sha256": sha(cands)},
            "output": {"path": str(out), "sha256": sha(out)},
            "summary": {"path": str(summary), "sha256": sha(summary)},
        }
    # the three summaries differ, so the hashes really are per file
    assert len({it["files"]["summary"]["sha256"] for it in its}) == 3


def test_summary_absent_is_recorded_as_null(tmp_path: Path) -> None:
    cands = write_candidates(tmp_path / CANDIDATES, ["x.png"], summary=None)
    select(cands, tmp_path / "L.json", 1, tmp_path / "out.parquet")
    files = json.loads((tmp_path / "L.json").read_text())["iterations"][0]["files"]
    assert files["summary"] is None
    assert files["candidates"]["sha256"] == sha(cands)


# ---------------------------------------------------------------- 2. zero rows

def test_zero_row_selection_is_valid(first: dict[str, Path]) -> None:
    root, ledger = first["root"], first["ledger"]
    # every candidate was selected in iteration 1 (spelt absolute, relative, repeated)
    c2 = write_candidates(root / "it2" / CANDIDATES,
                          [str(root / "it1" / "img/0.png"), "../it1/img/3.png", "../it1/img/3.png/"])
    o2 = root / "it2" / "mined.parquet"
    r2 = select(c2, ledger, 2, o2)
    assert (r2.candidates, r2.previously_selected, r2.duplicates_in_candidates, r2.newly_selected,
            r2.cumulative_selected) == (3, 3, 0, 0, 5)
    # nothing new, every candidate mined before, and the loop's yield monitor: 5 selected, now 1 candidate
    assert [w.code for w in r2.warnings] == ["selection_empty", "candidates_mostly_mined", "yield_collapsed"]
    table = pq.read_table(o2)
    assert table.num_rows == 0
    assert table.schema.equals(pq.read_schema(c2))
    entry = json.loads(ledger.read_text())["iterations"][1]
    assert (entry["newly_selected"], entry["selected"]) == (0, [])
    # resuming the empty iteration says so again
    again = select(c2, ledger, 2, o2)
    assert again.resumed and [w.code for w in again.warnings] == [w.code for w in r2.warnings]


def test_empty_candidates_file(tmp_path: Path) -> None:
    cands = write_candidates(tmp_path / CANDIDATES, [])
    result = select(cands, tmp_path / "L.json", 1, tmp_path / "out.parquet")
    assert (result.candidates, result.newly_selected, result.cumulative_selected) == (0, 0, 0)
    assert [w.code for w in result.warnings] == ["selection_empty"]
    assert pq.read_table(tmp_path / "out.parquet").schema.equals(pq.read_schema(cands))
    assert pq.read_table(tmp_path / "out.parquet").num_rows == 0


# ---------------------------------------------------------------- 3. resume

def test_resume_with_unchanged_files(first: dict[str, Path]) -> None:
    ledger, out = first["ledger"], first["out"]
    before_ledger, before_out = ledger.read_bytes(), out.read_bytes()
    again = select(first["cands"], ledger, 1, out)
    assert (again.resumed, again.iteration, again.candidates, again.previously_selected,
            again.newly_selected, again.cumulative_selected) == (True, 1, 5, 0, 5, 5)
    assert ledger.read_bytes() == before_ledger
    assert out.read_bytes() == before_out


@pytest.mark.parametrize("role", ["candidates", "summary", "output"])
def test_resume_refuses_a_changed_file(first: dict[str, Path], role: str) -> None:
    cands, ledger, out = first["cands"], first["ledger"], first["out"]
    if role == "candidates":  # one more row
        write_candidates(cands, [f"img/{i}.png" for i in range(6)])
    elif role == "summary":
        (cands.parent / SUMMARY).write_text("edited\n")
    else:
        pq.write_table(pq.read_table(out).slice(0, 2), out)
    before = tree(first["root"])
    error = refused("ledger_hash_mismatch", cands, ledger, 1, out)
    assert error.details["field"] == role
    assert role in error.message
    recorded = json.loads(ledger.read_text())["iterations"][0]["files"][role]["sha256"]
    assert error.details["recorded_sha256"] == recorded != error.details["current_sha256"]
    assert tree(first["root"]) == before  # ledger and output bytes unchanged


def test_resume_rewrites_a_lost_output(first: dict[str, Path]) -> None:
    ledger, out = first["ledger"], first["out"]
    recorded_rows, recorded_bytes = rows(out), ledger.read_bytes()
    out.unlink()
    again = select(first["cands"], ledger, 1, out)
    assert again.resumed and again.newly_selected == 5
    assert rows(out) == recorded_rows
    assert ledger.read_bytes() == recorded_bytes
    # the rewritten output is the recorded one, so a further resume verifies it
    assert sha(out) == json.loads(recorded_bytes)["iterations"][0]["files"]["output"]["sha256"]
    assert select(first["cands"], ledger, 1, out).resumed


def test_resume_of_a_lost_output_with_duplicates_keeps_first_rows(tmp_path: Path) -> None:
    cands = write_candidates(tmp_path / CANDIDATES, ["p.png", "q.png", "p.png", "r.png", "q.png/"])
    out = tmp_path / "out.parquet"
    select(cands, tmp_path / "L.json", 1, out)
    first_rows = rows(out)
    assert [r["label"] for r in first_rows] == ["L0", "L1", "L3"]
    out.unlink()
    select(cands, tmp_path / "L.json", 1, out)
    assert rows(out) == first_rows


def test_resume_of_a_lost_output_with_another_image_root(first: dict[str, Path]) -> None:
    out = first["out"]
    recorded = rows(out)
    out.unlink()
    try:
        result = select(first["cands"], first["ledger"], 1, out, image_root=first["root"] / "elsewhere")
    except DeftError:
        return  # refusing is fine too
    assert rows(out) == recorded and result.newly_selected == len(recorded)


# ---------------------------------------------------------------- 4. iteration numbers

def test_iteration_numbers_must_be_consecutive(first: dict[str, Path]) -> None:
    root, ledger = first["root"], first["ledger"]
    c = write_candidates(root / "next" / CANDIDATES, ["new.png"])
    out = root / "next" / "mined.parquet"

    before = tree(root)
    skipped = refused("ledger_iteration_invalid", c, ledger, 3, out)
    assert skipped.details["last_iteration"] == 1
    assert "2" in (skipped.fix or "")
    assert not out.exists() and tree(root) == before

    select(c, ledger, 2, out)
    before = tree(root)
    older_out = root / "next" / "again.parquet"
    older = refused("ledger_iteration_invalid", first["cands"], ledger, 1, older_out)
    assert older.details["last_iteration"] == 2
    assert not older_out.exists() and tree(root) == before

    for bad in (0, -1):
        refused("ledger_iteration_invalid", c, ledger, bad, older_out)
        assert not older_out.exists() and tree(root) == before


def test_first_iteration_must_be_one(tmp_path: Path) -> None:
    c = write_candidates(tmp_path / CANDIDATES, ["x.png"])
    ledger, out = tmp_path / "L.json", tmp_path / "out.parquet"
    refused("ledger_iteration_invalid", c, ledger, 2, out)
    refused("ledger_iteration_invalid", c, ledger, 0, out)
    assert not ledger.exists() and not out.exists()


# ---------------------------------------------------------------- 5. corrupt ledger

def _two_iterations(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    c1 = write_candidates(tmp_path / "it1" / CANDIDATES, ["a.png", "b.png"])
    c2 = write_candidates(tmp_path / "it2" / CANDIDATES, ["../it1/a.png", "../it1/c.png"])
    ledger = tmp_path / "LEDGER.json"
    select(c1, ledger, 1, tmp_path / "it1" / "mined.parquet")
    select(c2, ledger, 2, tmp_path / "it2" / "mined.parquet")
    return ledger, json.loads(ledger.read_text())


def _json(data: Any) -> bytes:
    return json.dumps(data).encode()


def _truncated(ledger: Path, data: dict) -> bytes:
    return ledger.read_bytes()[: len(ledger.read_bytes()) // 2]


def _wrong_format(ledger: Path, data: dict) -> bytes:
    return _json({**data, "format": "something-else"})


def _not_an_object(ledger: Path, data: dict) -> bytes:
    return _json(data["iterations"])


def _future_version(ledger: Path, data: dict) -> bytes:
    return _json({**data, "version": 2})


def _binary(ledger: Path, data: dict) -> bytes:
    return b"\xff\xfe\x00garbage"


def _gap(ledger: Path, data: dict) -> bytes:
    data["iterations"][1]["iteration"] = 3
    return _json(data)


def _first_missing(ledger: Path, data: dict) -> bytes:
    kept = data["iterations"][1]
    return _json({**data, "iterations": [kept], "selected": {p: 2 for p in kept["selected"]}})


def _selected_lacks_a_path(ledger: Path, data: dict) -> bytes:
    data["selected"].pop(next(iter(data["selected"])))
    return _json(data)


def _selected_has_an_extra_path(ledger: Path, data: dict) -> bytes:
    data["selected"]["/nowhere/z.png"] = 1
    return _json(data)


def _selected_not_an_object(ledger: Path, data: dict) -> bytes:
    return _json({**data, "selected": list(data["selected"])})


CORRUPTIONS = [_truncated, _wrong_format, _not_an_object, _future_version, _binary, _gap,
               _first_missing, _selected_lacks_a_path, _selected_has_an_extra_path,
               _selected_not_an_object]


def _check_corrupt_refused(tmp_path: Path, corrupt) -> None:
    ledger, data = _two_iterations(tmp_path)
    broken = corrupt(ledger, data)
    ledger.write_bytes(broken)
    c3 = write_candidates(tmp_path / "it3" / CANDIDATES, ["d.png"])
    before = tree(tmp_path)
    for iteration in (3, 2):  # next, and resume of the last
        out = tmp_path / "it3" / f"mined{iteration}.parquet"
        error = refused("ledger_corrupt", c3, ledger, iteration, out)
        assert error.details["path"] == str(ledger)
        assert not out.exists()
    assert ledger.read_bytes() == broken
    assert tree(tmp_path) == before


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__.strip("_"))
def test_corrupt_ledger_is_refused_and_kept(tmp_path: Path, corrupt) -> None:
    _check_corrupt_refused(tmp_path, corrupt)


def _selected_names_the_wrong_iteration(ledger: Path, data: dict) -> bytes:
    path = data["iterations"][0]["selected"][0]
    data["selected"][path] = 2
    return _json(data)


def _path_selected_twice(ledger: Path, data: dict) -> bytes:
    data["iterations"][1]["selected"].append(data["iterations"][0]["selected"][0])
    data["iterations"][1]["newly_selected"] += 1
    return _json(data)


def _iteration_selected_null(ledger: Path, data: dict) -> bytes:
    data["iterations"][0]["selected"] = None
    return _json(data)


@pytest.mark.parametrize("corrupt", [
    pytest.param(_selected_names_the_wrong_iteration),
    pytest.param(_path_selected_twice),
    pytest.param(_iteration_selected_null),
], ids=lambda f: f.__name__.strip("_"))
def test_corrupt_ledger_consistency_gaps(tmp_path: Path, corrupt) -> None:
    _check_corrupt_refused(tmp_path, corrupt)


# ---------------------------------------------------------------- 6. kill during the write

DIE_ON_LEDGER_RENAME = """
    import os, sys
    ledger = os.path.abspath(sys.argv[2])
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if os.path.abspath(os.fspath(dst)) == ledger:
            os._exit(9)  # the temp file is written and fsynced; the rename never happens
        return real_replace(src, dst, *args, **kwargs)

    os.replace = replace
    from deft_mine.tools.select import select
    select(sys.argv[1], sys.argv[2], 2, sys.argv[3])
    sys.exit(0)
"""


@pytest.mark.e2e  # a real second Python process
def test_kill_between_temp_write_and_rename(first: dict[str, Path]) -> None:
    root, ledger = first["root"], first["ledger"]
    old = ledger.read_bytes()
    c2 = write_candidates(root / "it2" / CANDIDATES, ["../it1/img/0.png", "new.png"])
    o2 = root / "it2" / "mined.parquet"
    proc = py(DIE_ON_LEDGER_RENAME, str(c2), str(ledger), str(o2))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 9, err

    assert ledger.read_bytes() == old
    assert [it["iteration"] for it in json.loads(old)["iterations"]] == [1]
    stale = list(root.glob(".LEDGER.json.*.tmp"))
    assert len(stale) == 1  # the new ledger, complete, never renamed
    assert [it["iteration"] for it in json.loads(stale[0].read_text())["iterations"]] == [1, 2]

    # the dead process's lock is gone and the stale temp file is harmless
    r2 = select(c2, ledger, 2, o2)
    assert (r2.resumed, r2.previously_selected, r2.newly_selected, r2.cumulative_selected) == (False, 1, 1, 6)
    assert [it["iteration"] for it in json.loads(ledger.read_text())["iterations"]] == [1, 2]
    assert [r["filepath"] for r in rows(o2)] == ["new.png"]


# ---------------------------------------------------------------- 7. concurrent writers

SELECT_AND_REPORT = """
    import json, os, sys, time
    from deft_mine.errors import DeftError
    from deft_mine.tools.select import select
    go = sys.argv[4]
    if go:  # a barrier: say we are ready, then wait for the go file
        open(go + "." + str(os.getpid()), "w").close()
        deadline = time.monotonic() + 30
        while not os.path.exists(go) and time.monotonic() < deadline:
            time.sleep(0.001)
    try:
        result = select(sys.argv[1], sys.argv[2], 1, sys.argv[3])
    except DeftError as exc:
        print(json.dumps({"code": exc.code}))
        sys.exit(2)
    print(json.dumps({"code": None, "resumed": result.resumed, "newly": result.newly_selected}))
"""


@pytest.mark.e2e  # a real second Python process
def test_held_lock_refuses_another_process(tmp_path: Path) -> None:
    cands = write_candidates(tmp_path / CANDIDATES, ["a.png", "b.png"])
    ledger, out = tmp_path / "LEDGER.json", tmp_path / "out.parquet"
    with open(tmp_path / "LEDGER.json.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        started = time.monotonic()
        proc = py(SELECT_AND_REPORT, str(cands), str(ledger), str(out), "")
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 2, stderr
        assert json.loads(stdout) == {"code": "ledger_busy"}
        assert time.monotonic() - started < 30  # refused at once, not after waiting
        assert not ledger.exists() and not out.exists()
        # in this process too: a second open file description cannot take the lock
        refused("ledger_busy", cands, ledger, 1, out)
        assert not ledger.exists() and not out.exists()
    assert select(cands, ledger, 1, out).newly_selected == 2


@pytest.mark.e2e  # a real second Python process
def test_two_processes_selecting_at_once(tmp_path: Path) -> None:
    paths = [f"img/{i}.png" for i in range(3000)]
    paths += paths[:500]  # repeats, so the selection differs from the candidates
    cands = write_candidates(tmp_path / CANDIDATES, paths)
    ledger, go = tmp_path / "LEDGER.json", tmp_path / "go"
    outs = [tmp_path / "out_a.parquet", tmp_path / "out_b.parquet"]
    procs = [py(SELECT_AND_REPORT, str(cands), str(ledger), str(out), str(go)) for out in outs]
    deadline = time.monotonic() + 30
    while len(list(tmp_path.glob("go.*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    go.touch()
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode in (0, 2), stderr
        results.append(json.loads(stdout))

    winners = [r for r in results if r["code"] is None]
    assert all(r["code"] in (None, "ledger_busy") for r in results), results
    assert [r["resumed"] for r in winners].count(False) == 1  # exactly one recorded the iteration
    assert all(r["newly"] == 3000 for r in winners)

    data = json.loads(ledger.read_text())
    assert [it["iteration"] for it in data["iterations"]] == [1]
    chosen = data["iterations"][0]["selected"]
    assert len(chosen) == len(set(chosen)) == 3000
    assert set(data["selected"]) == set(chosen)
    written = [rows(out) for out, r in zip(outs, results) if r["code"] is None]
    assert all(w == written[0] for w in written) and len(written[0]) == 3000
    for out, r in zip(outs, results):
        if r["code"] is not None:
            assert not out.exists()


# ---------------------------------------------------------------- 8. allowed roots

@pytest.mark.parametrize("outside", ["candidates", "ledger", "output", "image_root", "ledger_via_symlink"])
def test_paths_outside_roots_are_refused(tmp_path: Path, outside: str) -> None:
    root, elsewhere = tmp_path / "allowed", tmp_path / "elsewhere"
    root.mkdir()
    elsewhere.mkdir()
    (root / "escape").symlink_to(elsewhere)
    args = {
        "candidates": write_candidates(root / CANDIDATES, ["a.png"]),
        "ledger": root / "LEDGER.json",
        "output": root / "out.parquet",
        "image_root": root / "images",
    }
    if outside == "candidates":
        args["candidates"] = write_candidates(elsewhere / CANDIDATES, ["a.png"])
    elif outside == "ledger_via_symlink":
        args["ledger"] = root / "escape" / "LEDGER.json"
    else:
        args[outside] = elsewhere / Path(args[outside]).name
    field = "ledger" if outside == "ledger_via_symlink" else outside
    before = tree(tmp_path)
    with pytest.raises(DeftError) as info:
        select(args["candidates"], args["ledger"], 1, args["output"], image_root=args["image_root"],
               policy=PathPolicy([root]))
    assert info.value.code == "path_outside_roots"
    assert info.value.details["field"] == field
    assert tree(tmp_path) == before
    assert not list(tmp_path.rglob("*.lock"))


def test_paths_inside_roots_are_accepted(tmp_path: Path) -> None:
    cands = write_candidates(tmp_path / CANDIDATES, ["a.png"])
    result = select(cands, tmp_path / "L.json", 1, tmp_path / "o.parquet", image_root=tmp_path,
                    policy=PathPolicy([tmp_path]))
    assert result.newly_selected == 1


def test_a_refused_select_leaves_nothing_behind(tmp_path):
    """Neither the ledger's folder nor its .lock appear for a call that is refused."""
    good = tmp_path / "c.parquet"
    pq.write_table(pa.table({"filepath": ["a.png"]}), good)
    pq.write_table(pa.table({"path": ["a.png"]}), tmp_path / "nofilepath.parquet")
    ledger = tmp_path / "rounds" / "ledger.json"
    for candidates, iteration, code in ((good, 2, "ledger_iteration_invalid"),
                                        (tmp_path / "nofilepath.parquet", 1, "column_missing"),
                                        (tmp_path / "absent.parquet", 1, "file_not_found")):
        with pytest.raises(DeftError) as exc:
            select(candidates, ledger, iteration, tmp_path / "out.parquet")
        assert exc.value.code == code
        assert not (tmp_path / "rounds").exists() and not (tmp_path / "out.parquet").exists()
