"""Mining on real parquet files against a brute-force float64 reference: metrics, ties, topn,
label post-filter, de-duplication, streaming in blocks, and every refusal."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import THUMB_ID, write_embeddings
from deft_mine.errors import DeftError
from deft_mine.tools.mine import mine

METRICS = ("cosine", "euclidean", "manhattan")


def reference(targets: np.ndarray, pool: np.ndarray, topn: int, metric: str):
    """Brute force in float64: per target the topn pool rows, ties to the lower row index."""
    t, p = targets.astype(np.float64), pool.astype(np.float64)
    if metric == "cosine":
        t = t / np.linalg.norm(t, axis=1, keepdims=True)
        p = p / np.linalg.norm(p, axis=1, keepdims=True)
        keys = -(t @ p.T)
    elif metric == "euclidean":
        keys = np.sqrt(((t[:, None, :] - p[None]) ** 2).sum(-1))
    else:
        keys = np.abs(t[:, None, :] - p[None]).sum(-1)
    order = [np.lexsort((np.arange(len(p)), row))[:topn] for row in keys]
    return np.array(order), keys


def unique_in_order(rows) -> list:
    seen, out = set(), []
    for r in rows:
        if r not in seen:
            seen.add(r)
            out.append(r)
    return out


def run_mine(tmp_path, targets, pool, **over):
    t = write_embeddings(tmp_path / "t.parquet", targets, identity=THUMB_ID,
                         labels=over.pop("target_labels", None), filepaths=over.pop("target_paths", None))
    s = write_embeddings(tmp_path / "s.parquet", pool, identity=THUMB_ID,
                         labels=over.pop("pool_labels", None), filepaths=over.pop("pool_paths", None))
    out = tmp_path / "out" / "mined.parquet"
    return mine(s, t, out, overrides=over), pq.read_table(out), s


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("block_rows", [7, 65536])
def test_matches_brute_force_for_every_metric(tmp_path, metric, block_rows):
    rng = np.random.default_rng(3)
    targets, pool = rng.standard_normal((9, 12)), rng.standard_normal((101, 12))
    result, table, _ = run_mine(tmp_path, targets, pool, topn=4, knn_metric=metric, block_rows=block_rows)
    order, keys = reference(targets, pool, 4, metric)
    expected = unique_in_order(f"img_s_{i}.png" for i in order.reshape(-1))
    assert table.column("filepath").to_pylist() == expected
    assert result.summary == {"queries": 9, "topn": 4, "neighbours_requested": 36, "pool": 101,
                              "pairs": 36, "duplicates_removed": 36 - len(expected),
                              "mined": len(expected), "target_in_pool": 0}
    # score is the best any target gave the row, in the metric's own scale
    scores = dict(zip(table.column("filepath").to_pylist(), table.column("score").to_pylist()))
    for j in set(order.reshape(-1)):
        given = [-keys[q, j] if metric == "cosine" else keys[q, j] for q in range(9) if j in order[q]]
        best = max(given) if metric == "cosine" else min(given)
        assert scores[f"img_s_{j}.png"] == pytest.approx(best, rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("metric", METRICS)
def test_ties_go_to_the_lower_pool_row_even_across_blocks(tmp_path, metric):
    rng = np.random.default_rng(5)
    base = rng.standard_normal((4, 8)).astype(np.float32)
    pool = base[rng.integers(0, 4, 200)]  # every vector repeated ~50 times, in every block
    targets = base[[0, 1, 2, 3, 0]] + np.float32(0.01)
    result, table, _ = run_mine(tmp_path, targets, pool, topn=6, knn_metric=metric, block_rows=17)
    order, _ = reference(targets, pool, 6, metric)
    assert table.column("filepath").to_pylist() == unique_in_order(f"img_s_{i}.png" for i in order.reshape(-1))
    # each target's 6 neighbours are the 6 lowest rows holding its duplicate
    for q, v in enumerate([0, 1, 2, 3, 0]):
        assert list(order[q]) == list(np.flatnonzero((pool == base[v]).all(axis=1))[:6])


def test_topn_larger_than_the_pool_gives_the_whole_pool_and_warns(tmp_path):
    rng = np.random.default_rng(0)
    result, table, _ = run_mine(tmp_path, rng.standard_normal((2, 4)), rng.standard_normal((3, 4)), topn=10)
    assert table.num_rows == 3 and result.mined == 3
    assert result.summary["pairs"] == 6 and result.summary["neighbours_requested"] == 20
    assert result.summary["duplicates_removed"] == 3
    (warning,) = [w for w in result.warnings if w.code == "pool_exhausted"]
    assert warning.details == {"topn": 10, "queries": 2, "pool": 3}
    assert "whole pool" in warning.message


def test_topn_times_targets_beyond_pool_is_normal_and_reported(tmp_path):
    rng = np.random.default_rng(1)
    result, table, _ = run_mine(tmp_path, rng.standard_normal((5, 4)), rng.standard_normal((8, 4)), topn=3)
    assert result.summary["pairs"] == 15 and result.mined == table.num_rows <= 8
    assert [w.code for w in result.warnings] == ["pool_exhausted"]
    assert f"{result.mined} unique images were mined" in result.warnings[0].message


def test_label_post_filter_counts_and_keeps_only_agreeing_pairs(tmp_path):
    rng = np.random.default_rng(7)
    targets, pool = rng.standard_normal((6, 5)), rng.standard_normal((40, 5))
    t_labels = ["a", "b", None, "a", "3", "b"]
    p_labels = [["a", "b", "c", None, 3][i % 5] for i in range(40)]  # int 3 lands as "3"
    p_labels = [str(x) if x is not None else None for x in p_labels]
    result, table, _ = run_mine(tmp_path, targets, pool, topn=5, filter_by_label="true",
                                target_labels=t_labels, pool_labels=p_labels)
    order, _ = reference(targets, pool, 5, "cosine")
    kept = [(q, j) for q in range(6) for j in order[q]
            if t_labels[q] is not None and p_labels[j] is not None and t_labels[q] == p_labels[j]]
    assert result.label_filter == "applied"
    assert result.summary["kept_pairs"] == len(kept)
    assert result.summary["dropped_pairs"] == 30 - len(kept)
    assert result.summary["kept_pairs"] + result.summary["dropped_pairs"] == result.summary["pairs"]
    expected = unique_in_order(f"img_s_{j}.png" for _, j in kept)
    assert table.column("filepath").to_pylist() == expected
    assert result.summary["duplicates_removed"] == len(kept) - len(expected)
    text = (tmp_path / "out" / "mining_summary.txt").read_text()
    assert f"kept_pairs: {len(kept)}\n" in text and f"dropped_pairs: {30 - len(kept)}\n" in text


def test_labels_compare_as_strings_across_types(tmp_path):
    vectors = np.eye(3)
    result, table, _ = run_mine(tmp_path, vectors, vectors, topn=1, filter_by_label=True,
                                target_labels=[1, 2, 3], pool_labels=["1", "2", "x"])
    assert result.summary["kept_pairs"] == 2 and table.num_rows == 2


@pytest.mark.parametrize("side", ["source", "target", "both"])
def test_filter_by_label_without_labels_warns_and_runs_unfiltered(tmp_path, side):
    rng = np.random.default_rng(2)
    targets, pool = rng.standard_normal((3, 4)), rng.standard_normal((10, 4))
    labels = {"target_labels": None if side in ("target", "both") else ["a"] * 3,
              "pool_labels": None if side in ("source", "both") else ["b"] * 10}
    result, table, _ = run_mine(tmp_path, targets, pool, topn=2, filter_by_label=True, **labels)
    (warning,) = [w for w in result.warnings if w.code == "filter_by_label_noop"]
    missing = ["source", "target"] if side == "both" else [side]
    assert warning.details["sides_without_label"] == missing
    assert result.label_filter == "noop" and "kept_pairs" not in result.summary
    order, _ = reference(targets, pool, 2, "cosine")
    assert table.num_rows == len(set(order.reshape(-1)))


def test_dedup_keeps_first_appearance_and_records_provenance(tmp_path):
    pool = np.array([[1, 0], [0, 1], [1, 1], [-1, 0]], dtype=np.float32)
    targets = np.array([[1, 0.1], [0.1, 1], [1, 0.05]], dtype=np.float32)
    result, table, _ = run_mine(tmp_path, targets, pool, topn=2, target_paths=["t0", "t1", "t2"])
    # t0 → rows 0, 2; t1 → rows 1, 2; t2 → rows 0, 2
    assert table.column("filepath").to_pylist() == ["img_s_0.png", "img_s_2.png", "img_s_1.png"]
    assert table.column("hits").to_pylist() == [2, 3, 1]
    assert table.column("best_target").to_pylist() == ["t2", "t0", "t1"]
    assert table.schema.names[0] == "filepath"
    assert result.summary["duplicates_removed"] == 3


def test_targets_in_the_pool_are_mined_or_excluded(tmp_path):
    rng = np.random.default_rng(4)
    pool = rng.standard_normal((20, 6))
    pool_paths = [f"/data/p{i}.png" for i in range(20)]
    targets = pool[[3, 11]]
    result, table, _ = run_mine(tmp_path, targets, pool, topn=1, pool_paths=pool_paths,
                                target_paths=["/data/p3.png", "/data/./p11.png"])
    assert table.column("filepath").to_pylist() == ["/data/p3.png", "/data/p11.png"]
    (warning,) = [w for w in result.warnings if w.code == "target_in_pool"]
    assert warning.details == {"count": 2, "excluded": False}

    result, table, _ = run_mine(tmp_path, targets, pool, topn=1, pool_paths=pool_paths,
                                target_paths=["/data/p3.png", "/data/p11.png"], exclude_targets=True)
    mined = table.column("filepath").to_pylist()
    assert "/data/p3.png" not in mined and "/data/p11.png" not in mined
    assert result.summary["pool"] == 18
    order, _ = reference(targets, np.delete(pool, [3, 11], axis=0), 1, "cosine")
    remaining = [p for i, p in enumerate(pool_paths) if i not in (3, 11)]
    assert mined == unique_in_order(remaining[i] for i in order.reshape(-1))


def test_encoder_mismatch_is_refused_showing_both_identities(tmp_path):
    other = {**THUMB_ID, "model": "SigLIP", "model_path": "/models/siglip", "weights_digest": "sha256:ab"}
    t = write_embeddings(tmp_path / "t.parquet", np.eye(2), identity=THUMB_ID)
    s = write_embeddings(tmp_path / "s.parquet", np.eye(2), identity=other)
    out = tmp_path / "mined.parquet"
    with pytest.raises(DeftError) as exc:
        mine(s, t, out)
    assert exc.value.code == "encoder_mismatch"
    assert exc.value.details["source_encoder"] == other and exc.value.details["target_encoder"] == THUMB_ID
    assert set(exc.value.details["differing"]) == {"model", "model_path", "weights_digest"}
    assert not out.exists() and not (tmp_path / "mining_summary.txt").exists()


def test_parquets_without_identity_pass_with_provenance_unknown(tmp_path):
    t = write_embeddings(tmp_path / "t.parquet", np.eye(3), identity=None)  # as the TAO container writes
    s = write_embeddings(tmp_path / "s.parquet", np.eye(3), identity=THUMB_ID)
    result = mine(s, t, tmp_path / "mined.parquet", overrides={"topn": 1})
    (warning,) = result.warnings
    assert warning.code == "provenance_unknown" and warning.details == {"sides": ["target"]}
    assert result.encoder is None and result.mined == 3


def test_fixed_size_lists_of_any_float_width_and_named_columns(tmp_path):
    rng = np.random.default_rng(9)
    targets, pool = rng.standard_normal((3, 4)), rng.standard_normal((15, 4))
    pq.write_table(pa.table({"filepath": [f"t{i}" for i in range(3)],
                             "vec": pa.FixedSizeListArray.from_arrays(pa.array(targets.reshape(-1), pa.float64()), 4)}),
                   tmp_path / "t.parquet")
    pq.write_table(pa.table({"filepath": [f"s{i}" for i in range(15)],
                             "feat": pa.array(list(pool.astype(np.float16)), pa.list_(pa.float16()))}),
                   tmp_path / "s.parquet")
    result = mine(tmp_path / "s.parquet", tmp_path / "t.parquet", tmp_path / "m.parquet",
                  overrides={"source_embed_column_name": "feat", "target_embed_column_name": "vec", "topn": 2})
    order, _ = reference(targets, pool.astype(np.float16), 2, "cosine")
    assert pq.read_table(tmp_path / "m.parquet").column("filepath").to_pylist() == \
        unique_in_order(f"s{i}" for i in order.reshape(-1))
    assert result.summary["pairs"] == 6


@pytest.mark.parametrize("bad, row, what", [
    ("null", 4, "null vector"), ("nan", 6, "NaN"), ("short", 2, "length 3, expected 4"),
    ("empty", 0, "empty vector"),
])
def test_bad_vectors_name_file_column_and_first_bad_row(tmp_path, bad, row, what):
    rows: list = [[0.1, 0.2, 0.3, 0.4] for _ in range(8)]
    if bad == "null":
        rows[4] = None
    elif bad == "nan":
        rows[6] = [0.1, float("nan"), 0.3, 0.4]
    elif bad == "short":
        rows[2] = [0.1, 0.2, 0.3]
    else:
        rows = [[] for _ in range(8)]
    pq.write_table(pa.table({"filepath": [f"s{i}" for i in range(8)],
                             "embedding": pa.array(rows, pa.list_(pa.float32()))}), tmp_path / "s.parquet")
    write_embeddings(tmp_path / "t.parquet", np.ones((2, 4)))
    with pytest.raises(DeftError) as exc:
        mine(tmp_path / "s.parquet", tmp_path / "t.parquet", tmp_path / "m.parquet",
             overrides={"block_rows": 3})
    assert exc.value.code == "embedding_invalid"
    assert exc.value.details["row"] == row and exc.value.details["column"] == "embedding"
    assert str(tmp_path / "s.parquet") in exc.value.message and what in exc.value.message


def test_dimension_mismatch_between_sides_is_refused(tmp_path):
    write_embeddings(tmp_path / "t.parquet", np.ones((2, 4)))
    write_embeddings(tmp_path / "s.parquet", np.ones((5, 6)))
    with pytest.raises(DeftError) as exc:
        mine(tmp_path / "s.parquet", tmp_path / "t.parquet", tmp_path / "m.parquet")
    assert exc.value.code == "dimension_mismatch" and "6-d" in exc.value.message and "4-d" in exc.value.message


def test_missing_columns_and_files_are_named(tmp_path):
    write_embeddings(tmp_path / "t.parquet", np.ones((2, 4)))
    pq.write_table(pa.table({"path": ["a"], "embedding": pa.array([[1.0] * 4], pa.list_(pa.float32()))}),
                   tmp_path / "s.parquet")
    with pytest.raises(DeftError) as exc:
        mine(tmp_path / "s.parquet", tmp_path / "t.parquet", tmp_path / "m.parquet")
    assert exc.value.code == "column_missing" and exc.value.details["missing"] == ["filepath"]
    assert exc.value.details["columns"] == ["path", "embedding"]
    with pytest.raises(DeftError) as exc:
        mine(tmp_path / "nope.parquet", tmp_path / "t.parquet", tmp_path / "m.parquet")
    assert exc.value.code == "file_not_found" and exc.value.details["field"] == "source_parquet"
    with pytest.raises(DeftError) as exc:
        mine(tmp_path / "t.parquet", tmp_path / "t.parquet", tmp_path / "t.parquet")
    assert exc.value.code == "output_is_input"


def test_a_failed_mine_leaves_earlier_output_untouched(tmp_path):
    out = tmp_path / "mined.parquet"
    out.write_bytes(b"finished work")
    write_embeddings(tmp_path / "t.parquet", np.ones((2, 4)))
    write_embeddings(tmp_path / "s.parquet", np.ones((5, 6)))
    with pytest.raises(DeftError):
        mine(tmp_path / "s.parquet", tmp_path / "t.parquet", out)
    assert out.read_bytes() == b"finished work"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_empty_targets_and_empty_pool(tmp_path):
    result, table, _ = run_mine(tmp_path, np.zeros((0, 4)), np.ones((3, 4)))
    assert result.mined == 0 and table.num_rows == 0 and result.summary["queries"] == 0
    result, table, _ = run_mine(tmp_path, np.ones((2, 4)), np.zeros((0, 4)))
    assert result.mined == 0 and result.summary["pairs"] == 0
    assert "pool_exhausted" in [w.code for w in result.warnings]


@pytest.mark.parametrize("metric", METRICS)
def test_shards_searched_apart_and_merged_in_any_order_equal_one_search(tmp_path, metric):
    """What the ray backend relies on: the pool split into row ranges, each searched on its own
    (the later ones told the pool's dimension), merged in any order, gives mine_files's answer."""
    from deft_mine.engine.mining import finish, merge, pool_dim, prepare, search_range
    from deft_mine.schemas.specs import MiningSpec

    rng = np.random.default_rng(3)
    pool = rng.integers(-2, 3, size=(40, 6)).astype(np.float32)  # small integers: many exact ties
    pool[7] = 0  # an all-zero row: left out under cosine, counted
    pool_path = write_embeddings(tmp_path / "pool.parquet", pool, filepaths=[f"p{i % 33}.png" for i in range(40)])
    targets = write_embeddings(tmp_path / "t.parquet", rng.integers(-2, 3, size=(5, 6)).astype(np.float32))
    spec = MiningSpec(topn=4, knn_metric=metric, block_rows=5)
    prep = prepare(pool_path, targets, spec)
    whole = search_range(spec, pool_path, targets, prep.queries, prep.drop)
    dim = pool_dim(pool_path, "embedding")
    ranges = [(0, 10), (10, 25), (25, 40)]
    parts = [search_range(spec, pool_path, targets, prep.queries, prep.drop[a:b], a, b, dim if a else None)
             for a, b in ranges]
    merged = merge(parts, spec.topn)
    backwards = merge(parts[::-1], spec.topn)
    for other in (merged, backwards):
        assert np.array_equal(other.state.ids, whole.state.ids) and np.array_equal(other.state.keys, whole.state.keys)
        assert (other.rows, other.searched, other.flat) == (whole.rows, whole.searched, whole.flat)
    assert merged.flat_rows == whole.flat_rows  # the examples, in pool order
    one, split = finish(prep, whole), finish(prepare(pool_path, targets, spec), merged)
    assert one.mined.equals(split.mined) and one.pairs.equals(split.pairs) and one.summary == split.summary
    assert split.summary.duplicate_paths == 7
