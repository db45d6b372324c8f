"""MiningSummary owns mining_summary.txt (write, read back, both container releases' spellings);
the mining stages over typed data: the mode's candidate count, its selection, the label key."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from deft_mine.engine.mining import count_labels, label_keys, label_spellings
from deft_mine.engine.selection import Candidates, NearestNeighbours, mode_of
from deft_mine.schemas.artifacts import MiningSummary
from deft_mine.schemas.specs import LabelFilter, Metric, MiningSpec


def test_a_default_runs_summary_opens_with_the_containers_block_then_ours_label_filter_last():
    summary = MiningSummary(queries=2, topn=3, neighbours_requested=6, pool=10, pairs=6, duplicates_removed=2,
                            mined=4, target_in_pool=0, label_filter=LabelFilter.off, saved_to="/r/mined.parquet")
    assert summary.text() == (
        "Summary:\n  Target queries: 2\n  Similar items per query: 3\n  Total pairs: 6\n  Total candidates: 6\n"
        "  Duplicates removed: 2\n  Unique items saved: 4\n  Results saved to: /r/mined.parquet\n"
        "queries: 2\ntopn: 3\nneighbours_requested: 6\npool: 10\npairs: 6\n"
        "duplicates_removed: 2\nmined: 4\ntarget_in_pool: 0\nlabel_filter: off\n")
    assert list(summary.as_dict()) == ["queries", "topn", "neighbours_requested", "pool", "pairs",
                                       "duplicates_removed", "mined", "target_in_pool"]


# The container's mining_summary.txt, as its two releases write it (facts from
# nvidia_tao_ds/mining/tmm/scripts/nearest_neighbors.py on main and on release/7.1.0).
MAIN = ("Summary:\n  Target queries: 3\n  Similar items per query: 4\n  Total pairs: 12\n"
        "  After label mismatch filtering: kept 5/12 pairs, dropped 7 mismatches\n"
        "  After distance filtering: kept 4/5 pairs, dropped 1 exceeding threshold 0.2500\n"
        "  Total candidates: 4\n  Duplicates removed: 1\n  Unique items saved: 3\n"
        "  Results saved to: /r/mined.parquet\n")
RELEASE_7_1 = ("Summary:\n  Target queries: 3\n  Similar items per query: 4\n  Total candidates: 5\n"
               "  Duplicates removed: 2\n  Unique items saved: 3\n  Results saved to: /r/mined.parquet\n"
               "Label filtering: kept 5/12 pairs, dropped 7 mismatches\n\n")


def test_both_container_releases_summaries_are_read_into_our_counts():
    main = MiningSummary.parse(MAIN)
    assert (main.queries, main.topn, main.pairs, main.kept_pairs, main.dropped_pairs, main.below_floor,
            main.duplicates_removed, main.mined) == (3, 4, 12, 5, 7, 1, 1, 3)
    assert (main.label_filter, main.distance_threshold, main.saved_to) == (LabelFilter.applied, 0.25, "/r/mined.parquet")
    assert main.extra == {}  # every line understood, none kept as a stranger's count
    old = MiningSummary.parse(RELEASE_7_1)
    assert (old.queries, old.topn, old.pairs, old.kept_pairs, old.dropped_pairs, old.duplicates_removed,
            old.mined, old.label_filter, old.distance_threshold) == (3, 4, 12, 5, 7, 2, 3, LabelFilter.applied, None)
    unfiltered = MiningSummary.parse(RELEASE_7_1.split("Label")[0])
    assert (unfiltered.label_filter, unfiltered.kept_pairs, unfiltered.mined) == (None, None, 3)


def test_ours_reads_as_the_containers_current_summary_line_for_line():
    ours = MiningSummary(queries=3, topn=4, neighbours_requested=12, pool=20, pairs=12, kept_pairs=5, dropped_pairs=7,
                         below_floor=1, duplicates_removed=1, mined=3, label_filter=LabelFilter.applied,
                         distance_threshold=0.25, saved_to="/r/mined.parquet")
    assert ours.text().startswith(MAIN)  # a script written against the container reads ours unchanged
    assert MiningSummary.parse(ours.text()) == ours  # and every count of ours is read back


def test_every_count_round_trips_through_the_file():
    full = MiningSummary(queries=5, topn=4, neighbours_requested=20, pool=99, pairs=18, kept_pairs=11,
                         dropped_pairs=7, below_floor=2, duplicates_removed=3, mined=8, target_in_pool=1,
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


def test_a_strangers_lines_are_kept_under_their_names():
    read = MiningSummary.parse("Target queries: 3\nwritten by: some tool\nlabel_filter: maybe\nits_own_count: 5\n")
    assert read.queries == 3 and read.label_filter is None and read.extra == {"its_own_count": 5}
    # a count the docker backend fills in afterwards comes after the file's own
    read.mined = 3
    assert list(read.as_dict()) == ["its_own_count", "queries", "mined"]


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
    # the container's str(label).strip().upper(), Python's own rule: ß upper-cases to SS
    assert label_keys(pa.chunked_array([["3", " x\t", "straße"]])).to_pylist() == ["3", "X", "STRASSE"]
    assert count_labels([3, 3, None]) == count_labels(["3", "3", None]) == {"(null)": 1, "3": 2}
    # counted by key, shown as first written; a given name per key wins
    assert count_labels(["missing", "MISSING ", None, "pass"]) == {"(null)": 1, "missing": 2, "pass": 1}
    assert count_labels(["missing", "MISSING"], {"MISSING": "MISSING"}) == {"MISSING": 2}
    assert label_spellings(["missing", " Missing", "missing", None, "pass"]) == {"MISSING": ["missing", " Missing"],
                                                                                 "PASS": ["pass"]}
