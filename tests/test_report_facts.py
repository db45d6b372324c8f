"""report.facts: a run folder's files found by their columns, run.json read into a RunManifest (or
one rebuilt from the files), the facts that cannot be stated listed, the mined paths checked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import THUMB_ID, write_embeddings, write_image
from deft_mine.errors import DeftError
from deft_mine.events import NullEvents, RecordingEvents
from deft_mine.report.facts import ReportFacts, gather, locate
from deft_mine.schemas.manifest import InputFacts, Inputs, RunManifest
from deft_mine.schemas.results import EncoderIdentity


def facts_of(folder: Path) -> ReportFacts:
    manifest, files, missing = locate(folder)
    return gather(folder, manifest, files, missing, NullEvents())


SUMMARY = "queries: 3\nneighbours_requested: 6\nduplicates_removed: 1\nmined: 4\n"


def tao_folder(folder: Path, summary: str | None = SUMMARY, target_id: dict | None = THUMB_ID,
               source_id: dict | None = THUMB_ID, labels: bool = True) -> Path:
    """What the TAO container leaves: embeddings, a mined parquet, a summary; no run.json. The file
    names give no hint of their role: only their columns and sizes do."""
    rng = np.random.default_rng(0)
    write_embeddings(folder / "a.parquet", rng.normal(size=(3, 8)), labels=["x", "y", "x"] if labels else None,
                     identity=target_id)
    write_embeddings(folder / "b.parquet", rng.normal(size=(9, 8)), labels=["x", "y", "z"] * 3 if labels else None,
                     identity=source_id)
    pq.write_table(pa.table({"filepath": [f"img_b_{i}.png" for i in (0, 1, 4, 5)]}), folder / "c.parquet")
    if summary is not None:
        (folder / "mining_summary.txt").write_text(summary)
    return folder


def test_files_are_recognised_by_their_columns(tmp_path):
    tao_folder(tmp_path)
    pq.write_table(pa.table({"target_filepath": ["img_a_0.png"], "target_row": [0], "rank": [0],
                             "filepath": ["img_b_0.png"], "score": [0.5], "kept": [True]}), tmp_path / "d.parquet")
    manifest, files, missing = locate(tmp_path)
    assert manifest is None and missing == ["run.json"]
    names = {role: (p.name if p else None) for role, p in files.items()}
    # the smaller embedding file is the targets, the larger the pool
    assert names["target_embeddings"] == "a.parquet" and names["source_embeddings"] == "b.parquet"
    assert names["mined"] == "c.parquet" and names["pairs"] == "d.parquet"
    assert names["summary"] == "mining_summary.txt" and names["mining_spec"] is None


def test_a_manifest_is_rebuilt_from_the_files(tmp_path):
    tao_folder(tmp_path, summary="num_queries = 3\nneighbors_requested: 6\nduplicates: 1\nunique_mined: 4\n"
                                 "kept: 5\ndropped: 1\n")
    facts = facts_of(tmp_path)
    m = facts.manifest
    assert isinstance(m, RunManifest) and not facts.has_manifest
    # another tool's spellings are read as ours
    assert m.mining.summary == {"queries": 3, "neighbours_requested": 6, "duplicates_removed": 1, "mined": 4,
                                "kept_pairs": 5, "dropped_pairs": 1}
    assert m.mining.label_filter == "applied" and m.mining.filter_by_label is True
    assert (m.embeddings.target.rows, m.embeddings.source.rows, m.embeddings.target.embedding_dim) == (3, 9, 8)
    assert m.inputs.targets.has_label is True and m.inputs.targets.columns == ["filepath", "label"]
    identity = EncoderIdentity.model_validate(THUMB_ID)
    assert m.encoder.target == identity and m.encoder.match is True
    assert m.encoder.fingerprint == identity.fingerprint == facts.fingerprints["source"]
    # labels: targets per label, mined images per pool label (img_b_0,1,4,5 -> x, y, y, z)
    assert m.mining.labels is not None and m.mining.labels.targets == {"x": 2, "y": 1}
    assert facts.target_labels == {"x": 2, "y": 1} and facts.mined_labels == {"x": 1, "y": 2, "z": 1}
    assert m.mining_spec == {"source_parquet": str(tmp_path / "b.parquet"),
                             "target_parquet": str(tmp_path / "a.parquet"),
                             "output_parquet": str(tmp_path / "c.parquet")}


def test_the_facts_a_folder_cannot_show_are_listed(tmp_path):
    tao_folder(tmp_path, summary=None, source_id=None)
    facts = facts_of(tmp_path)
    missing = facts.missing_facts
    assert missing[0] == "run.json"
    for fact in ("encoder.source (no identity in b.parquet)", "mining_spec", "embedding_spec", "mining_summary.txt",
                 "status", "inputs.targets.path", "embeddings.skipped", "mined_pairs.parquet"):
        assert fact in missing
    assert "encoder.target (no identity in a.parquet)" not in missing
    assert facts.manifest.encoder.match is None and facts.manifest.mining.summary == {}


def test_a_summary_without_counts_is_a_missing_fact(tmp_path):
    tao_folder(tmp_path, summary="written by: some tool\n")
    assert "mining summary counts" in facts_of(tmp_path).missing_facts


def test_an_identity_another_tool_wrote_counts_as_none(tmp_path):
    tao_folder(tmp_path, target_id={"name": "their-encoder", "version": 2})
    facts = facts_of(tmp_path)
    assert facts.manifest.encoder.target is None and facts.manifest.encoder.match is None
    assert facts.fingerprints["target"] is None and facts.fingerprints["source"] is not None
    assert "encoder.target (no identity in a.parquet)" in facts.missing_facts


@pytest.mark.parametrize("text, why", [("{not json", "unreadable"), ("[1, 2]", "not an object"),
                                       ('{"status": 3, "inputs": []}', "not a run manifest")])
def test_an_unreadable_run_json_is_a_missing_fact_not_a_crash(tmp_path, text, why):
    tao_folder(tmp_path)
    (tmp_path / "run.json").write_text(text)
    facts = facts_of(tmp_path)
    assert not facts.has_manifest and facts.missing_facts[0] == f"run.json ({why})"
    assert facts.manifest.mining.summary["queries"] == 3  # rebuilt from the files instead


def test_run_json_is_read_into_a_typed_manifest(tmp_path):
    inputs = tmp_path / "inputs"
    manifest = RunManifest(status="finished", run_dir=str(tmp_path),
                           inputs=Inputs(targets=InputFacts(path=str(inputs / "t.parquet"), rows=3)),
                           mining_spec={"output_parquet": "/elsewhere/picked.parquet"})
    (tmp_path / "run.json").write_text(manifest.dump())
    pq.write_table(pa.table({"filepath": ["x.png"]}), tmp_path / "picked.parquet")
    facts = facts_of(tmp_path)
    assert facts.has_manifest and facts.manifest == RunManifest.model_validate_json(manifest.dump())
    assert facts.files["mined"] == "picked.parquet"  # the recorded name, looked for in this folder
    assert facts.missing_facts == ["mined_pairs.parquet"]
    assert facts.image_roots == {"targets": str(inputs), "source": str(tmp_path)}
    assert facts.mined is not None and facts.mined.root_guessed is False


def test_mined_paths_are_checked_on_disk_and_for_odd_encodings(tmp_path):
    write_image(tmp_path / "imgs" / "ok.png", seed=1)
    paths = ["imgs/ok.png", "imgs/gone.png", "C:\\imgs\\a.png", "imgs/tab\there.png", "imgs/ok.png", None]
    pq.write_table(pa.table({"filepath": paths}), tmp_path / "mined.parquet")
    events = RecordingEvents()
    manifest, files, missing = locate(tmp_path)
    check = gather(tmp_path, manifest, files, missing, events).mined
    assert check is not None and check.rows == 6 and check.duplicates == 1
    assert check.checked == 5 and check.missing == 3
    assert check.missing_examples == ["imgs/gone.png", "C:\\imgs\\a.png", "imgs/tab\there.png"]
    assert check.encoding == {"non_utf8": 0, "control": 1, "backslash": 1}
    assert check.encoding_examples["control"] == ["imgs/tab\there.png"]
    assert check.root == str(tmp_path) and check.root_guessed
    assert events.logs == []  # nothing was unreadable


def test_non_utf8_paths_are_counted(tmp_path):
    pq.write_table(pa.table({"filepath": pa.array([b"imgs/\xff.png", b"imgs/ok.png"], pa.binary())}),
                   tmp_path / "mined.parquet")
    check = facts_of(tmp_path).mined
    assert check is not None and check.encoding["non_utf8"] == 1 and check.missing == 2


def test_an_unreadable_pairs_file_is_a_missing_fact(tmp_path):
    tao_folder(tmp_path)
    pq.write_table(pa.table({"target_filepath": ["a"], "rank": [0], "filepath": ["b"]}), tmp_path / "pairs.parquet")
    events = RecordingEvents()
    manifest, files, missing = locate(tmp_path)
    facts = gather(tmp_path, manifest, files, missing, events)
    assert facts.pairs is None and "mined_pairs statistics" in facts.missing_facts
    assert any("mined_pairs statistics unavailable" in message for _, message in events.logs)


def test_a_folder_without_a_run_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("nothing here")
    for folder in (tmp_path, tmp_path / "absent"):
        with pytest.raises(DeftError) as exc:
            locate(folder)
        assert exc.value.code == "report_no_run"
