"""Faults from outside the inputs: signals, SIGKILL, a full disk, two writers at once.

After each: the process ends with its documented exit code and no traceback, run.json says
what happened, no file in the run folder looks complete but is not (outputs are written to a
temp name and renamed), and the ledger and the embedding store are unchanged or consistent.
Real processes, real files, a real (small) tmpfs; nothing is mocked.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import write_image
from deft_mine.engine import store as stores
from deft_mine.errors import DeftError
from deft_mine.events import NullEvents
from deft_mine.tools.report import report
from deft_mine.tools.run import run
from mcp_helpers import write_slow_image

BIN = Path(sys.executable).parent
# What a finished run leaves; none of these names may exist in a folder unless the file is whole.
FINISHED_LOOKING = {"mined.parquet", "mined_candidates.parquet", "target_embeddings.parquet",
                    "source_embeddings.parquet", "mining_summary.txt", "Mining_Report.md"}
SLOW = 40  # slow pool images: embedding the pool takes seconds, so a signal lands mid-pool


def slow_set(folder: Path, slow: int = SLOW) -> tuple[Path, Path]:
    """Two quick targets; a pool of two quick images, then `slow` slow-to-decode ones."""
    for i in range(4):
        write_image(folder / "imgs" / f"{i}.png", seed=i)
    for i in range(slow):
        write_slow_image(folder / "slow" / f"{i}.png")
    targets, pool = folder / "targets.parquet", folder / "pool.parquet"
    pq.write_table(pa.table({"filepath": ["imgs/0.png", "imgs/1.png"], "label": ["a", "b"]}), targets)
    pq.write_table(pa.table({"filepath": ["imgs/2.png", "imgs/3.png", *(f"slow/{i}.png" for i in range(slow))],
                             "label": ["a", "b", *(["a"] * slow)]}), pool)
    return targets, pool


def run_command(targets: Path, pool: Path, store: Path, *where: str) -> list[str]:
    return [str(BIN / "deft-mine"), "run", "--targets", str(targets), "--source", str(pool), *where,
            "--store", str(store), "model=thumbnail", "batch_size=2", "topn=2"]


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the process ended ({proc.returncode}) before {what}: {proc.communicate()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no {what} within {timeout:.0f}s")
        time.sleep(0.01)


def manifest_of(folder: Path) -> dict:
    return json.loads((folder / "run.json").read_text())


def assert_nothing_half_done(folder: Path, whole: set[str]) -> None:
    """Only the named finished-looking files exist (each readable), and no temp file is left."""
    names = {p.name for p in folder.iterdir()}
    assert names & FINISHED_LOOKING == whole, names
    for name in whole:
        if name.endswith(".parquet"):
            pq.read_table(folder / name)  # whole, or this raises
    assert not [n for n in names if n.startswith(".")], names


# ------------------------------------------------------------------ SIGINT and SIGTERM mid-run

@pytest.mark.e2e
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_mid_run_stops_it_cleanly(tmp_path: Path, sig: signal.Signals, code: int) -> None:
    targets, pool = slow_set(tmp_path)
    folder = tmp_path / "run"
    proc = subprocess.Popen(run_command(targets, pool, tmp_path / "store", "--run-dir", str(folder)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # the targets are embedded, so the process is inside the pool's (slow) embedding
    wait_for(lambda: (folder / "target_embeddings.parquet").exists(), proc, "target embeddings")
    assert manifest_of(folder)["status"] == "running"
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)

    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr and f"interrupted by {sig.name}" in stderr
    manifest = manifest_of(folder)
    assert manifest["status"] == "interrupted" and manifest["error"]["code"] == "interrupted"
    assert_nothing_half_done(folder, {"target_embeddings.parquet"})
    assert str(folder) not in stdout  # the run folder is printed only when it is finished


@pytest.mark.e2e
def test_sigterm_stops_the_container_entrypoint_cleanly(tmp_path: Path) -> None:
    """`docker stop` sends SIGTERM to deft-mine-task, PID 1 in the container, which ignores the
    signal unless it handles it: handled, the work unwinds and the task exits 143 at once."""
    _, pool = slow_set(tmp_path)
    output = tmp_path / "out" / "pool_emb.parquet"
    proc = subprocess.Popen([str(BIN / "deft-mine-task"), "embedding", "image_embeddings", f"input_parquet={pool}",
                             f"output_parquet={output}", "model=thumbnail", "batch_size=2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "DEFT_MINE_STORE": str(tmp_path / "store")})
    wait_for(lambda: any((tmp_path / "store").rglob("*.parquet")), proc, "a stored batch")
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "interrupted by SIGTERM" in stderr and "Traceback" not in stderr
    assert not output.exists() and not any(output.parent.glob(".*.tmp"))


# ------------------------------------------------------------------ SIGKILL, then the same command

@pytest.mark.e2e
def test_sigkill_mid_run_then_the_same_command_resumes_with_the_store(tmp_path: Path) -> None:
    targets, pool = slow_set(tmp_path)
    store, out = tmp_path / "store", tmp_path / "out"
    proc = subprocess.Popen(run_command(targets, pool, store, "--output-dir", str(out)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stored = lambda: sum(info.vectors for info in stores.describe(store)) if store.exists() else 0  # noqa: E731
    wait_for(lambda: stored() >= 2 + 6, proc, "pool vectors in the store")  # the targets, then 6+ pool rows
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = stored()
    assert 8 <= before < 2 + 2 + SLOW  # killed part-way through the pool

    (killed,) = (out / "mining_results").iterdir()
    assert manifest_of(killed)["status"] == "running"  # never finished-looking
    names = {p.name for p in killed.iterdir()}
    assert names & FINISHED_LOOKING == {"target_embeddings.parquet"}, names  # temp names may remain
    assert all(n.startswith(".") and n.endswith(".tmp") for n in names - {
        "run.json", "embedding_spec.yaml", "mining_spec.yaml", "target_listing.parquet", "source_listing.parquet",
        "target_embeddings.parquet"}), names

    again = subprocess.run(run_command(targets, pool, store, "--output-dir", str(out)) + ["--json"],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    result = json.loads(again.stdout)
    folder = Path(result["run_dir"])
    assert folder != killed
    source = result["source_embed"]
    assert source["reused"] >= before - 2 and source["reused"] + source["embedded"] == 2 + SLOW
    assert manifest_of(folder)["status"] == "finished"
    assert manifest_of(folder)["embeddings"]["source"]["reused"] == source["reused"]
    assert (folder / "Mining_Report.md").is_file() and manifest_of(killed)["status"] == "running"


# ------------------------------------------------------------------ a full disk

@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[callable]:
    """Mounts a tmpfs of a given size (unmounted after the test); skips where mounting is not allowed."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        where = tmp_path / f"disk_{len(mounted)}"
        where.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode})")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", str(where)], check=False)


def listing(folder: Path, n: int) -> Path:
    for i in range(n):
        write_image(folder / "imgs" / f"{i}.png", seed=100 + i)
    path = folder / "listing.parquet"
    pq.write_table(pa.table({"filepath": [f"imgs/{i}.png" for i in range(n)]}), path)
    return path


def embed_command(source: Path, output: Path, store: Path, *extra: str) -> list[str]:
    return [str(BIN / "deft-mine"), "embed", "--json", "--store", str(store), "model=thumbnail", "batch_size=8",
            f"input_parquet={source}", f"output_parquet={output}", *extra]


@pytest.mark.e2e
def test_a_full_disk_during_embedding_is_disk_full_and_the_store_stays_good(tmp_path: Path, small_disk) -> None:
    disk = small_disk("128k")  # 200 vectors of 768 floats need ~600 kB
    source, store = listing(tmp_path, 200), tmp_path / "store"
    proc = subprocess.run(embed_command(source, disk / "e.parquet", store), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert json.loads(proc.stdout)["code"] == "disk_full" and "Traceback" not in proc.stderr
    assert list(disk.iterdir()) == []  # no output under its name, no temp file either

    # the store is whole: a roomy second embed reuses it and writes what a storeless embed writes
    again = subprocess.run(embed_command(source, tmp_path / "e.parquet", store), capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr
    result = json.loads(again.stdout)
    assert result["reused"] > 0 and result["reused"] + result["embedded"] == 200
    fresh = subprocess.run(embed_command(source, tmp_path / "fresh.parquet", store, "--no-store"),
                           capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 0, fresh.stderr
    assert pq.read_table(tmp_path / "e.parquet").equals(pq.read_table(tmp_path / "fresh.parquet"))


class FillDiskAtReport(NullEvents):
    """The moment the report stage starts, fill the disk `where` is on (everything before it fit)."""

    def __init__(self, where: Path) -> None:
        self.where = where

    def progress(self, stage: str, done: int, total: int | None, note: str = "") -> None:
        if stage == "report" and done == 0 and not self.where.exists():
            with open(self.where, "wb") as filler:
                try:
                    while True:
                        filler.write(b"\0" * 65536)
                        filler.flush()
                except OSError:
                    pass


@pytest.mark.e2e  # in process, but `mount` is a process
def test_a_full_disk_during_the_report_leaves_a_finished_run_without_a_report(
        image_set: Path, tmp_path: Path, small_disk) -> None:
    disk = small_disk("4m")
    folder, filler = disk / "run", disk / "filler"
    with pytest.raises(DeftError) as caught:
        run(targets=image_set / "targets.parquet", source=image_set / "pool.parquet", run_dir=folder,
            store=str(tmp_path / "store"), overrides=["model=thumbnail", "topn=2"],
            events=FillDiskAtReport(filler))
    error = caught.value
    assert filler.stat().st_size > 0
    assert error.code == "disk_full" and "only its report is missing" in error.message
    assert f"deft-mine report {folder}" in (error.fix or "")
    # every mining output is whole and run.json (written before the report) says so; no report
    manifest = manifest_of(folder)
    assert manifest["status"] == "finished" and "Mining_Report.md" not in manifest["artifacts"]
    assert_nothing_half_done(folder, FINISHED_LOOKING - {"Mining_Report.md", "mined_candidates.parquet"})
    for name in manifest["artifacts"]:
        assert (folder / name).is_file(), name

    filler.unlink()  # space again: the report the error pointed at is written from the folder
    written = report(folder, events=NullEvents())
    assert Path(written.report_path) == folder / "Mining_Report.md" and written.verdict != "failed"


# ------------------------------------------------------------------ two writers at once

@pytest.mark.e2e
def test_two_runs_into_one_output_dir_at_once_get_two_folders(image_set: Path) -> None:
    out = image_set / "out"
    command = [str(BIN / "deft-mine"), "run", "--targets", str(image_set / "targets.parquet"),
               "--source", str(image_set / "pool.parquet"), "--output-dir", str(out), "model=thumbnail", "-q"]
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    folders = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
        folders.append(Path(stdout.strip().splitlines()[-1]))
    assert folders[0] != folders[1] and set(folders) == set((out / "mining_results").iterdir())
    for folder in folders:
        manifest = manifest_of(folder)
        assert manifest["status"] == "finished" and manifest["run_dir"] == str(folder)
        assert (folder / "Mining_Report.md").is_file()
        assert_nothing_half_done(folder, FINISHED_LOOKING - {"mined_candidates.parquet"})


@pytest.mark.e2e
def test_two_selects_on_one_ledger_at_once(tmp_path: Path) -> None:
    """Two agents both select "iteration 1" from different candidates at the same moment: the
    ledger's lock lets exactly one record it; the other is refused with a code (ledger_busy if
    it came while the first held the lock, ledger_hash_mismatch if after: iteration 1 is then
    another file's) and writes nothing. Recorded as iteration 2 it then selects only what
    iteration 1 did not."""
    shared = [f"img/{i}.png" for i in range(2000)]
    candidates = {}
    for name, extra in (("a", "a"), ("b", "b")):
        candidates[name] = tmp_path / name / "mined_candidates.parquet"
        candidates[name].parent.mkdir()
        pq.write_table(pa.table({"filepath": shared + [f"img/{extra}{i}.png" for i in range(500)]}),
                       candidates[name])
    ledger = tmp_path / "ledger.json"
    out = {name: tmp_path / name / "mined.parquet" for name in candidates}

    def select(name: str, iteration: int) -> subprocess.Popen:
        return subprocess.Popen([str(BIN / "deft-mine"), "select", "--json", "--candidates", str(candidates[name]),
                                 "--ledger", str(ledger), "--iteration", str(iteration), "--output", str(out[name]),
                                 "--image-root", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)

    procs = {name: select(name, 1) for name in candidates}
    ended = {name: (proc.wait(timeout=120), *proc.communicate()) for name, proc in procs.items()}
    for rc, stdout, stderr in ended.values():
        assert rc in (0, 2) and "Traceback" not in stderr, stderr
    (winner,) = [name for name, (rc, _, _) in ended.items() if rc == 0]
    (loser,) = set(candidates) - {winner}
    refusal = json.loads(ended[loser][1])
    assert refusal["code"] in ("ledger_busy", "ledger_hash_mismatch"), refusal
    assert not out[loser].exists()
    book = json.loads(ledger.read_text())
    assert [it["iteration"] for it in book["iterations"]] == [1]
    assert book["iterations"][0]["files"]["candidates"]["path"] == str(candidates[winner])
    assert pq.read_table(out[winner]).num_rows == 2500

    second = select(loser, 2)
    stdout, stderr = second.communicate(timeout=120)
    assert second.returncode == 0, stderr
    assert json.loads(stdout)["newly_selected"] == 500  # only its own 500: the shared ones were taken
    book = json.loads(ledger.read_text())
    chosen = [p for it in book["iterations"] for p in it["selected"]]
    assert len(chosen) == len(set(chosen)) == 3000 and set(book["selected"]) == set(chosen)
    assert not list(tmp_path.glob(".*.tmp")) and not list(tmp_path.glob("*/.*.tmp"))
