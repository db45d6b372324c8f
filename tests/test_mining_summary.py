"""MiningSummary owns mining_summary.txt (write, read back, both container releases' spellings);
the mining stages over typed data: the mode's candidate count, its selection, the label key."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from deft_mine.engine.mining import count_labels, label_keys
from deft_mine.engine.selection import Candidates, NearestNeighbours, mode_of
from deft_mine.schemas.artifacts import MiningSummary
from deft_mine.schemas.specs import LabelFilter, Metric, MiningSpec


def test_a_default_runs_summary_is_written_in_its_fixed_order_label_filter_last():
    summary = MiningSummary(queries=2, topn=3, neighbours_requested=6, pool=10, pairs=6, duplicates_removed=2,
                            mined=4, target_in_pool=0, label_filter=LabelFilter.off)
    assert summary.text() == ("queries: 2\ntopn: 3\nneighbours_requested: 6\npool: 10\npairs: 6\n"
                              "duplicates_removed: 2\nmined: 4\ntarget_in_pool: 0\nlabel_filter: off\n")
    assert list(summary.as_dict()) == ["queries", "topn", "neighbours_requested", "pool", "pairs",
                                       "duplicates_removed", "mined", "target_in_pool"]


def test_every_count_round_trips_through_the_file():
    full = MiningSummary(queries=5, topn=4, neighbours_requested=20, pool=99, pairs=18, below_floor=2,
                         kept_pairs=11, dropped_pairs=5, duplicates_removed=3, mined=8, target_in_pool=1,
                         targets_without_neighbours=1, duplicate_paths=7, zero_vectors=2,
                         label_filter=LabelFilter.applied)
    back = MiningSummary.parse(full.text())
    assert back == full and back.as_dict() == full.as_dict() and list(back.as_dict()) == list(full.as_dict())
    assert back.text() == full.text()


def test_the_older_releases_spellings_are_read_as_ours():
    read = MiningSummary.parse("num_queries = 3\nneighbors_requested: 6\nduplicates: 1\nunique_mined: 4\n"
                               "kept: 5\ndropped: 1\n")
    assert (read.queries, read.neighbours_requested, read.duplicates_removed, read.mined) == (3, 6, 1, 4)
    assert (read.kept_pairs, read.dropped_pairs, read.label_filter) == (5, 1, None)
    # a file's own order is kept (the report's table lists the counts as the file did)
    assert list(read.as_dict()) == ["queries", "neighbours_requested", "duplicates_removed", "mined",
                                    "kept_pairs", "dropped_pairs"]


def test_the_containers_own_lines_are_read_without_losing_a_count():
    text = ("Target queries: 3\nSimilar items per query: 2\nTotal pairs: 6\n"
            "After label mismatch filtering: 5\nTotal candidates: 5\nDuplicates removed: 1\n"
            "Unique items saved: 4\nwritten by: some tool\nlabel_filter: maybe\n")
    read = MiningSummary.parse(text)
    assert read.duplicates_removed == 1 and read.label_filter is None and read.queries is None
    assert read.extra == {"target_queries": 3, "similar_items_per_query": 2, "total_pairs": 6,
                          "after_label_mismatch_filtering": 5, "total_candidates": 5, "unique_items_saved": 4}
    assert list(read.as_dict())[:3] == ["target_queries", "similar_items_per_query", "total_pairs"]
    # a count the docker backend fills in afterwards comes after the file's own
    read.queries = 3
    assert list(read.as_dict())[-1] == "queries"


def test_run_json_counts_become_a_summary_and_back():
    counts = {"queries": 2, "pairs": 4, "mined": 3, "someone_elses": 9}
    summary = MiningSummary.of(counts, "noop")
    assert summary.label_filter is LabelFilter.noop and summary.pairs == 4 and summary.extra == {"someone_elses": 9}
    assert summary.as_dict() == counts and list(summary.as_dict()) == list(counts)


def test_the_mode_chooses_the_candidate_count_and_selects_first_appearances():
    spec = MiningSpec(topn=3, knn_metric="euclidean")
    mode = mode_of(spec)
    assert isinstance(mode, NearestNeighbours) and mode.candidates == 3
    paths = np.array([["a", "b", None], ["b", "c", "a"]], dtype=object)
    found = Candidates(target_paths=["t0", "t1"], rows=np.array([[0, 1, -1], [1, 2, 0]]),
                       scores=np.array([[0.5, 0.9, 0.0], [0.2, 0.4, 0.7]]), paths=paths,
                       source_labels=None, target_labels=None)
    keep = found.found & np.array([[True, True, True], [True, False, True]])
    mined = mode.select(found, keep)
    assert mined.column("filepath").to_pylist() == ["a", "b"]  # target order, then rank; c not kept
    assert mined.column("score").to_pylist() == [0.5, 0.2]  # the nearest (lowest distance) any target gave
    assert mined.column("best_target").to_pylist() == ["t0", "t1"]
    assert mined.column("hits").to_pylist() == [2, 2]
    cosine = NearestNeighbours(candidates=3, metric=Metric.cosine).select(found, keep)
    assert cosine.column("score").to_pylist() == [0.7, 0.9]  # higher is nearer


def test_labels_compare_and_count_by_one_key():
    assert label_keys(pa.array([3, None])).to_pylist() == ["3", None]
    assert label_keys(pa.chunked_array([["3", "x"]])).to_pylist() == ["3", "x"]
    assert count_labels([3, 3, None]) == count_labels(["3", "3", None]) == {"(null)": 1, "3": 2}
