"""The rulebook: mine, preflight and the report decide every shared rule alike, and as a
brute-force reading of the case says (real images, real parquet files, real run folders)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import THUMB_ID, write_embeddings, write_image
from deft_mine import rules
from deft_mine.events import NullEvents
from deft_mine.report.facts import gather, locate
from deft_mine.report.render import findings
from deft_mine.tools.mine import mine
from deft_mine.tools.preflight import preflight
from deft_mine.tools.run import run

SHARED = {"filter_by_label_noop", "pool_exhausted", "target_in_pool"}  # and provenance_unknown, below


@dataclass(frozen=True)
class Case:
    targets: int = 2
    pool: int = 4
    topn: int = 2
    target_label: bool = True
    pool_label: bool = True
    filter_by_label: bool = True
    overlap: int = 0  # targets that are pool rows too
    exclude_targets: bool = False

    def expected(self) -> set[str]:
        """The rules read straight off the case."""
        searched = self.pool - (self.overlap if self.exclude_targets else 0)
        fired = set()
        if self.filter_by_label and not (self.target_label and self.pool_label):
            fired.add("filter_by_label_noop")
        if self.topn * self.targets > searched:
            fired.add("pool_exhausted")
        if self.overlap:
            fired.add("target_in_pool")
        return fired


CASES = {
    "quiet": Case(),
    "topn_times_targets_over_pool": Case(topn=3),
    "topn_over_pool": Case(targets=1, topn=10),
    "exactly_the_pool": Case(topn=2, targets=2, pool=4),
    "pool_without_label": Case(pool_label=False),
    "targets_without_label": Case(target_label=False),
    "neither_labelled_filter_off": Case(target_label=False, pool_label=False, filter_by_label=False),
    "filter_off_labelled": Case(filter_by_label=False),
    "target_in_pool": Case(overlap=1),
    "target_in_pool_excluded": Case(overlap=1, exclude_targets=True, topn=1),
    "excluded_targets_exhaust_the_pool": Case(overlap=2, exclude_targets=True, topn=2, pool=5),
    "all_at_once": Case(pool_label=False, overlap=1, topn=3),
}


def _listings(folder, case: Case):
    paths = [f"imgs/{i}.png" for i in range(case.targets + case.pool)]
    for i, path in enumerate(paths):
        write_image(folder / path, seed=i)
    targets = paths[:case.targets]
    pool = targets[:case.overlap] + paths[case.targets:case.targets + case.pool - case.overlap]
    for name, rows, labelled in (("targets", targets, case.target_label), ("pool", pool, case.pool_label)):
        columns = {"filepath": rows}
        if labelled:
            columns["label"] = ["ab"[i % 2] for i in range(len(rows))]
        pq.write_table(pa.table(columns), folder / f"{name}.parquet")
    return folder / "targets.parquet", folder / "pool.parquet"


@pytest.mark.parametrize("name", CASES)
def test_mine_preflight_and_report_agree_on_every_rule(tmp_path, name):
    case = CASES[name]
    targets, pool = _listings(tmp_path, case)
    overrides = {"model": "thumbnail", "topn": case.topn, "filter_by_label": str(case.filter_by_label).lower(),
                 "exclude_targets": case.exclude_targets}
    predicted = {w.code for w in preflight(targets=targets, source=pool, overrides=overrides).warnings}
    done = run(targets, pool, run_dir=tmp_path / "run", overrides=overrides)
    mined = {w.code for w in done.mine.warnings}
    folder = tmp_path / "run"
    manifest, files, missing = locate(folder)
    reported = {f.code for f in findings(gather(folder, manifest, files, missing, NullEvents()))}
    expected = case.expected()
    assert predicted & SHARED == expected
    assert mined & SHARED == expected
    assert reported & SHARED == expected


def test_each_rule_reads_only_its_facts():
    facts = rules.Facts(topn=3, queries=2, pool=5, mined=4, filter_by_label=True, sides_without_label=("source",),
                        target_in_pool=1, exclude_targets=False)
    assert [r.code for r in rules.rule(facts)] == ["filter_by_label_noop", "pool_exhausted", "target_in_pool"]
    assert rules.rule(rules.Facts(topn=2, queries=2, pool=4)) == []
    # what the tool says after the run, and what preflight predicts
    (after,) = rules.rule(rules.Facts(topn=3, queries=2, pool=5, mined=4))
    (before,) = rules.rule(rules.Facts(topn=3, queries=2, pool=5, predicted=True))
    assert "4 unique images were mined" in after.warning.message and "will be mined" in before.warning.message
    assert after.action.endswith("this run mined 4 unique images.")
    # done as asked: the report has nothing to add to the warning
    (excluded,) = rules.rule(rules.Facts(target_in_pool=2, exclude_targets=True))
    assert excluded.reason is None and excluded.warning.details["excluded"] is True
    assert rules.label_filter(True, []) == "applied" and rules.label_filter(False, ["source"]) == "off"


@pytest.mark.parametrize("recorded", [("target", "source"), ("target",), ("source",), ()])
def test_mine_preflight_and_report_agree_on_provenance(tmp_path, recorded):
    """Embedding parquets with and without our identity (the TAO container writes none), mined
    into a folder the report then reads as the container's (no run.json)."""
    rng = np.random.default_rng(7)
    paths = {}
    for side, rows in (("target", 3), ("source", 8)):
        paths[side] = write_embeddings(tmp_path / f"{side}_embeddings.parquet", rng.normal(size=(rows, 8)),
                                       identity=THUMB_ID if side in recorded else None)
    predicted = {w.code for w in preflight(targets=paths["target"], source=paths["source"]).warnings}
    mined = {w.code for w in mine(paths["source"], paths["target"], tmp_path / "mined.parquet",
                                  overrides={"topn": 2}).warnings}
    manifest, files, missing = locate(tmp_path)
    reported = {f.code for f in findings(gather(tmp_path, manifest, files, missing, NullEvents()))}
    expected = {"provenance_unknown"} if len(recorded) < 2 else set()
    assert predicted & {"provenance_unknown"} == expected
    assert mined & {"provenance_unknown"} == expected
    assert reported & {"provenance_unknown"} == expected
