"""The leakage guard with mode=unique: the whole pool judged before the matching, the leak rows never
claimed, against the same matching with the leaks taken out of the pool by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from test_leaks import THUMB, _leaks, guarded_set  # noqa: F401 - the fixture: targets, a protect listing, a pool of copies
from deft_mine.errors import DeftError
from deft_mine.tools.run import run

UNIQUE = {**THUMB, "mode": "unique", "desired_unique_count": 6}


def _mined(run_dir: str) -> set[str]:
    return set(pq.read_table(Path(run_dir) / "mined.parquet").column("filepath").to_pylist())


def test_a_guarded_unique_run_never_claims_a_leak_and_spends_the_budget_on_the_rest(guarded_set):
    result = run(guarded_set / "targets.parquet", guarded_set / "pool.parquet", run_dir=guarded_set / "r",
                 protect=[str(guarded_set / "val.parquet")], overrides={**UNIQUE, "leak_similarity": 0.9})
    found = _leaks(result.run_dir)
    assert found["pool/copy_t0.png"] == ("sets/t0.png", "identical_bytes")
    assert found["pool/copy_v0.png"] == ("sets/v0.png", "identical_bytes")
    assert found["pool/reenc_v0.png"][1] == "similar" and result.leaks.scope == "pool"
    mined = _mined(result.run_dir)
    assert len(mined) == 6 and not mined & set(found)  # ten rows, four leaks: the budget takes the other six
    # the reference: the same matching on a pool without the leak rows
    clean = [p for p in pq.read_table(guarded_set / "pool.parquet").column("filepath").to_pylist() if p not in found]
    pq.write_table(pa.table({"filepath": clean}), guarded_set / "clean.parquet")
    reference = run(guarded_set / "targets.parquet", guarded_set / "clean.parquet", run_dir=guarded_set / "ref",
                    overrides=UNIQUE)
    assert mined == _mined(reference.run_dir)
    summary = json.loads((Path(result.run_dir) / "unique_matching" / "summary.json").read_text())
    assert summary["leaks_excluded"] == len(found)
    assert "leaks_excluded" in [w.code for w in result.warnings]
    assert "## Leakage Guard" in (Path(result.run_dir) / "Mining_Report.md").read_text()


def test_a_default_unique_run_leaves_a_targets_byte_copy_out_as_it_claims(guarded_set):
    """No guard asked: the matcher checks each candidate's bytes against the targets' as it claims (no
    pass over the whole pool), so the copy of t0 is never claimed and is listed in unique_matching/."""
    result = run(guarded_set / "targets.parquet", guarded_set / "pool.parquet", run_dir=guarded_set / "r",
                 overrides={**UNIQUE, "desired_unique_count": 10})
    listed = Path(result.run_dir) / "unique_matching" / "leaks.parquet"
    assert result.leaks is not None and result.leaks.leaks_parquet == str(listed) and result.leaks.scope == "mined"
    rows = pq.read_table(listed).to_pylist()
    assert [(r["filepath"], r["protected_filepath"], r["kind"]) for r in rows] == [
        ("pool/copy_t0.png", "sets/t0.png", "identical_bytes")]
    assert "pool/copy_t0.png" not in _mined(result.run_dir) and len(_mined(result.run_dir)) == 9
    assert not (Path(result.run_dir) / "leaks.parquet").exists()  # no whole-pool scan ran
    assert "protected_parquet" in (Path(result.run_dir) / "unique_matching" / "unique_matching_spec.yaml").read_text()
    assert "leaks_excluded" in [w.code for w in result.warnings]


def test_a_default_unique_run_without_copies_says_nothing_of_leaks(guarded_set):
    paths = [p for p in pq.read_table(guarded_set / "pool.parquet").column("filepath").to_pylist() if "copy" not in p]
    pq.write_table(pa.table({"filepath": paths}), guarded_set / "clean.parquet")
    result = run(guarded_set / "targets.parquet", guarded_set / "clean.parquet", run_dir=guarded_set / "r",
                 overrides={**UNIQUE, "desired_unique_count": 4})
    assert result.leaks is None and not (Path(result.run_dir) / "unique_matching" / "leaks.parquet").exists()
    assert "leaks" not in json.loads((Path(result.run_dir) / "run.json").read_text())


def test_leak_scope_mined_is_refused_with_mode_unique(guarded_set):
    with pytest.raises(DeftError) as exc:
        run(guarded_set / "targets.parquet", guarded_set / "pool.parquet", run_dir=guarded_set / "r",
            overrides={**UNIQUE, "leak_scope": "mined"})
    assert (exc.value.code, exc.value.details["field"]) == ("spec_invalid", "leak_scope")
