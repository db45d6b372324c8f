"""RunFolder: run.json says "running" before any work, then exactly one way out is written:
"finished" (with the artifacts), "failed" or "interrupted" (with the error); an exit Python does
not describe leaves "running"; stray temp files of the run go."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deft_mine.errors import DeftError
from deft_mine.events import Cancelled
from deft_mine.schemas.specs import EmbeddingSpec, MiningSpec
from deft_mine.tools.run import RUNS_FOLDER, RunFolder

SPECS = (EmbeddingSpec(model="thumbnail"), MiningSpec(topn=2))


def _status(folder: RunFolder) -> dict:
    return json.loads((folder.path / "run.json").read_text())


def test_running_first_then_finished_with_its_artifacts(tmp_path: Path) -> None:
    folder = RunFolder.make(None, tmp_path / "run", history=False)
    assert folder.candidates == folder.mined == tmp_path / "run" / "mined.parquet"
    with folder.running(*SPECS, backend="local") as manifest:
        assert _status(folder)["status"] == "running" and _status(folder)["backend"] == "local"
        folder.embeddings["targets"].write_bytes(b"x")
        manifest.warnings = []
        folder.finish()
    done = _status(folder)
    assert done["status"] == "finished" and "finished_at" in done and "error" not in done
    assert set(done["artifacts"]) == {"embedding_spec.yaml", "mining_spec.yaml", "run.json", "target_embeddings.parquet"}


@pytest.mark.parametrize("exc, status, code", [
    (DeftError("no_readable_images", "none"), "failed", "no_readable_images"),
    (RuntimeError("bug"), "failed", "internal_error"),
    (KeyboardInterrupt(), "interrupted", "interrupted"),
    (Cancelled("cancelled by the client"), "interrupted", "cancelled"),
])
def test_every_way_out_is_written(tmp_path: Path, exc: BaseException, status: str, code: str) -> None:
    folder = RunFolder.make(tmp_path, None, history=True)
    assert folder.path.parent == tmp_path / RUNS_FOLDER and folder.candidates.name == "mined_candidates.parquet"
    with pytest.raises(type(exc)):
        with folder.running(*SPECS):
            (folder.path / ".mined.parquet.123.tmp").write_bytes(b"half")
            raise exc
    stopped = _status(folder)
    assert (stopped["status"], stopped["error"]["code"]) == (status, code)
    assert not list(folder.path.glob(".*.tmp"))


def test_an_exit_python_does_not_describe_leaves_running(tmp_path: Path) -> None:
    folder = RunFolder.make(None, tmp_path / "run", history=False)
    with pytest.raises(SystemExit):
        with folder.running(*SPECS):
            raise SystemExit(3)
    assert _status(folder)["status"] == "running"


def test_a_non_empty_run_dir_is_refused(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "old.txt").write_text("")
    with pytest.raises(DeftError) as exc:
        RunFolder.make(None, tmp_path / "run", history=False)
    assert exc.value.code == "run_dir_exists"
