"""The demo: make the sample set, run the whole workflow with the thumbnail encoder, score it."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from deft_mine.engine.synthetic import make_sample_set
from deft_mine.events import Events
from deft_mine.report.provenance import Invocation
from deft_mine.schemas.results import RunResult
from deft_mine.tools.run import run


def demo(output_dir: str | Path, events: Events | None = None,
         invocation: Invocation | None = None) -> tuple[RunResult, float]:
    """Run the demo; returns the run and the share of mined images whose defect class matches
    the target that mined them best."""
    output_dir = Path(output_dir).absolute()
    targets, pool = make_sample_set(output_dir / "sample_data")
    result = run(targets, pool, output_dir=output_dir, overrides={"model": "thumbnail", "topn": 5},
                 events=events, invocation=invocation)
    return result, label_agreement(Path(result.mined_parquet), targets, pool)


def label_agreement(mined: Path, targets: Path, pool: Path) -> float:
    target_label = dict(zip(*pq.read_table(targets, columns=["filepath", "label"]).to_pydict().values()))
    pool_label = dict(zip(*pq.read_table(pool, columns=["filepath", "label"]).to_pydict().values()))
    rows = pq.read_table(mined, columns=["filepath", "best_target"]).to_pylist()
    if not rows:
        return 0.0
    return sum(pool_label[r["filepath"]] == target_label[r["best_target"]] for r in rows) / len(rows)
