"""The TAO container's mining semantics, against a brute-force reference written from its public
source (nvidia_tao_ds/mining/tmm/scripts/nearest_neighbors.py, main and release/7.1.0): labels
compare as `str(label).strip().upper()`, a null matches nothing (our documented choice: the
container's `str(None)` makes two nulls agree by accident), and `distance_threshold` drops a pair
the label filter kept when `0 <= threshold < distance`, in the metric's own distance."""

from __future__ import annotations

import numpy as np
import pytest

from deft_mine.errors import DeftError
from deft_mine.schemas.specs import MiningSpec
from test_mining import reference, run_mine, unique_in_order


def label_key(label: object) -> str | None:
    return None if label is None else str(label).strip().upper()


def container(targets, pool, topn: int, metric: str, t_labels=None, p_labels=None, threshold: float = -1.0):
    """The container's loop: the topn pairs, the label filter first, then the threshold; unique
    source rows in order of first appearance. Returns (mined rows, dropped, beyond threshold)."""
    order, keys = reference(targets, pool, topn, metric)
    mined, dropped, beyond = [], 0, 0
    for q, rows in enumerate(order):
        for row in rows:
            if t_labels is not None:
                ours = label_key(t_labels[q])
                if ours is None or ours != label_key(p_labels[row]):
                    dropped += 1
                    continue
            distance = 1.0 + keys[q, row] if metric == "cosine" else keys[q, row]  # keys: -similarity for cosine
            if 0 <= threshold < distance:
                beyond += 1
                continue
            mined.append(row)
    return unique_in_order(mined), dropped, beyond


def between_distances(targets, pool, topn: int, metric: str, quantile: float) -> float:
    """A threshold halfway between two neighbouring pair distances (never on a tie: float noise
    cannot move a pair across it)."""
    order, keys = reference(targets, pool, topn, metric)
    found = np.unique([1.0 + keys[q, r] if metric == "cosine" else keys[q, r] for q, rows in enumerate(order)
                       for r in rows])
    i = int(quantile * (len(found) - 1))
    return float((found[i] + found[i + 1]) / 2)


SPELLINGS = ["missing", "MISSING", " Missing ", "pass", "PASS ", "short", None, "Short\t", 3, "3 "]


@pytest.mark.parametrize("seed", range(4))
def test_the_label_rule_is_the_containers_over_case_padding_nulls_and_types(tmp_path, seed):
    rng = np.random.default_rng(seed)
    targets, pool = rng.standard_normal((7, 6)), rng.standard_normal((50, 6))
    # a column holds one type: the int 3 is written as its text, "3" (ints against text: test_mining)
    t_labels, p_labels = ([None if (x := SPELLINGS[i]) is None else str(x) for i in rng.integers(0, len(SPELLINGS), n)]
                          for n in (7, 50))
    result, table, _ = run_mine(tmp_path, targets, pool, topn=6, filter_by_label="yes",
                                target_labels=t_labels, pool_labels=p_labels)
    rows, dropped, _ = container(targets, pool, 6, "cosine", t_labels, p_labels)
    assert table.column("filepath").to_pylist() == [f"img_s_{r}.png" for r in rows]
    assert (result.summary["kept_pairs"], result.summary["dropped_pairs"]) == (42 - dropped, dropped)
    # the null-labelled pairs among the dropped: counted and warned (the container would match two nulls)
    order, _ = reference(targets, pool, 6, "cosine")
    nulls = sum(t_labels[q] is None or p_labels[r] is None for q, rows_q in enumerate(order) for r in rows_q)
    warned = [w for w in result.warnings if w.code == "label_null"]
    assert [w.details["pairs"] for w in warned] == ([nulls] if nulls else [])


def test_the_deft_loops_spellings_mine_what_the_container_mines(tmp_path):
    """The routing step upper-cases target labels, ChangeNet CSVs keep `PASS` and lower-case
    defects: the container keeps every same-class pair (before, deft-mine kept none)."""
    targets = np.eye(3)
    pool = np.repeat(np.eye(3), 4, axis=0) + 0.01
    result, table, _ = run_mine(tmp_path, targets, pool, topn=4, filter_by_label=True,
                                target_labels=["MISSING", "pass", "MISSING"],
                                pool_labels=["missing"] * 4 + ["PASS "] * 4 + ["missing"] * 4)
    assert (result.summary["kept_pairs"], result.summary["dropped_pairs"], table.num_rows) == (12, 0, 12)


@pytest.mark.parametrize("metric", ["cosine", "euclidean", "manhattan"])
@pytest.mark.parametrize("labels", [False, True])
def test_distance_threshold_is_the_containers_under_every_metric(tmp_path, metric, labels):
    rng = np.random.default_rng(11)
    targets, pool = rng.standard_normal((6, 5)), rng.standard_normal((40, 5))
    t_labels = ["a", "B", "a ", None, "b", "A"] if labels else None
    p_labels = [["a", "b", None, "A", "c"][i % 5] for i in range(40)] if labels else None
    threshold = between_distances(targets, pool, 5, metric, 0.4)
    result, table, _ = run_mine(tmp_path, targets, pool, topn=5, knn_metric=metric, distance_threshold=threshold,
                                filter_by_label=labels, target_labels=t_labels, pool_labels=p_labels)
    rows, dropped, beyond = container(targets, pool, 5, metric, t_labels, p_labels, threshold)
    assert table.column("filepath").to_pylist() == [f"img_s_{r}.png" for r in rows]
    assert result.summary["below_floor"] == beyond and result.summary.get("dropped_pairs", 0) == dropped
    text = (tmp_path / "out" / "mining_summary.txt").read_text()
    kept = 30 - dropped
    assert (f"  After distance filtering: kept {kept - beyond}/{kept} pairs, dropped {beyond} exceeding "
            f"threshold {threshold:.4f}\n") in text
    # the same floor given our way mines the same
    ours = {"min_similarity": 1 - threshold} if metric == "cosine" else {"max_distance": threshold}
    (tmp_path / "ours").mkdir(), (tmp_path / "both").mkdir()
    again, same, _ = run_mine(tmp_path / "ours", targets, pool, topn=5, knn_metric=metric, filter_by_label=labels,
                              target_labels=t_labels, pool_labels=p_labels, **ours)
    assert same.equals(table) and again.summary == result.summary
    # and both at once, when they agree
    both, _, _ = run_mine(tmp_path / "both", targets, pool, topn=5, knn_metric=metric, filter_by_label=labels,
                          target_labels=t_labels, pool_labels=p_labels, distance_threshold=threshold, **ours)
    assert both.summary == result.summary


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_two_floors_that_disagree_are_refused_naming_both(metric):
    ours = {"min_similarity": 0.5} if metric == "cosine" else {"max_distance": 1.5}
    with pytest.raises(DeftError) as refused:
        MiningSpec(knn_metric=metric, distance_threshold=0.3, **ours)
    assert refused.value.code == "spec_invalid" and refused.value.details["field"] == "distance_threshold"
    assert "distance_threshold=0.3" in refused.value.message and next(iter(ours)) in refused.value.message


@pytest.mark.parametrize(("metric", "threshold", "says"), [("cosine", 2.5, "more than 2"), ("euclidean", -0.5, "negative"),
                                                            ("cosine", -3.0, "negative")])
def test_a_threshold_that_filters_nothing_warns_as_the_container_does(tmp_path, metric, threshold, says):
    rng = np.random.default_rng(3)
    targets, pool = rng.standard_normal((3, 4)), rng.standard_normal((10, 4))
    result, table, _ = run_mine(tmp_path, targets, pool, topn=2, knn_metric=metric, distance_threshold=threshold)
    (warning,) = [w for w in result.warnings if w.code == "distance_threshold_inert"]
    assert says in warning.message and warning.fields == ["distance_threshold"]
    assert table.num_rows == len(container(targets, pool, 2, metric)[0])  # nothing dropped


def test_off_is_minus_one_and_warns_nothing(tmp_path):
    rng = np.random.default_rng(4)
    result, _, _ = run_mine(tmp_path, rng.standard_normal((3, 4)), rng.standard_normal((10, 4)), topn=2,
                            distance_threshold=-1)
    assert not [w for w in result.warnings if w.code == "distance_threshold_inert"]
    assert "below_floor" not in result.summary


@pytest.mark.parametrize(("word", "on"), [("true", True), ("TRUE", True), ("1", True), ("Yes", True),
                                          ("false", False), ("0", False), ("NO", False)])
def test_filter_by_label_takes_the_containers_words(word, on):
    assert MiningSpec(filter_by_label=word).filter_by_label is on


@pytest.mark.parametrize("word", ["on", "off", "y", "2", ""])
def test_any_other_filter_by_label_word_is_refused_with_the_choices(word):
    with pytest.raises(Exception) as refused:  # the container would silently take it as off
        MiningSpec(filter_by_label=word)
    assert "true, 1, yes" in str(refused.value) and "false, 0, no" in str(refused.value)


def test_a_run_counts_spellings_as_one_class_shows_them_as_written_and_says_so(image_set):
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from deft_mine.tools.run import run

    pq.write_table(pa.table({"filepath": ["imgs/0.png", "imgs/1.png"], "label": ["MISSING", "pass"]}),
                   image_set / "targets.parquet")
    pq.write_table(pa.table({"filepath": [f"imgs/{i}.png" for i in range(2, 6)],
                             "label": ["missing", "PASS ", " Missing", "pass"]}), image_set / "pool.parquet")
    result = run(image_set / "targets.parquet", image_set / "pool.parquet", run_dir=image_set / "r",
                 overrides={"model": "thumbnail", "topn": 4, "filter_by_label": True})
    assert (result.mine.summary["kept_pairs"], result.mine.summary["dropped_pairs"], result.mined) == (4, 4, 4)
    labels = json.loads((image_set / "r" / "run.json").read_text())["mining"]["labels"]
    assert labels["targets"] == {"MISSING": 1, "pass": 1} and labels["mined"] == {"MISSING": 2, "pass": 2}
    # each class is named by its first spelling (targets first), and every spelling is listed
    merged = labels["merged"]
    assert merged["MISSING"][0] == "MISSING" and sorted(merged["MISSING"]) == [" Missing", "MISSING", "missing"]
    assert merged["pass"] == ["pass", "PASS "]
    report = (image_set / "r" / "Mining_Report.md").read_text()
    spelled = ", ".join(f"`{s}`" for s in merged["MISSING"])
    assert (f"so these spellings were counted as one class each: {spelled} → `MISSING`; "
            "`pass`, `PASS ` → `pass`.") in report
    summary = (image_set / "r" / "mining_summary.txt").read_text()
    assert "  After label mismatch filtering: kept 4/8 pairs, dropped 4 mismatches\n" in summary


def test_distance_threshold_is_taken_by_every_face(tmp_path, capsys):
    from deft_mine.schemas.specs import load_spec
    from deft_mine.task import main as task_main

    spec_file = tmp_path / "mining_spec.yaml"
    spec_file.write_text("topn: 3\nknn_metric: euclidean\ndistance_threshold: 2.5\nfilter_by_label: \"yes\"\n")
    from_file = load_spec(MiningSpec, spec_file)
    from_words = load_spec(MiningSpec, None, ["topn=3", "knn_metric=euclidean", "distance_threshold=2.5",
                                              "filter_by_label=yes"])
    from_mcp = load_spec(MiningSpec, None, {"topn": 3, "knn_metric": "euclidean", "distance_threshold": 2.5,
                                            "filter_by_label": "YES"})
    assert from_file == from_words == from_mcp and from_file.floor == 2.5 and from_file.filter_by_label
    assert task_main(["tmm", "nearest_neighbors", "-e", str(spec_file), "--cfg=job"]) == 0
    assert "distance_threshold: 2.5" in capsys.readouterr().out


def test_a_floor_that_drops_every_label_kept_pair_is_warned_in_the_key_given(tmp_path):
    """The near pool image has the wrong label; the one with the right label is beyond the threshold."""
    result, table, _ = run_mine(tmp_path, np.array([[1.0, 0.0]]), np.array([[1.0, 0.0], [0.0, 1.0]]), topn=2,
                                filter_by_label=True, distance_threshold=0.1, target_labels=["a"],
                                pool_labels=["b", "A"])
    (gone,) = [w for w in result.warnings if w.code == "floor_removed_all"]
    assert table.num_rows == 0 and gone.fields == ["distance_threshold"]
    assert gone.details["pairs"] == 1 and gone.details["best_score"] == pytest.approx(1.0)  # a cosine distance
    assert (result.summary["kept_pairs"], result.summary["dropped_pairs"], result.summary["below_floor"]) == (1, 1, 1)
