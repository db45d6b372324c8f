"""tmm unique_neighbor_matching against a brute-force reference written here from the contract:
targets in order claim their share of the nearest free files, a target that cannot fill its share
releases them and is retried wider, the budget keeps the nearest (then filepath)."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deft_mine.engine.unique_matching import allocate_quotas, unique_match
from deft_mine.errors import DeftError
from deft_mine.schemas.specs import UniqueMatchingSpec, load_spec
from deft_mine.task import main as task_main


def _write(path, paths, vectors, labels=None):
    vectors = np.asarray(vectors, dtype=np.float32)
    columns = {"filepath": paths, "embedding": pa.array(vectors.tolist(), pa.list_(pa.float32()))}
    if labels is not None:
        columns["label"] = labels
    pq.write_table(pa.table(columns), path)
    return path


def _spec(tmp_path, **keys) -> UniqueMatchingSpec:
    base = {"source_path": str(tmp_path / "pool.parquet"), "target_path": str(tmp_path / "targets.parquet"),
            "output_dir": str(tmp_path / "out")}
    return load_spec(UniqueMatchingSpec, None, {**base, **{k: str(v) for k, v in keys.items()}})


# --- the reference -----------------------------------------------------------------------------

def _unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)


def _distance(metric, q, x):
    if metric == "cosine":
        return 1.0 - float(q @ x)
    if metric == "euclidean":
        return math.sqrt(float(((q - x) ** 2).sum()))
    return float(np.abs(q - x).sum())


def ref_subset(P, T, paths, tpaths, targets, allowed, held, budget, metric, factor):
    """One subset's passes, brute force: returns {path: (target path, distance)} newly held."""
    got: dict[str, tuple[str, float]] = {}
    if not targets or budget <= 0:
        return got
    topn = math.ceil(budget / len(targets))
    current, number = list(targets), 0
    while len(got) < budget:
        free = [r for r in range(len(P)) if allowed[r] and paths[r] not in held]
        if not free:
            break
        share = min(topn, len({paths[r] for r in free}))
        number += 1
        k = min(factor * number * share, len(free))
        taken, picks, failed = set(), [], []
        for t in current:
            ranked = sorted(free, key=lambda r: (_distance(metric, T[t], P[r]), r))[:k]
            tentative = []
            for r in ranked:
                if len(tentative) == share:
                    break
                if paths[r] in taken or paths[r] in {paths[x] for x in tentative}:
                    continue
                tentative.append(r)
            if len(tentative) < share:
                failed.append(t)
                continue
            taken |= {paths[r] for r in tentative}
            picks += [(_distance(metric, T[t], P[r]), paths[r], tpaths[t]) for r in tentative]
        for d, path, tpath in sorted(picks)[:budget - len(got)]:
            got[path] = (tpath, d)
            held.add(path)
        current = failed if failed else (list(targets) if len(got) < budget else [])
        if not picks and k >= len(free):
            break
    return got


def ref_global(P, T, paths, tpaths, budget, metric, factor=5, excluded=()):
    allowed = [p not in excluded for p in paths]
    return ref_subset(_unit(P), _unit(T), paths, tpaths, list(range(len(T))), allowed, set(), budget, metric, factor)


def _result(outcome):
    t = outcome.selected.to_pydict()
    return {p: (m, d) for p, m, d in zip(t["filepath"], t["matched_target"], t["distance"])}


def _same(result, reference):
    assert sorted(result) == sorted(reference)
    for path, (target, d) in reference.items():
        assert result[path][0] == target
        assert result[path][1] == pytest.approx(d, abs=1e-5)


# --- the contract, by hand -----------------------------------------------------------------------

def test_a_later_target_skips_files_an_earlier_one_claimed(tmp_path):
    # s0..s5 on a line; t1 sits at s0, t2 just past it: t1 takes s0..s2, t2 falls through to s3..s5.
    pool = [[1.0, 0.1 * i] for i in range(8)]
    _write(tmp_path / "pool.parquet", [f"s{i}" for i in range(8)], pool)
    _write(tmp_path / "targets.parquet", ["t1", "t2"], [[1.0, 0.0], [1.0, 0.05]])
    outcome = unique_match(_spec(tmp_path, desired_unique_count=6, candidate_expansion_factor=3))
    got = _result(outcome)
    assert {p for p, (t, _) in got.items() if t == "t1"} == {"s0", "s1", "s2"}
    assert {p for p, (t, _) in got.items() if t == "t2"} == {"s3", "s4", "s5"}


def test_rollback_and_retry_with_a_wider_pool(tmp_path):
    # factor 1, share 2: t2's 2 candidates are both t1's, so it releases and is retried with 4.
    pool = [[1.0, 0.1 * i] for i in range(6)]
    _write(tmp_path / "pool.parquet", [f"s{i}" for i in range(6)], pool)
    _write(tmp_path / "targets.parquet", ["t1", "t2"], [[1.0, 0.0], [1.0, 0.01]])
    outcome = unique_match(_spec(tmp_path, desired_unique_count=4, candidate_expansion_factor=1))
    assert [(p.number, p.candidates, p.retry, p.added) for p in outcome.passes] == [(1, 2, 1, 2), (2, 4, 0, 2)]
    got = _result(outcome)
    assert {p for p, (t, _) in got.items() if t == "t2"} == {"s2", "s3"}
    _same(got, ref_global(np.array(pool), np.array([[1.0, 0.0], [1.0, 0.01]]), [f"s{i}" for i in range(6)],
                          ["t1", "t2"], 4, "euclidean", 1))


def test_the_cap_keeps_the_nearest_then_the_filepath(tmp_path):
    # Two equal targets, two equal pool files: each target claims one at the same distance; a
    # budget of 1 keeps a.png (filepath breaks the tie), though z.png is the lower pool row.
    _write(tmp_path / "pool.parquet", ["z.png", "a.png", "far.png"], [[1, 0], [1, 0], [0, 1]])
    _write(tmp_path / "targets.parquet", ["t0", "t1"], [[1, 0], [1, 0]])
    outcome = unique_match(_spec(tmp_path, desired_unique_count=1))
    assert _result(outcome) == {"a.png": ("t1", pytest.approx(0.0))}
    assert outcome.passes[0].added == 1 and len(outcome.passes[0].target_rows) == 2


def test_equal_distances_go_to_the_lower_pool_row(tmp_path):
    _write(tmp_path / "pool.parquet", ["b", "a", "c"], [[1, 0], [1, 0], [1, 0]])
    _write(tmp_path / "targets.parquet", ["t"], [[1, 0]])
    assert list(_result(unique_match(_spec(tmp_path, desired_unique_count=1)))) == ["b"]


@pytest.mark.parametrize("targets", [1, 3])
def test_a_budget_over_the_pool_takes_every_pool_image_once_and_warns(tmp_path, targets):
    rng = np.random.default_rng(targets)
    paths = [f"p{i}" for i in range(7)] + ["p0"]  # a file listed twice counts once
    _write(tmp_path / "pool.parquet", paths, rng.normal(size=(8, 4)))
    _write(tmp_path / "targets.parquet", [f"t{i}" for i in range(targets)], rng.normal(size=(targets, 4)))
    outcome = unique_match(_spec(tmp_path, desired_unique_count=20))
    assert sorted(outcome.selected.column("filepath").to_pylist()) == sorted(set(paths))
    [warning] = outcome.warnings
    assert warning.code == "unique_count_short" and warning.details["missing"] == 13
    assert outcome.shortfall[0].reason == "pool_spent"
    assert outcome.summary["shortfall"]["missing"] == 13


@pytest.mark.parametrize(("by", "excluded"), [
    (None, {"d/p1.png", "d/p4.png"}),  # the container's rule: full path, or file name either way
    ("path", {"d/p1.png"}),  # ours: the full path only, a file of the same name elsewhere stays
])
def test_exclude_path_by_path_or_file_name_and_its_shortfall(tmp_path, by, excluded):
    rng = np.random.default_rng(3)
    paths = [f"d/p{i}.png" for i in range(6)]
    P, T = rng.normal(size=(6, 3)), rng.normal(size=(2, 3))
    _write(tmp_path / "pool.parquet", paths, P)
    _write(tmp_path / "targets.parquet", ["t0", "t1"], T)
    pq.write_table(pa.table({"filepath": ["d/p1.png", "elsewhere/p4.png"]}), tmp_path / "ex.parquet")
    outcome = unique_match(_spec(tmp_path, desired_unique_count=6, exclude_path=tmp_path / "ex.parquet",
                                 **({"exclude_by": by} if by else {})))
    _same(_result(outcome), ref_global(P, T, paths, ["t0", "t1"], 6, "euclidean", excluded=excluded))
    assert outcome.summary["excluded_rows"] == len(excluded)
    if by is None:
        assert outcome.shortfall[0].reason == "excluded"


@pytest.mark.parametrize("metric", ["euclidean", "cosine", "manhattan"])
@pytest.mark.parametrize("seed", range(6))
def test_global_equals_the_reference(tmp_path, metric, seed):
    rng = np.random.default_rng(seed)
    rows, n_targets = int(rng.integers(5, 40)), int(rng.integers(1, 6))
    P, T = rng.normal(size=(rows, 4)), rng.normal(size=(n_targets, 4))
    paths = [f"p{int(i)}" for i in rng.integers(0, rows, size=rows)]  # repeats on purpose
    budget, factor = int(rng.integers(1, rows + 5)), int(rng.integers(1, 4))
    _write(tmp_path / "pool.parquet", paths, P)
    _write(tmp_path / "targets.parquet", [f"t{i}" for i in range(n_targets)], T)
    spec = _spec(tmp_path, desired_unique_count=budget, distance_metric=metric, candidate_expansion_factor=factor,
                 block_rows=7)
    outcome = unique_match(spec)
    reference = ref_global(P, T, paths, [f"t{i}" for i in range(n_targets)], budget, metric, factor)
    _same(_result(outcome), reference)
    assert len(reference) == min(budget, len(set(paths)))  # the budget, or the whole pool


def ref_stratified(P, T, paths, tpaths, plabels, tlabels, rare, budget, metric, factor=5):
    Pn, Tn = _unit(P), _unit(T)
    group = lambda label: label.strip().lower() if label is not None and label.strip().lower() in rare else "non_rare"
    pg, tg = [group(x) for x in plabels], [group(x) for x in tlabels]
    ratios = {name: tg.count(name) / len(tg) for name in [*rare, "non_rare"]}
    quotas = allocate_quotas(ratios, budget)
    held: set[str] = set()
    out = {}
    common = [g == "non_rare" for g in pg]
    for name in sorted(rare) + ["non_rare"]:
        targets = [i for i, g in enumerate(tg) if g == name]
        own = [g == name for g in pg]
        got = ref_subset(Pn, Tn, paths, tpaths, targets, own, held, quotas[name], metric, factor) if any(own) else {}
        if name != "non_rare" and len(got) < quotas[name] and any(common) and targets:
            got.update(ref_subset(Pn, Tn, paths, tpaths, targets, common, held, quotas[name] - len(got), metric, factor))
        out.update(got)
    return out, quotas


@pytest.mark.parametrize("metric", ["euclidean", "cosine", "manhattan"])
@pytest.mark.parametrize("seed", range(5))
def test_class_stratified_equals_the_reference(tmp_path, metric, seed):
    rng = np.random.default_rng(100 + seed)
    rows, n_targets = int(rng.integers(6, 30)), int(rng.integers(2, 8))
    P, T = rng.normal(size=(rows, 4)), rng.normal(size=(n_targets, 4))
    words = ["scratch", " Scratch", "DENT", "ok", None]
    plabels = [words[i] for i in rng.integers(0, 5, size=rows)]
    tlabels = [words[i] for i in rng.integers(0, 5, size=n_targets)]
    paths, tpaths = [f"p{i}" for i in range(rows)], [f"t{i}" for i in range(n_targets)]
    budget = int(rng.integers(1, rows + 3))
    _write(tmp_path / "pool.parquet", paths, P, plabels)
    _write(tmp_path / "targets.parquet", tpaths, T, tlabels)
    spec = _spec(tmp_path, desired_unique_count=budget, distance_metric=metric,
                 allocation_policy="class_stratified", rare_class_list="scratch,dent")
    outcome = unique_match(spec)
    reference, quotas = ref_stratified(P, T, paths, tpaths, plabels, tlabels, ["dent", "scratch"], budget, metric)
    _same(_result(outcome), reference)
    assert outcome.summary["allocation"]["total_desired"] == budget
    assert {k: v["desired_count"] for k, v in outcome.summary["allocation"]["per_class"].items()} == \
        {k: quotas[k] for k in ("dent", "scratch")}


def test_largest_remainder_ties_go_to_the_name_that_sorts_last():
    assert allocate_quotas({"a": 1, "b": 1}, 1) == {"a": 0, "b": 1}
    assert allocate_quotas({"x": 1, "non_rare": 1}, 3) == {"x": 2, "non_rare": 1}
    assert allocate_quotas({"a": 1, "b": 1, "c": 1}, 10) == {"a": 3, "b": 3, "c": 4}
    assert sum(allocate_quotas({"a": 0.3, "b": 0.3, "c": 0.4}, 7).values()) == 7


def test_a_rare_class_with_no_pool_rows_falls_back_and_says_class_empty(tmp_path):
    _write(tmp_path / "pool.parquet", ["p0", "p1"], [[1, 0], [0, 1]], ["ok", "ok"])
    _write(tmp_path / "targets.parquet", ["t0", "t1"], [[1, 0], [0, 1]], ["dent", "ok"])
    spec = _spec(tmp_path, desired_unique_count=2, allocation_policy="class_stratified", rare_class_list="dent")
    got = unique_match(spec).selected.to_pydict()
    assert dict(zip(got["filepath"], got["subset"])) == {"p0": "dent_fallback", "p1": "non_rare"}
    # a quota of 3 each: dent's fallback takes the whole non_rare pool first (a file is the first class's)
    outcome = unique_match(spec.model_copy(update={"desired_unique_count": 6}))
    assert set(outcome.selected.column("subset").to_pylist()) == {"dent_fallback"}
    assert {s.group: s.reason for s in outcome.shortfall} == {"dent": "class_empty", "non_rare": "pool_spent"}


def test_the_task_writes_the_container_outputs(tmp_path, capsys):
    rng = np.random.default_rng(9)
    _write(tmp_path / "pool.parquet", [f"p{i}" for i in range(12)], rng.normal(size=(12, 3)))
    _write(tmp_path / "targets.parquet", ["t0", "t1"], rng.normal(size=(2, 3)))
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text("source_path: ???\ntarget_path: ???\noutput_dir: ???\ndesired_unique_count: ???\n"
                         "allocation_policy: global\ndistance_metric: euclidean\ncandidate_expansion_factor: 5\n"
                         "exclude_path: null\nsource_detection_file: null\ndetection_format: null\n"
                         "rare_class_list: ''\nsave_embeddings: true\nvisualize: false\n")
    code = task_main(["tmm", "unique_neighbor_matching", "-e", str(spec_file), f"source_path={tmp_path}/pool.parquet",
                      f"target_path={tmp_path}/targets.parquet", f"output_dir={tmp_path}/out",
                      "desired_unique_count=5"])
    assert code == 0 and capsys.readouterr().out.strip().endswith("Execution status: PASS")
    final = pq.read_table(tmp_path / "out" / "final_unique_files.parquet")
    assert final.column_names[:4] == ["filepath", "matched_target", "distance", "class"]
    assert final.column("filepath").to_pylist() == sorted(final.column("filepath").to_pylist())
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert list(summary)[:6] == ["allocation_policy", "desired_unique_count", "retrieved_unique_count",
                                 "coverage_pct", "target_queries", "rare_classes"]
    first_pass = pq.read_table(tmp_path / "out" / "global_iteration_1_topn_3.parquet")
    assert first_pass.column_names[:4] == ["target_filepath", "target_embedding", "top1_source_filepath",
                                           "top1_distance"]


def test_a_folder_of_parquets_is_one_side(tmp_path):
    rng = np.random.default_rng(5)
    P, T = rng.normal(size=(10, 3)), rng.normal(size=(2, 3))
    (tmp_path / "pool").mkdir()
    _write(tmp_path / "pool" / "b.parquet", [f"p{i}" for i in range(5, 10)], P[5:])
    _write(tmp_path / "pool" / "a.parquet", [f"p{i}" for i in range(5)], P[:5])
    _write(tmp_path / "targets.parquet", ["t0", "t1"], T)
    outcome = unique_match(_spec(tmp_path, desired_unique_count=7, source_path=tmp_path / "pool"))
    _same(_result(outcome), ref_global(P, T, [f"p{i}" for i in range(10)], ["t0", "t1"], 7, "euclidean"))


# --- bad input: coded, naming the field, nothing written ----------------------------------------

@pytest.mark.parametrize("keys, field", [
    ({"desired_unique_count": 0}, "desired_unique_count"),
    ({"desired_unique_count": -3}, "desired_unique_count"),
    ({"desired_unique_count": 2, "allocation_policy": "per_class"}, "allocation_policy"),
    ({"desired_unique_count": 2, "allocation_policy": "class_stratified"}, "rare_class_list"),
    ({"desired_unique_count": 2, "allocation_policy": "class_stratified", "rare_class_list": " , "},
     "rare_class_list"),
])
def test_bad_spec_values_are_refused_by_field(tmp_path, keys, field):
    with pytest.raises(DeftError) as info:
        _spec(tmp_path, **keys)
    assert info.value.code == "spec_invalid" and info.value.details["field"] == field


def test_class_stratified_without_labels_and_exclude_without_filepath_write_nothing(tmp_path):
    _write(tmp_path / "pool.parquet", ["p0", "p1"], [[1, 0], [0, 1]])
    _write(tmp_path / "targets.parquet", ["t0"], [[1, 0]])
    with pytest.raises(DeftError) as info:
        unique_match(_spec(tmp_path, desired_unique_count=1, allocation_policy="class_stratified",
                           rare_class_list="dent"))
    assert info.value.code == "column_missing" and info.value.details["missing"] == ["label"]
    pq.write_table(pa.table({"path": ["p0"]}), tmp_path / "ex.parquet")
    with pytest.raises(DeftError) as info:
        unique_match(_spec(tmp_path, desired_unique_count=1, exclude_path=tmp_path / "ex.parquet"))
    assert info.value.code == "column_missing" and info.value.details["field"] == "exclude_path"
    code = task_main(["tmm", "unique_neighbor_matching", f"source_path={tmp_path}/pool.parquet",
                      f"target_path={tmp_path}/targets.parquet", f"output_dir={tmp_path}/out",
                      "desired_unique_count=1", f"exclude_path={tmp_path}/ex.parquet"])
    assert code == 2 and not (tmp_path / "out").exists()


# --- the candidate cache: later passes read each target's kept list, rescan when it runs dry -------

def _counting_searches(monkeypatch):
    """Count the pool scans (the real search runs; only the calls are counted)."""
    from deft_mine.engine import unique_matching

    calls: list[int] = []
    real = unique_matching._Matcher._search

    def counted(self, queries, free, k):
        calls.append(len(queries))
        return real(self, queries, free, k)

    monkeypatch.setattr(unique_matching._Matcher, "_search", counted)
    return calls


def _crowded(tmp_path, seed, rows=60, n_targets=9, dim=3):
    """Targets bunched in one corner of a small pool (files repeated): they want the same files."""
    rng = np.random.default_rng(seed)
    P = rng.normal(size=(rows, dim))
    T = rng.normal(size=(1, dim)) + 0.05 * rng.normal(size=(n_targets, dim))
    paths = [f"p{int(i)}" for i in rng.integers(0, int(rows * 0.8), size=rows)]
    _write(tmp_path / "pool.parquet", paths, P)
    _write(tmp_path / "targets.parquet", [f"t{i}" for i in range(n_targets)], T)
    return P, T, paths, [f"t{i}" for i in range(n_targets)]


@pytest.mark.parametrize("metric", ["euclidean", "cosine", "manhattan"])
@pytest.mark.parametrize("seed", range(4))
def test_passes_answered_from_the_cache_and_by_rescans_equal_the_reference(tmp_path, monkeypatch, metric, seed):
    from deft_mine.engine import unique_matching

    monkeypatch.setattr(unique_matching, "_CACHE_PASSES", 4)  # lists 4 passes deep: some retries read them
    P, T, paths, tpaths = _crowded(tmp_path, seed)
    calls = _counting_searches(monkeypatch)
    budget = len(set(paths)) - 3  # a large share: most of the pool, many conflicts
    outcome = unique_match(_spec(tmp_path, desired_unique_count=budget, distance_metric=metric,
                                 candidate_expansion_factor=1, block_rows=8))
    _same(_result(outcome), ref_global(P, T, paths, tpaths, budget, metric, 1))
    searched = sum(p.targets for p in outcome.passes)
    assert len(outcome.passes) > 2
    assert 1 < len(calls) < len(outcome.passes)  # some passes from the cache, some rescans
    assert sum(calls) < searched  # ...and a rescan searches only the targets whose list ran dry


@pytest.mark.parametrize("seed", range(4))
def test_a_cache_one_pass_deep_runs_dry_every_retry_and_still_equals_the_reference(tmp_path, monkeypatch, seed):
    from deft_mine.engine import unique_matching

    monkeypatch.setattr(unique_matching, "_CACHE_ENTRIES", 1)  # keep only this pass's k: retries rescan
    P, T, paths, tpaths = _crowded(tmp_path, 50 + seed, rows=40, n_targets=6)
    calls = _counting_searches(monkeypatch)
    budget = len(set(paths)) - 1
    outcome = unique_match(_spec(tmp_path, desired_unique_count=budget, candidate_expansion_factor=2, block_rows=5))
    _same(_result(outcome), ref_global(P, T, paths, tpaths, budget, "euclidean", 2))
    assert len(calls) >= len(outcome.passes) - 1 > 1


def test_a_cache_over_the_whole_pool_never_rescans(tmp_path, monkeypatch):
    from deft_mine.engine import unique_matching

    monkeypatch.setattr(unique_matching, "_CACHE_PASSES", 1000)  # every target keeps every row
    P, T, paths, tpaths = _crowded(tmp_path, 7, rows=30, n_targets=5)
    calls = _counting_searches(monkeypatch)
    budget = len(set(paths))
    outcome = unique_match(_spec(tmp_path, desired_unique_count=budget, candidate_expansion_factor=1, block_rows=4))
    _same(_result(outcome), ref_global(P, T, paths, tpaths, budget, "euclidean", 1))
    assert calls == [len(T)] and len(outcome.passes) > 1
