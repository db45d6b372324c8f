"""The DEFT loop's floor-stage files and its best-target floor rule (issue 22, part 3): the rule
against a brute-force reference, and mined_raw.parquet / knn_summary.csv /
cosine_filter_summary.json in a run folder carrying the loop's counts."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from conftest import THUMB_ID, write_embeddings
from deft_mine.engine.knn import l2_normalise
from deft_mine.engine.mining import finish, merge, mine_files, pool_dim, prepare, search_range
from deft_mine.errors import DeftError
from deft_mine.events import NullEvents
from deft_mine.schemas.specs import MiningSpec, load_spec
from deft_mine.tools.run import run

LABELS = ["a", "b", "c"]


def case(seed: int, targets: int = 8, pool: int = 70, dim: int = 5):
    """Small-integer vectors from few prototypes (exact ties among targets and pool rows), labels
    with nulls and spellings that differ only in case and spaces."""
    rng = np.random.default_rng(seed)
    base = rng.integers(-3, 4, size=(10, dim)).astype(np.float32)
    base[np.abs(base).sum(axis=1) == 0, 0] = 1
    p = base[rng.integers(0, len(base), pool)]
    t = base[rng.integers(0, len(base), targets)] + rng.integers(0, 2, size=(targets, dim)).astype(np.float32)
    t[np.abs(t).sum(axis=1) == 0, 0] = 1
    spell = [" a", "A", "b", "B ", "c"]
    p_labels = [None if r < 0.08 else spell[int(r * 100) % 5] for r in rng.random(pool)]
    t_labels = [LABELS[int(r * 100) % 3] for r in rng.random(targets)]
    return t, p, t_labels, p_labels


def key(label):
    return None if label is None else str(label).strip().upper()


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """One pair's similarity as the k-NN scores it: float32 unit vectors, products summed in float64."""
    x, y = l2_normalise(a[None])[0].astype(np.float64), l2_normalise(b[None])[0].astype(np.float64)
    return float((x * y).sum())


def reference(t, p, topn, t_labels, p_labels, filtered: bool, floor: float):
    """Brute force of the loop's rule: per target its topn pool rows (ties to the lower row), the
    label post-filter; the raw candidates are those pairs' files in order of first appearance;
    each raw candidate's best similarity over all targets (its label's, filtered), the first
    target on a tie; kept when it reaches the floor. Returns (raw, best, matched, label-kept pairs)."""
    sims = np.array([[cosine(t[q], p[j]) for j in range(len(p))] for q in range(len(t))])
    agree = []
    for q in range(len(t)):
        order = sorted(range(len(p)), key=lambda j: (-sims[q, j], j))[:topn]
        agree += [(q, j) for j in order if not filtered or (key(p_labels[j]) is not None
                                                            and key(p_labels[j]) == key(t_labels[q]))]
    first: dict[str, int] = {}
    for _, j in agree:
        first.setdefault(f"img_s_{j}.png", j)
    best, matched = {}, {}
    for path, j in first.items():
        allowed = [q for q in range(len(t)) if not filtered or key(t_labels[q]) == key(p_labels[j])]
        q = max(allowed, key=lambda q: (sims[q, j], -q))  # the best, the first target among equals
        best[path], matched[path] = sims[q, j], f"img_t_{q}.png"
    return list(first), best, matched, agree


def floor_between(values) -> float:
    """A floor halfway between two distinct values near the middle: no value sits on it."""
    values = np.unique(np.round(list(values), 9))
    middle = len(values) // 2
    return float((values[middle - 1] + values[middle]) / 2) if len(values) > 1 else float(values[0]) - 0.1


def write_case(tmp_path, t, p, t_labels, p_labels):
    tmp_path.mkdir(parents=True, exist_ok=True)
    return (write_embeddings(tmp_path / "s.parquet", p, identity=THUMB_ID, labels=p_labels),
            write_embeddings(tmp_path / "t.parquet", t, identity=THUMB_ID, labels=t_labels))


# ----------------------------------------------------------------------------- the best-target rule

@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("labels", ["off", "post_filter", "per_label"])
def test_best_target_matches_brute_force(tmp_path, seed, labels):
    t, p, t_labels, p_labels = case(seed)
    filtered = labels != "off"
    if labels == "per_label":  # the reference searches post-filter: per_label only where they agree
        p_labels = [LABELS[j % 3] for j in range(len(p))]
    raw, best, matched, agree = reference(t, p, 4, t_labels, p_labels, filtered, floor=0.0)
    floor = floor_between(best.values())
    sp, tp = write_case(tmp_path, t, p, t_labels, p_labels)
    spec = MiningSpec(topn=4 if labels != "per_label" else 70, knn_metric="cosine", filter_by_label=filtered,
                      label_mode="post_filter" if labels != "per_label" else "per_label",
                      min_similarity=floor, floor_rule="best_target", block_rows=9)
    if labels == "per_label":  # every pool row of the target's label: the post-filter of the whole pool
        raw, best, matched, agree = reference(t, p, 70, t_labels, p_labels, True, floor)
    done = mine_files(sp, tp, spec, NullEvents())
    kept = [path for path in raw if best[path] >= floor]
    assert done.floor.raw.column("filepath").to_pylist() == raw
    audit = done.floor.audit.to_pylist()
    assert [(r["filepath"], r["matched_target_filepath"], r["kept"]) for r in audit] == \
        [(path, matched[path], best[path] >= floor) for path in raw]
    assert [r["max_cosine_similarity"] for r in audit] == [best[path] for path in raw]  # exact, not approximate
    mined = done.mined
    assert mined.column_names[0] == "filepath" and mined.column("filepath").to_pylist() == kept
    assert mined.column("max_cosine_similarity").to_pylist() == [best[path] for path in kept]
    assert mined.column("matched_target_filepath").to_pylist() == [matched[path] for path in kept]
    # the counts: a pair goes with its image
    s = done.summary
    kept_pairs = [(q, j) for q, j in agree if f"img_s_{j}.png" in kept]
    assert s.below_floor == len(agree) - len(kept_pairs)
    assert s.duplicates_removed == len(kept_pairs) - len(kept) and s.mined == len(kept)
    assert s.targets_without_neighbours == len({q for q in range(len(t))} - {q for q, _ in kept_pairs})
    assert sum(done.pairs.column("kept").to_pylist()) == len(kept_pairs)
    # it keeps every image the pair rule keeps, and may keep more
    pair = mine_files(sp, tp, MiningSpec(**{**spec.model_dump(), "floor_rule": "pair"}), NullEvents())
    assert set(pair.mined.column("filepath").to_pylist()) <= set(kept)
    assert "max_cosine_similarity" not in pair.mined.column_names and pair.floor.audit is None


def test_best_target_can_keep_an_image_the_pair_rule_drops(tmp_path):
    """Pool row x is target 0's nearest, with a low score; target 1 lies close to x but finds a
    nearer row: the pair (0, x) falls short, yet x's best target (1) reaches the floor. Target 2
    repeats target 1: a tie goes to the first target in file order."""
    t = np.array([[1, 0, 0], [0, 1, 0], [0, 2, 0]], np.float32)
    p = np.array([[0.2, 1, 0], [0, 1, 0.01], [0, 0, 1]], np.float32)  # x = row 0
    sp, tp = write_case(tmp_path, t, p, None, None)
    spec = MiningSpec(topn=1, min_similarity=0.9)
    pair = mine_files(sp, tp, spec, NullEvents())
    best = mine_files(sp, tp, MiningSpec(**{**spec.model_dump(), "floor_rule": "best_target"}), NullEvents())
    assert pair.mined.column("filepath").to_pylist() == ["img_s_1.png"]
    assert best.mined.column("filepath").to_pylist() == ["img_s_0.png", "img_s_1.png"]
    assert best.mined.column("matched_target_filepath").to_pylist() == ["img_t_1.png", "img_t_1.png"]
    assert (best.summary.below_floor, best.summary.targets_without_neighbours) == (0, 0)
    assert (pair.floor.raw.num_rows, pair.floor.kept, best.floor.kept) == (2, 1, 2)


def test_shards_merged_give_the_same_best_target_outcome(tmp_path):
    """What the ray backend relies on: its merged search goes through the same finish."""
    t, p, t_labels, p_labels = case(5)
    sp, tp = write_case(tmp_path, t, p, t_labels, p_labels)
    spec = MiningSpec(topn=5, filter_by_label=True, min_similarity=0.5, floor_rule="best_target", block_rows=6)
    prep = prepare(sp, tp, spec)
    whole = finish(prep, search_range(spec, sp, tp, prep.queries, prep.drop))
    prep2, dim = prepare(sp, tp, spec), pool_dim(sp, "embedding")
    parts = [search_range(spec, sp, tp, prep2.queries, prep2.drop[a:b], a, b, dim if a else None)
             for a, b in ((0, 18), (18, 42), (42, 70))]
    split = finish(prep2, merge(parts, spec.topn))
    assert whole.mined.equals(split.mined) and whole.floor.audit.equals(split.floor.audit)
    assert whole.summary == split.summary


def test_best_target_needs_cosine():
    with pytest.raises(DeftError) as caught:
        load_spec(MiningSpec, None, ["floor_rule=best_target", "knn_metric=euclidean", "max_distance=2"])
    assert caught.value.code == "spec_invalid" and caught.value.details["field"] == "floor_rule"
    assert "knn_metric=cosine" in caught.value.fix
    with pytest.raises(DeftError) as caught:
        load_spec(MiningSpec, None, ["floor_rule=nearest"])
    assert caught.value.details["field"] == "floor_rule"


# ----------------------------------------------------------------------------- the run folder's files

def knn_summary(folder) -> dict:
    table = pacsv.read_csv(folder / "knn_summary.csv")
    assert table.column_names == ["candidate_count", "kept_count", "rejected_count", "similarity_threshold"]
    assert table.num_rows == 1  # exactly one data row
    return table.to_pylist()[0]


def check_loop_counts(folder, after_floor: str) -> dict:
    """The loop's checks on a run folder: candidate_count = kept + rejected = unique rows of
    mined_raw.parquet, kept_count = rows of the after-floor file, a numeric threshold."""
    row = knn_summary(folder)
    raw = pq.read_table(folder / "mined_raw.parquet").column("filepath").to_pylist()
    assert row["candidate_count"] == row["kept_count"] + row["rejected_count"] == len(set(raw)) == len(raw)
    assert row["kept_count"] == pq.read_table(folder / after_floor).num_rows
    assert isinstance(row["similarity_threshold"], (int, float))  # pyarrow writes 0.0 as 0
    return row


@pytest.mark.parametrize("rule", ["pair", "best_target"])
def test_a_run_with_a_floor_writes_the_loops_files(image_set, rule):
    folder = image_set / "r"
    result = run(image_set / "targets.parquet", image_set / "pool.parquet", run_dir=folder,
                 overrides={"model": "thumbnail", "topn": 3, "filter_by_label": True, "min_similarity": 0.0,
                            "floor_rule": rule})
    row = check_loop_counts(folder, "mined.parquet")
    assert row["similarity_threshold"] == 0.0 and row["kept_count"] == result.mined
    mined = pq.read_table(folder / "mined.parquet")
    assert set(mined.column("filepath").to_pylist()) <= set(
        pq.read_table(folder / "mined_raw.parquet").column("filepath").to_pylist())
    audit_path = folder / "cosine_filter_summary.json"
    assert audit_path.exists() == (rule == "best_target")
    text = (folder / "Mining_Report.md").read_text()
    assert f"Similarity floor (`floor_rule` = {rule})" in text
    manifest = json.loads((folder / "run.json").read_text())
    assert {"mined_raw.parquet", "knn_summary.csv"} <= set(manifest["artifacts"])
    if rule == "best_target":
        audit = json.loads(audit_path.read_text())
        assert list(audit) == ["metric", "min_similarity", "input_rows", "kept_rows", "dropped_rows",
                               "similarity_min", "similarity_max", "similarity_mean", "output", "rows"]
        assert (audit["metric"], audit["min_similarity"], audit["output"]) == (
            "cosine", 0.0, str(folder / "mined.parquet"))
        assert (audit["input_rows"], audit["kept_rows"], audit["dropped_rows"]) == (
            row["candidate_count"], row["kept_count"], row["rejected_count"])
        sims = [r["max_cosine_similarity"] for r in audit["rows"]]
        assert audit["similarity_max"] == max(sims) and audit["similarity_min"] == min(sims)
        assert [r["filepath"] for r in audit["rows"] if r["kept"]] == mined.column("filepath").to_pylist()
        assert mined.column_names[-2:] == ["max_cosine_similarity", "matched_target_filepath"]
        assert "floor_rule=best_target" in text


def test_with_history_kept_count_is_the_candidates_file(image_set):
    folder = image_set / "r"
    run(image_set / "targets.parquet", image_set / "pool.parquet", run_dir=folder, history=image_set / "ledger.json",
        overrides={"model": "thumbnail", "topn": 3, "min_similarity": -0.5, "floor_rule": "best_target"})
    check_loop_counts(folder, "mined_candidates.parquet")


def test_a_distance_floor_is_written_as_the_metrics_distance(image_set):
    folder = image_set / "r"
    run(image_set / "targets.parquet", image_set / "pool.parquet", run_dir=folder,
        overrides={"model": "thumbnail", "topn": 2, "knn_metric": "euclidean", "distance_threshold": 12.5})
    assert check_loop_counts(folder, "mined.parquet")["similarity_threshold"] == 12.5
    assert not (folder / "cosine_filter_summary.json").exists()


def test_a_cosine_distance_threshold_is_written_as_a_similarity(image_set):
    folder = image_set / "r"
    run(image_set / "targets.parquet", image_set / "pool.parquet", run_dir=folder,
        overrides={"model": "thumbnail", "topn": 2, "distance_threshold": 0.75})
    assert check_loop_counts(folder, "mined.parquet")["similarity_threshold"] == 0.25


def test_without_a_floor_no_floor_stage_files(image_set):
    folder = image_set / "r"
    run(image_set / "targets.parquet", image_set / "pool.parquet", run_dir=folder,
        overrides={"model": "thumbnail", "topn": 2, "floor_rule": "best_target"})
    assert not any((folder / name).exists() for name in
                   ("mined_raw.parquet", "knn_summary.csv", "cosine_filter_summary.json"))
    assert "floor_rule" not in (folder / "Mining_Report.md").read_text()
