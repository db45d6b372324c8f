"""The mining controls of issue 14: a similarity floor (min_similarity / max_distance) and the
per-label search (label_mode=per_label), each against a brute-force float64 reference on random
cases full of ties, in every metric, through every face that takes a spec key."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import THUMB_ID, write_embeddings
from deft_mine.errors import DeftError
from deft_mine.schemas.specs import MiningSpec, load_spec
from deft_mine.tools.mine import mine

METRICS = ("cosine", "euclidean", "manhattan")
FLOOR_KEY = {"cosine": "min_similarity", "euclidean": "max_distance", "manhattan": "max_distance"}
LABELS = ["a", "b", "c", "d"]


# ----------------------------------------------------------------------------- the reference

def scores_of(targets: np.ndarray, pool: np.ndarray, metric: str) -> np.ndarray:
    """Every (target, pool row) score in float64, on the metric's own scale."""
    t, p = targets.astype(np.float64), pool.astype(np.float64)
    if metric == "cosine":
        t = t / np.linalg.norm(t, axis=1, keepdims=True)
        p = p / np.linalg.norm(p, axis=1, keepdims=True)
        return t @ p.T
    if metric == "euclidean":
        return np.sqrt(((t[:, None, :] - p[None]) ** 2).sum(-1))
    return np.abs(t[:, None, :] - p[None]).sum(-1)


def reference(targets, pool, topn, metric, t_labels=None, p_labels=None, mode="off", floor=None):
    """Brute force: per target (file order) its topn pool rows (ties to the lower row) — among
    the rows of its own label with mode per_label —, then the label post-filter, then the floor on
    the pairs it kept (the TAO container's order); labels compare as str(label).strip().upper().
    Returns (pairs found [(q, j, score)], kept pairs [(q, j)], label-kept pairs beyond the floor)."""
    scores = scores_of(targets, pool, metric)
    keys = -scores if metric == "cosine" else scores
    rows = np.arange(len(pool))
    as_str = [None if x is None else str(x).strip().upper() for x in (p_labels or [])]
    found, kept, below = [], [], 0
    for q in range(len(targets)):
        label = None if t_labels is None or t_labels[q] is None else str(t_labels[q]).strip().upper()
        allowed = rows if mode != "per_label" else np.array([j for j in rows if label is not None
                                                             and as_str[j] == label], dtype=np.int64)
        order = allowed[np.lexsort((allowed, keys[q, allowed]))][:topn] if len(allowed) else []
        for j in order:
            found.append((q, int(j), float(scores[q, j])))
            if mode == "post_filter" and (label is None or as_str[j] != label):
                continue
            if floor is not None and (scores[q, j] < floor if metric == "cosine" else scores[q, j] > floor):
                below += 1
                continue
            kept.append((q, int(j)))
    return found, kept, below


def unique_in_order(items) -> list:
    return list(dict.fromkeys(items))


def tied_case(seed: int, targets: int = 9, pool: int = 80, dim: int = 6):
    """Small-integer vectors drawn from few prototypes: many exact duplicates (ties), in every
    block; labels include nulls and a label no pool row has."""
    rng = np.random.default_rng(seed)
    base = rng.integers(-3, 4, size=(12, dim)).astype(np.float32)
    base[np.abs(base).sum(axis=1) == 0, 0] = 1  # no all-zero prototype (cosine leaves those out)
    p = base[rng.integers(0, len(base), pool)]
    t = base[rng.integers(0, len(base), targets)] + rng.integers(0, 2, size=(targets, dim)).astype(np.float32)
    t[np.abs(t).sum(axis=1) == 0, 0] = 1
    p_labels = [None if r < 0.1 else LABELS[int(r * 10) % 3] for r in rng.random(pool)]  # never "d"
    t_labels = [None if r < 0.1 else LABELS[int(r * 10) % 4] for r in rng.random(targets)]
    return t, p, t_labels, p_labels


def floor_between(found: list, metric: str) -> float:
    """A floor halfway between two distinct scores near the middle, so that no exact score sits
    on it (our float64 rescoring and numpy's may differ in the last bits)."""
    values = np.unique(np.round([s for _, _, s in found], 9))
    middle = len(values) // 2
    return float((values[middle - 1] + values[middle]) / 2) if len(values) > 1 else float(values[0]) - 0.5


def run_mine(tmp_path, targets, pool, t_labels=None, p_labels=None, **over):
    tmp_path.mkdir(parents=True, exist_ok=True)
    t = write_embeddings(tmp_path / "t.parquet", targets, identity=THUMB_ID, labels=t_labels)
    s = write_embeddings(tmp_path / "s.parquet", pool, identity=THUMB_ID, labels=p_labels)
    out = tmp_path / "out" / "mined.parquet"
    return mine(s, t, out, overrides=over), pq.read_table(out)


# ----------------------------------------------------------------------------- exactness

@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("mode", ["post_filter", "per_label"])
def test_both_label_modes_with_a_floor_match_brute_force(tmp_path, metric, seed, mode):
    t, p, t_labels, p_labels = tied_case(seed)
    found, _, _ = reference(t, p, 5, metric, t_labels, p_labels, mode)
    floor = floor_between(found, metric)
    found, kept, below = reference(t, p, 5, metric, t_labels, p_labels, mode, floor)
    result, table = run_mine(tmp_path, t, p, t_labels, p_labels, topn=5, knn_metric=metric,
                             filter_by_label=True, label_mode=mode, block_rows=7, **{FLOOR_KEY[metric]: floor})
    expected = unique_in_order(f"img_s_{j}.png" for _, j in kept)
    assert table.column("filepath").to_pylist() == expected
    s = result.summary
    assert (s["pairs"], s["below_floor"], s["kept_pairs"] - s["below_floor"]) == (len(found), below, len(kept))
    assert s["kept_pairs"] + s["dropped_pairs"] == s["pairs"]  # the label filter's counts, then the floor's
    assert s["mined"] == len(expected) and s["duplicates_removed"] == len(kept) - len(expected)
    if mode == "per_label":
        assert s["dropped_pairs"] == 0  # every pair found already shares its target's label
    alone = [q for q in range(len(t)) if not any(k == q for k, _ in kept)]
    assert s["targets_without_neighbours"] == len(alone)
    codes = [w.code for w in result.warnings]
    assert ("targets_without_neighbours" in codes) == bool(alone)
    if mode == "per_label" and "d" in t_labels:
        (missing,) = [w for w in result.warnings if w.code == "label_missing_in_pool"]
        assert missing.details["labels"] == ["d"]
        assert missing.details["targets_per_label"] == {"d": t_labels.count("d")}


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("seed", [3, 4])
def test_per_label_without_a_floor_matches_brute_force_across_blocks(tmp_path, metric, seed):
    t, p, t_labels, p_labels = tied_case(seed, targets=14, pool=120)
    found, kept, _ = reference(t, p, 6, metric, t_labels, p_labels, "per_label")
    for block_rows in (5, 65536):
        result, table = run_mine(tmp_path / str(block_rows), t, p, t_labels, p_labels, topn=6, knn_metric=metric,
                                 filter_by_label="true", label_mode="per_label", block_rows=block_rows)
        assert table.column("filepath").to_pylist() == unique_in_order(f"img_s_{j}.png" for _, j in kept)
        assert result.summary["pairs"] == len(found) and "below_floor" not in result.summary
    # the per-label search finds at least as many same-label pairs as the post-filter keeps
    _, post_kept, _ = reference(t, p, 6, metric, t_labels, p_labels, "post_filter")
    assert len(kept) >= len(post_kept)


def test_the_pairs_file_holds_only_pairs_found_and_says_which_fell_below_the_floor(tmp_path):
    from deft_mine.engine.mining import mine_files
    from deft_mine.events import NullEvents

    t, p, t_labels, p_labels = tied_case(7)
    tp = write_embeddings(tmp_path / "t.parquet", t, identity=THUMB_ID, labels=t_labels)
    sp = write_embeddings(tmp_path / "s.parquet", p, identity=THUMB_ID, labels=p_labels)
    found, _, _ = reference(t, p, 4, "euclidean", t_labels, p_labels, "per_label")
    floor = floor_between(found, "euclidean")
    found, kept, below = reference(t, p, 4, "euclidean", t_labels, p_labels, "per_label", floor)
    spec = MiningSpec(topn=4, knn_metric="euclidean", filter_by_label=True, label_mode="per_label",
                      max_distance=floor, block_rows=9)
    pairs = mine_files(sp, tp, spec, NullEvents()).pairs
    assert [(r, j) for r, j in zip(pairs.column("target_row").to_pylist(), pairs.column("source_row").to_pylist())] \
        == [(q, j) for q, j, _ in found]
    assert pairs.column("score").to_pylist() == pytest.approx([s for _, _, s in found], abs=1e-9)
    assert sum(pairs.column("below_floor").to_pylist()) == below
    assert [(q, j) for q, j, k in zip(pairs.column("target_row").to_pylist(), pairs.column("source_row").to_pylist(),
                                      pairs.column("kept").to_pylist()) if k] == kept
    # ranks restart per target and count only the pairs found
    ranks: dict[int, list[int]] = {}
    for q, r in zip(pairs.column("target_row").to_pylist(), pairs.column("rank").to_pylist()):
        ranks.setdefault(q, []).append(r)
    assert all(v == list(range(1, len(v) + 1)) for v in ranks.values())


@pytest.mark.parametrize("metric", METRICS)
def test_per_label_shards_merged_in_any_order_equal_one_search(tmp_path, metric):
    """What the ray backend relies on, in per_label mode: row ranges searched apart and merged."""
    from deft_mine.engine.mining import finish, merge, pool_dim, prepare, search_range

    t, p, t_labels, p_labels = tied_case(11, pool=60)
    tp = write_embeddings(tmp_path / "t.parquet", t, labels=t_labels)
    sp = write_embeddings(tmp_path / "s.parquet", p, labels=p_labels)
    spec = MiningSpec(topn=4, knn_metric=metric, filter_by_label=True, label_mode="per_label", block_rows=5)
    prep = prepare(sp, tp, spec)
    whole = search_range(spec, sp, tp, prep.queries, prep.drop, query_groups=prep.query_groups,
                         pool_groups=prep.pool_groups)
    dim = pool_dim(sp, "embedding")
    parts = [search_range(spec, sp, tp, prep.queries, prep.drop[a:b], a, b, dim if a else None,
                          query_groups=prep.query_groups, pool_groups=prep.pool_groups[a:b])
             for a, b in ((0, 15), (15, 40), (40, 60))]
    for other in (merge(parts, spec.topn), merge(parts[::-1], spec.topn)):
        assert np.array_equal(other.state.ids, whole.state.ids)
        assert np.array_equal(other.state.keys, whole.state.keys)
    one, split = finish(prep, whole), finish(prepare(sp, tp, spec), merge(parts, spec.topn))
    assert one.mined.equals(split.mined) and one.pairs.equals(split.pairs) and one.summary == split.summary


# ----------------------------------------------------------------------------- outcomes and warnings

def test_a_floor_that_removes_everything_writes_an_empty_mined_parquet(tmp_path):
    rng = np.random.default_rng(0)
    t, p = rng.standard_normal((3, 8)), rng.standard_normal((20, 8))
    result, table = run_mine(tmp_path, t, p, topn=3, min_similarity=0.999)
    assert table.num_rows == 0 and table.column_names[0] == "filepath" and result.mined == 0
    s = result.summary
    assert (s["pairs"], s["below_floor"], s["targets_without_neighbours"]) == (9, 9, 3)
    codes = [w.code for w in result.warnings]
    assert "floor_removed_all" in codes and "targets_without_neighbours" in codes
    (gone,) = [w for w in result.warnings if w.code == "floor_removed_all"]
    assert gone.details["min_similarity"] == 0.999 and gone.details["best_score"] < 0.999
    text = (tmp_path / "out" / "mining_summary.txt").read_text()
    assert "below_floor: 9\n" in text and "targets_without_neighbours: 3\n" in text


def test_targets_left_without_neighbours_are_listed(tmp_path):
    pool = np.array([[1, 0], [0.9, 0.1], [0, 1]], dtype=np.float32)
    targets = np.array([[1, 0], [-1, -1]], dtype=np.float32)  # the second is far from everything
    result, table = run_mine(tmp_path, targets, pool, topn=2, knn_metric="euclidean", max_distance=0.5)
    assert table.column("filepath").to_pylist() == ["img_s_0.png", "img_s_1.png"]
    (alone,) = [w for w in result.warnings if w.code == "targets_without_neighbours"]
    assert alone.details == {"count": 1, "queries": 2, "targets": ["img_t_1.png"]}
    assert "floor_removed_all" not in [w.code for w in result.warnings]


def test_a_pair_exactly_on_the_floor_is_kept(tmp_path):
    pool = np.array([[3, 4], [6, 8]], dtype=np.float32)
    result, table = run_mine(tmp_path, np.zeros((1, 2)), pool, topn=2, knn_metric="euclidean", max_distance=5)
    assert table.column("filepath").to_pylist() == ["img_s_0.png"] and result.summary["below_floor"] == 1


def test_null_labels_match_nothing_in_per_label_mode_as_in_the_post_filter(tmp_path):
    pool = np.eye(4, dtype=np.float32)
    targets = np.eye(4, dtype=np.float32)[[0, 1]]
    result, table = run_mine(tmp_path, targets, pool, [None, "x"], ["x", None, "x", None], topn=3,
                             filter_by_label=True, label_mode="per_label")
    # the null-labelled target finds nothing; the "x" target finds only the labelled "x" rows
    assert table.column("filepath").to_pylist() == ["img_s_0.png", "img_s_2.png"]
    assert result.summary["targets_without_neighbours"] == 1 and result.summary["pairs"] == 2
    assert "label_missing_in_pool" not in [w.code for w in result.warnings]  # a null is no label


def test_per_label_without_labels_is_the_usual_noop(tmp_path):
    rng = np.random.default_rng(2)
    result, _ = run_mine(tmp_path, rng.standard_normal((2, 4)), rng.standard_normal((9, 4)), None, ["a"] * 9,
                         topn=2, filter_by_label=True, label_mode="per_label")
    assert result.label_filter == "noop" and result.summary["pairs"] == 4
    assert "filter_by_label_noop" in [w.code for w in result.warnings]


def test_defaults_leave_the_summary_and_pairs_as_they_were(tmp_path):
    rng = np.random.default_rng(3)
    result, _ = run_mine(tmp_path, rng.standard_normal((3, 4)), rng.standard_normal((9, 4)), topn=2)
    assert list(result.summary) == ["queries", "topn", "neighbours_requested", "pool", "pairs",
                                    "duplicates_removed", "mined", "target_in_pool"]
    assert result.label_mode == "post_filter" and result.min_similarity is None and result.max_distance is None


# ----------------------------------------------------------------------------- every face

@pytest.mark.parametrize("over, field", [
    ({"max_distance": 1.0}, "max_distance"),  # cosine by default
    ({"min_similarity": 0.5, "knn_metric": "euclidean"}, "min_similarity"),
    ({"min_similarity": "0.5", "knn_metric": "manhattan"}, "min_similarity"),
    ({"min_similarity": 1.5}, "min_similarity"),
    ({"max_distance": -1, "knn_metric": "euclidean"}, "max_distance"),
    ({"label_mode": "per_label"}, "label_mode"),  # without filter_by_label
    ({"label_mode": "nearest", "filter_by_label": True}, "label_mode"),
])
def test_a_control_that_does_not_fit_is_refused_with_the_field_and_a_fix(tmp_path, over, field):
    with pytest.raises(DeftError) as err:
        load_spec(MiningSpec, None, over)
    assert err.value.code == "spec_invalid" and err.value.details["field"] == field and err.value.fix


def test_the_keys_work_alike_through_file_overrides_cli_and_the_tao_entrypoint(tmp_path, capsys):
    from deft_mine.cli import main as cli_main
    from deft_mine.task import main as task_main

    spec_file = tmp_path / "mining_spec.yaml"
    spec_file.write_text("topn: 3\nknn_metric: euclidean\nmax_distance: 2.5\nfilter_by_label: true\n"
                         "label_mode: per_label\n")
    from_file = load_spec(MiningSpec, spec_file)
    from_words = load_spec(MiningSpec, None, ["topn=3", "knn_metric=euclidean", "max_distance=2.5",
                                              "filter_by_label=true", "label_mode=per_label"])
    from_mcp = load_spec(MiningSpec, None, {"topn": 3, "knn_metric": "euclidean", "max_distance": 2.5,
                                            "filter_by_label": True, "label_mode": "per_label"})
    assert from_file == from_words == from_mcp and from_file.floor == 2.5

    t, p, t_labels, p_labels = tied_case(5)
    tp = write_embeddings(tmp_path / "t.parquet", t, identity=THUMB_ID, labels=t_labels)
    sp = write_embeddings(tmp_path / "s.parquet", p, identity=THUMB_ID, labels=p_labels)
    outs, printed = {}, {}
    for face, runner, argv in (
        ("cli", cli_main, ["mine", "-e", str(spec_file), "--json"]),
        ("task", task_main, ["tmm", "nearest_neighbors", "-e", str(spec_file)]),
    ):
        out = tmp_path / face / "mined.parquet"
        assert runner([*argv, f"source_parquet={sp}", f"target_parquet={tp}", f"output_parquet={out}"]) == 0
        outs[face] = out
        if face == "cli":
            printed = json.loads(capsys.readouterr().out)
    assert printed["label_mode"] == "per_label" and printed["max_distance"] == 2.5
    assert "below_floor" in printed["summary"]
    tool = mine(sp, tp, tmp_path / "tool" / "mined.parquet", overrides=from_mcp.model_dump(
        include={"topn", "knn_metric", "max_distance", "filter_by_label", "label_mode"}))
    assert tool.summary == printed["summary"]
    for out in outs.values():
        assert pq.read_table(out).equals(pq.read_table(tmp_path / "tool" / "mined.parquet"))
        tool_out = tmp_path / "tool" / "mined.parquet"  # the summary names its own output (Results saved to)
        assert (out.parent / "mining_summary.txt").read_text().replace(str(out), "OUT") == \
            (tool_out.parent / "mining_summary.txt").read_text().replace(str(tool_out), "OUT")
    # the TAO entrypoint's --cfg=job prints the resolved keys
    assert task_main(["tmm", "nearest_neighbors", "-e", str(spec_file), "--cfg=job", "min_similarity=null"]) == 0
    job = capsys.readouterr().out
    assert "max_distance: 2.5" in job and "label_mode: per_label" in job

    capsys.readouterr()
    assert cli_main(["mine", "-e", str(spec_file), "--json", "knn_metric=cosine", f"source_parquet={sp}",
                     f"target_parquet={tp}", f"output_parquet={tmp_path / 'bad.parquet'}"]) == 2
    assert "max_distance" in capsys.readouterr().err


# ----------------------------------------------------------------------------- run folder and report

@pytest.mark.parametrize("over", [
    {"min_similarity": 0.03, "filter_by_label": True, "label_mode": "per_label"},
    {"knn_metric": "manhattan", "max_distance": 1e-9},  # removes every pair
])
def test_the_run_records_and_reports_the_controls(tmp_path, over):
    from test_report import do_run, make_set, sections, table

    from deft_mine.report.render import MAX_WORDS, MIN_WORDS, count_words

    folder = do_run(make_set(tmp_path, 6, 24, labels=("a", "b", "c")), topn=4, **over)
    manifest = json.loads((folder / "run.json").read_text())
    summary = manifest["mining"]["summary"]
    assert "below_floor" in summary and "targets_without_neighbours" in summary
    assert "below_floor: " in (folder / "mining_summary.txt").read_text()
    key = "min_similarity" if "min_similarity" in over else "max_distance"
    assert manifest["mining_spec"][key] == over[key]
    pairs = pq.read_table(folder / "mined_pairs.parquet")
    assert sum(pairs.column("below_floor").to_pylist()) == summary["below_floor"]
    text = (folder / "Mining_Report.md").read_text()
    assert MIN_WORDS <= count_words(text) <= MAX_WORDS
    run_section = sections(text)["Mining Run"]
    assert f"`{key}` = " in run_section and "vertical line is the floor" in run_section
    assert f"| `below_floor` | {summary['below_floor']} |" in run_section
    assert (folder / "score_histogram.png").is_file()
    breakdown = sections(text)["Per-Label Breakdown"]
    rows = table(breakdown, "Label")
    assert sum(int(r[5]) for r in rows) == summary["below_floor"]  # the Below floor column
    assert sum(int(r[3]) for r in rows) == sum(pairs.column("kept").to_pylist())
    if "label_mode" in over:
        assert "`label_mode` = per_label" in run_section and "label_mode=per_label" in text
        assert 0 < summary["below_floor"] < summary["pairs"] and summary["mined"] > 0
    else:
        codes = [w["code"] for w in manifest["warnings"]]
        assert "floor_removed_all" in codes and pq.read_table(folder / "mined.parquet").num_rows == 0
        assert "Loosen the floor" in sections(text)["Recommended Actions"]
