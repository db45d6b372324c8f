"""The leakage guard inside the search (leak_scope=mined, engine/leak_search.py): the answer is each
target's topn nearest among the pool rows that are no leak, against a float64 brute force, on every path
the guard can take (settled in one search, searched again, the whole pool judged, vectors read back)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from deft_mine.engine import leak_search, mining, tables
from deft_mine.engine.knn import l2_normalise
from deft_mine.engine.leaks import TARGETS, Protected, find_leaks, pool_of
from deft_mine.engine.mining import MiningOutcome, mine_files, pool_vectors
from deft_mine.events import NullEvents
from deft_mine.schemas.specs import Metric, MiningSpec

# ±1 vectors in 16 dimensions: every score is exact in float64 (a cosine is (16 - 2h) / 16, a squared
# distance 4h, a manhattan distance 2h, for h differing coordinates), so ties in score are real ties,
# and a threshold can sit exactly on a score.
D = 16
VAL = "val.parquet"  # the protect listing's name, as protected_listing records it


def score_at(h: int, metric: Metric) -> float:
    """The score of two ±1 vectors `h` coordinates apart (the engine's float64 value, exactly)."""
    return {Metric.cosine: (D - 2 * h) / D, Metric.euclidean: float(np.sqrt(4.0 * h)),
            Metric.manhattan: 2.0 * h}[metric]


def threshold_keys(metric: Metric, h: int) -> dict[str, float]:
    """The leak threshold set exactly on the score `h` coordinates apart (that score is a leak)."""
    key = "leak_similarity" if metric is Metric.cosine else "leak_distance"
    return {key: score_at(h, metric)}


def flipped(vector: np.ndarray, h: int, rng: np.random.Generator) -> np.ndarray:
    out = vector.copy()
    out[rng.choice(D, h, replace=False)] *= -1
    return out


def signs(rng: np.random.Generator, rows: int) -> np.ndarray:
    return rng.choice([-1.0, 1.0], (rows, D)).astype(np.float32)


# --- the brute force --------------------------------------------------------------------------------

def keys(a: np.ndarray, b: np.ndarray, metric: Metric) -> np.ndarray:
    """Every (a, b) pair's float64 key, lower is nearer (cosine over float32 unit vectors, as searched)."""
    if metric is Metric.cosine:
        return -(l2_normalise(a).astype(np.float64) @ l2_normalise(b).astype(np.float64).T)
    diff = a.astype(np.float64)[:, None, :] - b.astype(np.float64)[None, :, :]
    return np.square(diff).sum(-1) if metric is Metric.euclidean else np.abs(diff).sum(-1)


def score_of(key: np.ndarray, metric: Metric) -> np.ndarray:
    return {Metric.cosine: np.negative, Metric.euclidean: np.sqrt, Metric.manhattan: np.copy}[metric](key)


@dataclass
class Case:
    """A mining job on disk: the targets, the protect listing's vectors, the pool (names, labels)."""

    folder: Path
    targets: np.ndarray
    val: np.ndarray
    pool: np.ndarray
    pool_names: list[str]
    target_labels: list[str] | None = None
    pool_labels: list[str] | None = None

    @property
    def target_names(self) -> list[str]:
        return [f"t{i}.png" for i in range(len(self.targets))]

    @property
    def val_names(self) -> list[str]:
        return [f"v{i}.png" for i in range(len(self.val))]

    @property
    def protected(self) -> Protected:
        names = self.target_names + self.val_names
        return Protected(names, [self.folder / "sets" / n for n in names],
                         [TARGETS] * len(self.targets) + [VAL] * len(self.val),
                         np.concatenate([self.targets, self.val]).reshape(-1, D))

    def write(self) -> Case:
        write_embeddings(self.folder / "targets.parquet", self.target_names, self.targets, self.target_labels)
        write_embeddings(self.folder / "pool.parquet", self.pool_names, self.pool, self.pool_labels)
        leak_search.write_protected(self.protected, self.folder / "protected.parquet")
        return self


def write_embeddings(path: Path, names: list[str], vectors: np.ndarray, labels: list[str] | None) -> None:
    columns = {"filepath": pa.array(names, pa.string()),
               "embedding": tables.vector_array(np.asarray(vectors, np.float32).reshape(-1, D))}
    if labels is not None:
        columns["label"] = pa.array(labels, pa.string())
    pq.write_table(pa.table(columns), path)


@dataclass
class Reference:
    leak: np.ndarray  # per pool row: a leak
    nearest: np.ndarray  # ...its nearest protected row (ties to the lower), -1 none
    score: np.ndarray  # ...and that score
    rows: list[list[int]]  # per target: its topn pool rows without the leaks, nearest first (ties: lower row)
    scores: list[list[float]]
    unguarded: list[list[int]]  # per target: its topn pool rows, leaks and all


def reference(case: Case, metric: Metric, h: int | None, topn: int, per_label: bool = False,
              exclude_targets: bool = False) -> Reference:
    """Leaks: a nearest protected score that reaches the threshold (byte copies: the test that writes
    files judges them itself), a pool row naming a target compared with the protect listing only.
    `exclude_targets`: the rows naming a target are never searched."""
    protected = case.protected
    names_target = np.isin(case.pool_names, case.target_names)
    to_protected = keys(case.pool, protected.vectors, metric)
    to_protected[np.ix_(names_target, protected.is_target)] = np.inf
    nearest = np.argmin(to_protected, axis=1)  # the first lowest: ties to the lower protected row
    best = to_protected[np.arange(len(case.pool)), nearest]
    nearest[~np.isfinite(best)] = -1
    score = score_of(best, metric)
    leak = np.zeros(len(case.pool), bool)
    if h is not None:
        limit = score_at(h, metric)
        leak = np.isfinite(best) & ((score >= limit) if metric is Metric.cosine else (score <= limit))
    near = keys(case.targets, case.pool, metric)
    if per_label:
        near[np.asarray(case.target_labels)[:, None] != np.asarray(case.pool_labels)[None, :]] = np.inf

    def top(grid: np.ndarray) -> tuple[list[list[int]], list[list[float]]]:
        rows, scores = [], []
        for line in grid:
            order = [j for j in np.lexsort((np.arange(len(line)), line)) if np.isfinite(line[j])][:topn]
            rows.append([int(j) for j in order])
            scores.append([float(score_of(line[j], metric)) for j in order])
        return rows, scores

    if exclude_targets:
        near[:, names_target] = np.inf
    unguarded, _ = top(near)
    near[:, leak] = np.inf
    rows, scores = top(near)
    return Reference(leak, nearest, score, rows, scores, unguarded)


# --- the engine, and the comparison -----------------------------------------------------------------

def mine(case: Case, metric: Metric, h: int | None, topn: int, block_rows: int = 7, **extra) -> MiningOutcome:
    spec = MiningSpec(topn=topn, knn_metric=metric, block_rows=block_rows,
                      protected_parquet=str(case.folder / "protected.parquet"),
                      **({} if h is None else threshold_keys(metric, h)), **extra)
    return mine_files(case.folder / "pool.parquet", case.folder / "targets.parquet", spec, NullEvents())


def pairs_of(outcome: MiningOutcome, queries: int) -> tuple[list[list[int]], list[list[float]]]:
    """Per target (its row in the target file), its pairs' pool rows and scores in rank order."""
    table = outcome.pairs.sort_by([("target_row", "ascending"), ("rank", "ascending")])
    rows: list[list[int]] = [[] for _ in range(queries)]
    scores: list[list[float]] = [[] for _ in range(queries)]
    for pair in table.select(["target_row", "source_row", "score"]).to_pylist():
        rows[pair["target_row"]].append(pair["source_row"])
        scores[pair["target_row"]].append(pair["score"])
    return rows, scores


def assert_answer(outcome: MiningOutcome, case: Case, ref: Reference, metric: Metric) -> None:
    """The pairs, scores and mined files are exactly the brute force's; every leak listed is a leak with
    the brute force's verdict; and every leak the search would have taken is listed."""
    rows, scores = pairs_of(outcome, len(case.targets))
    assert rows == ref.rows
    assert scores == ref.scores
    want = list(dict.fromkeys(case.pool_names[r] for line in ref.rows for r in line))
    assert outcome.mined.column("filepath").to_pylist() == want
    listed = outcome.leaks.table
    score_column = "similarity" if metric is Metric.cosine else "distance"
    names = case.protected.filepaths
    for row in listed.to_pylist():
        r = row["source_row"]
        assert ref.leak[r] and row["filepath"] == case.pool_names[r]
        if row["kind"] == "similar":
            assert row[score_column] == ref.score[r]
            assert row["protected_filepath"] == names[ref.nearest[r]]
    would_take = {r for line in ref.unguarded for r in line if ref.leak[r]}
    assert would_take <= set(listed.column("source_row").to_pylist())


def near_case(folder: Path, seed: int, targets: int = 5, val: int = 4, pool: int = 90) -> Case:
    """Targets and protect-listing images, and a pool of rows 0-5 coordinates from them (so some
    leak, at and inside the threshold, and many tie), repeated rows, unrelated rows, and one row
    naming a target file with that target's vector."""
    rng = np.random.default_rng(seed)
    t, v = signs(rng, targets), signs(rng, val)
    sources = np.concatenate([t, v])
    rows = [flipped(sources[rng.integers(len(sources))], int(rng.integers(0, 6)), rng) for _ in range(pool - 12)]
    rows += [rows[i] for i in rng.choice(len(rows), 6, replace=False)]  # repeated vectors: ties on rows
    rows += list(signs(rng, 5))
    rows.append(t[1].copy())
    names = [f"p{i}.png" for i in range(len(rows) - 1)] + ["t1.png"]
    order = rng.permutation(len(rows) - 1)  # the named target's row lands mid-pool
    rows = [rows[i] for i in order[:40]] + [rows[-1]] + [rows[i] for i in order[40:]]
    names = [names[i] for i in order[:40]] + [names[-1]] + [names[i] for i in order[40:]]
    return Case(folder, t, v, np.array(rows, np.float32), names)


# --- 1: every metric, ties among the candidates and on the threshold ---------------------------------

@pytest.mark.parametrize("metric", list(Metric))
@pytest.mark.parametrize("topn", [1, 4, 9])
@pytest.mark.parametrize("h", [0, 2])
def test_the_answer_is_the_topn_of_the_pool_without_its_leaks(tmp_path, metric, topn, h):
    """A leak: within `h` coordinates of a protected image, `h` exactly (the threshold) included; 0: exact copies."""
    case = near_case(tmp_path, seed=11).write()
    ref = reference(case, metric, h, topn)
    outcome = mine(case, metric, h, topn)
    assert_answer(outcome, case, ref, metric)
    # the case means something: leaks the search would take, one exactly on the threshold among them,
    # ties among the answer's scores, and the row naming a target (its nearest, not a leak) taken
    taken = {r for line in ref.unguarded for r in line if ref.leak[r]}
    assert taken and (topn == 1 or any(ref.score[r] == score_at(h, metric) for r in taken))
    assert ref.rows != ref.unguarded
    assert any(len(set(line)) < len(line) for line in ref.scores) or topn == 1
    named = case.pool_names.index("t1.png")
    assert not ref.leak[named] and ref.rows[1][0] == named
    assert outcome.leaks.judged < len(case.pool) and outcome.leaks.pool == len(case.pool)


# --- 2: a leak that is a target's nearest; a chain where only some are leaks -------------------------

@pytest.mark.parametrize("metric", list(Metric))
def test_a_leak_nearest_to_its_target_and_a_chain_of_near_copies(tmp_path, metric):
    rng = np.random.default_rng(5)
    t, v = signs(rng, 2), signs(rng, 1)
    # t0's nearest is A (a copy of v0 one coordinate off: a leak), then B two off A and three off v0,
    # then C four off A (five off v0): A≈B≈C, only A a leak
    t[0] = flipped(v[0], 3, rng)
    a = v[0].copy()
    a[np.flatnonzero(t[0] != v[0])[0]] *= -1  # A: one coordinate off v0, toward t0 (two off t0)
    b = a.copy()
    off = np.flatnonzero(t[0] == v[0])[:2]
    b[off[:1]] *= -1  # B: A with one more (away from both): three off t0
    c = b.copy()
    c[off[1:2]] *= -1
    far = signs(rng, 8)
    pool = np.stack([*far[:4], c, b, a, *far[4:]]).astype(np.float32)
    case = Case(tmp_path, t, v, pool, [f"p{i}.png" for i in range(len(pool))]).write()
    ref = reference(case, metric, 1, 2)
    assert ref.unguarded[0][0] == 6 and ref.leak[6] and not ref.leak[[4, 5]].any()
    outcome = mine(case, metric, 1, 2, block_rows=3)
    assert_answer(outcome, case, ref, metric)
    assert ref.rows[0] == [5, 4]  # B, then C
    (listed,) = outcome.leaks.table.to_pylist()
    assert (listed["filepath"], listed["protected_filepath"], listed["kind"]) == ("p6.png", "v0.png", "similar")


# --- 3: searched again; the whole pool judged ---------------------------------------------------------

def flood_case(folder: Path, leaks: int, seed: int = 3) -> Case:
    """Target 0 with `leaks` near copies (a coordinate or two off it: leaks of the target itself),
    nearer than any clean row; the other targets with a clean neighbourhood."""
    rng = np.random.default_rng(seed)
    t, v = signs(rng, 3), signs(rng, 2)
    copies = [flipped(t[0], 1 + i % 2, rng) for i in range(leaks)]
    clean = [flipped(t[0], 4 + i % 3, rng) for i in range(12)] + [flipped(t[i % 2 + 1], 3 + i % 3, rng)
                                                                 for i in range(12)]
    rows = np.array(copies + clean + list(signs(rng, 10)), np.float32)
    order = rng.permutation(len(rows))
    return Case(folder, t, v, rows[order], [f"p{i}.png" for i in range(len(rows))])


def flood(topn: int) -> int:
    """Leaks enough to run past two searches' widths (the whole pool then judged)."""
    return 2 * (topn + leak_search.slack(topn)) + 5


def counted(monkeypatch, name: str) -> list[int]:
    """A mining function's calls as they run (through to it), each by the length of its fourth argument
    (search_range: its queries) or second (_pool_rows_vectors: the rows read back)."""
    calls: list[int] = []
    real = getattr(mining, name)

    def counting(*args, **kwargs):
        calls.append(len(args[3] if len(args) > 3 else args[1]))
        return real(*args, **kwargs)

    monkeypatch.setattr(mining, name, counting)
    return calls


@pytest.mark.parametrize("metric", list(Metric))
def test_a_target_with_more_leaks_than_its_candidates_is_searched_again(tmp_path, metric, monkeypatch):
    topn = 3
    width = topn + leak_search.slack(topn)
    case = flood_case(tmp_path, leaks=width + 4).write()  # more than one search's width, fewer than two
    ref = reference(case, metric, 2, topn)
    assert ref.leak.sum() == width + 4 and ref.leak[ref.unguarded[0]].all()
    calls = counted(monkeypatch, "search_range")
    outcome = mine(case, metric, 2, topn, block_rows=5)
    assert_answer(outcome, case, ref, metric)
    assert calls == [3, 1]  # all three targets, then target 0 alone once more
    assert outcome.leaks.table.num_rows == width + 4 and width + 4 <= outcome.leaks.judged < len(case.pool)


@pytest.mark.parametrize("metric", list(Metric))
def test_a_target_whose_second_search_runs_out_too_has_the_whole_pool_judged(tmp_path, metric, monkeypatch):
    topn = 3
    width = topn + leak_search.slack(topn)
    case = flood_case(tmp_path, leaks=2 * width + 5).write()  # more leaks than two searches' widths
    ref = reference(case, metric, 2, topn)
    calls = counted(monkeypatch, "search_range")
    outcome = mine(case, metric, 2, topn, block_rows=6)
    assert_answer(outcome, case, ref, metric)
    assert calls == [3, 1, 1]
    assert outcome.leaks.judged == len(case.pool)  # judge_all: every searchable row
    assert set(outcome.leaks.table.column("source_row").to_pylist()) == set(np.flatnonzero(ref.leak).tolist())


@pytest.mark.parametrize("metric", list(Metric))
def test_rows_left_out_before_the_search_are_never_judged(tmp_path, metric, monkeypatch):
    """exclude_targets: the row naming a target is left out, and judge_all judges every other row."""
    case = flood_case(tmp_path, leaks=flood(3))
    case.pool_names[5] = "t2.png"
    case.write()
    ref = reference(case, metric, 2, 3, exclude_targets=True)
    outcome = mine(case, metric, 2, 3, block_rows=6, exclude_targets=True)
    assert_answer(outcome, case, ref, metric)
    assert outcome.leaks.pool == outcome.leaks.judged == len(case.pool) - 1
    assert 5 not in outcome.pairs.column("source_row").to_pylist()


# --- 4: a pool of leaks only --------------------------------------------------------------------------

@pytest.mark.parametrize("metric", list(Metric))
def test_a_pool_of_leaks_only_mines_nothing(tmp_path, metric):
    rng = np.random.default_rng(8)
    t, v = signs(rng, 2), signs(rng, 2)
    sources = np.concatenate([t, v])
    pool = np.array([flipped(sources[i % 4], i % 3, rng) for i in range(25)], np.float32)
    case = Case(tmp_path, t, v, pool, [f"p{i}.png" for i in range(len(pool))]).write()
    assert reference(case, metric, 2, 3).leak.all()
    outcome = mine(case, metric, 2, 3, block_rows=4)
    assert outcome.mined.num_rows == 0 and outcome.pairs.num_rows == 0
    assert outcome.mined.column_names[0] == "filepath"
    assert outcome.leaks.judged == len(pool) and outcome.leaks.table.num_rows == len(pool)


# --- 5: per-label search -----------------------------------------------------------------------------

@pytest.mark.parametrize("metric", list(Metric))
@pytest.mark.parametrize("case_of", ["near", "flood"])
def test_a_per_label_search_leaves_the_leaks_out_of_each_label(tmp_path, metric, case_of, monkeypatch):
    """Each target's topn among its own label's rows that are no leak; `flood`: target 0's label holds
    more leaks than two searches' widths (searched again by label, then the whole pool judged)."""
    rng = np.random.default_rng(22)
    if case_of == "near":
        case = near_case(tmp_path, seed=21, targets=6, pool=120)
        case.target_labels = ["a", "b", "c", "a", "b", "c"]
        case.pool_labels = rng.choice(["a", "b", "c", "d"], len(case.pool), p=[0.45, 0.25, 0.1, 0.2]).tolist()
    else:
        case = flood_case(tmp_path, leaks=2 * flood(4))  # about 70% of them in target 0's label
        case.target_labels = ["a", "b", "a"]
        case.pool_labels = rng.choice(["a", "b", "d"], len(case.pool), p=[0.7, 0.2, 0.1]).tolist()
    case.write()
    ref = reference(case, metric, 2, 4, per_label=True)
    assert ref.rows != reference(case, metric, 2, 4).rows  # the labels change the answer
    calls = counted(monkeypatch, "search_range")
    outcome = mine(case, metric, 2, 4, block_rows=9, filter_by_label=True, label_mode="per_label")
    assert_answer(outcome, case, ref, metric)
    assert len(calls) == (1 if case_of == "near" else 3)


# --- 6: the kept vectors outgrow their budget ----------------------------------------------------------

@pytest.mark.parametrize("metric", list(Metric))
@pytest.mark.parametrize("leaks", [0, 15, 30])
def test_vectors_read_back_from_the_file_give_the_same_answer(tmp_path, metric, leaks, monkeypatch):
    case = (flood_case(tmp_path, leaks=leaks) if leaks else near_case(tmp_path, seed=31)).write()
    ref = reference(case, metric, 2, 3)
    read_back = counted(monkeypatch, "_pool_rows_vectors")
    assert_answer(mine(case, metric, 2, 3, block_rows=4), case, ref, metric)
    assert read_back == []  # kept: nothing read back
    monkeypatch.setattr(leak_search, "KEEP_BYTES", 8)
    outcome = mine(case, metric, 2, 3, block_rows=4)
    assert_answer(outcome, case, ref, metric)
    assert read_back  # every vector judged was read back from the pool file
    # the histogram's sample is kept whatever the budget: here the whole small pool
    assert len(outcome.leaks.sample_scores) == len(case.pool)


# --- 7: the two scopes agree --------------------------------------------------------------------------

@pytest.mark.parametrize("metric", list(Metric))
@pytest.mark.parametrize("case_of", ["near", "flood"])
def test_the_mined_and_pool_scopes_give_the_same_answer(tmp_path, metric, case_of):
    case = (near_case(tmp_path, seed=41) if case_of == "near" else flood_case(tmp_path, leaks=30)).write()
    threshold = score_at(2, metric)
    mined_scope = mine(case, metric, 2, 4)
    pool = pool_of(case.pool_names, tmp_path, case.target_names)
    found = find_leaks(pool, case.protected, metric, threshold, pool_vectors(tmp_path / "pool.parquet", "embedding", 5))
    pq.write_table(found.table, tmp_path / "leaks.parquet")
    spec = MiningSpec(topn=4, knn_metric=metric, block_rows=7, leaks_parquet=str(tmp_path / "leaks.parquet"))
    pool_scope = mine_files(tmp_path / "pool.parquet", tmp_path / "targets.parquet", spec, NullEvents())
    assert mined_scope.mined.equals(pool_scope.mined)
    assert mined_scope.pairs.equals(pool_scope.pairs)
    assert found.table.num_rows == reference(case, metric, 2, 4).leak.sum()
    every = {row["source_row"]: row for row in found.table.to_pylist()}
    listed = mined_scope.leaks.table.to_pylist()
    assert listed and len(listed) <= len(every)
    for row in listed:
        assert row == every[row["source_row"]]


@pytest.mark.parametrize("metric", list(Metric))
def test_a_file_on_two_rows_is_out_when_either_row_leaks(tmp_path, metric):
    """One filepath on two rows with different vectors: one row a copy of v0 (a leak), the other a
    target's nearest (no leak of its own). leaks_parquet leaves out every row of a listed path, and so
    does the guard in the search: the file is never mined, in either scope."""
    rng = np.random.default_rng(17)
    t, v = signs(rng, 2), signs(rng, 2)
    rows = [v[0].copy(), flipped(t[0], 3, rng)] + [flipped(t[i % 2], 5 + i % 3, rng) for i in range(10)]
    names = ["p.png", "p.png"] + [f"q{i}.png" for i in range(10)]
    case = Case(tmp_path, t, v, np.array(rows, np.float32), names).write()
    mined_scope = mine(case, metric, 0, 2)
    assert "p.png" not in mined_scope.mined.column("filepath").to_pylist()
    pool = pool_of(case.pool_names, tmp_path, case.target_names)
    found = find_leaks(pool, case.protected, metric, score_at(0, metric),
                       pool_vectors(tmp_path / "pool.parquet", "embedding", 5))
    pq.write_table(found.table, tmp_path / "leaks.parquet")
    spec = MiningSpec(topn=2, knn_metric=metric, block_rows=7, leaks_parquet=str(tmp_path / "leaks.parquet"))
    pool_scope = mine_files(tmp_path / "pool.parquet", tmp_path / "targets.parquet", spec, NullEvents())
    assert mined_scope.mined.equals(pool_scope.mined) and mined_scope.pairs.equals(pool_scope.pairs)
    assert mined_scope.searched_rows == pool_scope.searched_rows == len(rows) - 2


# --- 8: byte copies ---------------------------------------------------------------------------------

def test_byte_copies_are_left_out_where_they_would_be_taken_and_listed_as_identical_bytes(tmp_path):
    """Pool files: a byte copy of v0 (protect listing) and one of target t1 under another path, each the
    nearest of a target; a byte copy of v1 far from every target (never taken: never judged); the
    target file t0 itself (compared with the protect listing only: no leak); unrelated files of the same
    size (hashed, and different)."""
    rng = np.random.default_rng(12)
    metric = Metric.cosine
    t, v = signs(rng, 3), signs(rng, 2)
    blobs = {name: rng.bytes(64) for name in ["t0.png", "t1.png", "t2.png", "v0.png", "v1.png"]}
    for name, data in blobs.items():
        (tmp_path / "sets").mkdir(exist_ok=True)
        (tmp_path / "sets" / name).write_bytes(data)
    far = signs(rng, 10)
    files = {"pool/copy_v0.png": (blobs["v0.png"], t[0]),  # t0's nearest, a copy of v0
             "pool/copy_t1.png": (blobs["t1.png"], t[1]),  # t1's nearest, a copy of t1
             "pool/copy_v1.png": (blobs["v1.png"], -t[0]),  # nearest of none
             "sets/t2.png": (blobs["t2.png"], t[2])}  # target t2's own file, t2's nearest
    for i in range(10):
        files[f"pool/p{i}.png"] = (rng.bytes(64), flipped(t[i % 3], 2 + i % 4, rng) if i < 8 else far[i])
    names = list(files)
    for name, (data, _) in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    case = Case(tmp_path, t, v, np.array([vec for _, vec in files.values()], np.float32), names)
    # the targets are listed by their paths under sets/, as the pool names them
    target_names = [f"sets/t{i}.png" for i in range(3)]
    protected = Protected(target_names + ["sets/v0.png", "sets/v1.png"],
                          [tmp_path / n for n in target_names + ["sets/v0.png", "sets/v1.png"]],
                          [TARGETS] * 3 + [VAL] * 2)
    write_embeddings(tmp_path / "targets.parquet", target_names, t, None)
    write_embeddings(tmp_path / "pool.parquet", names, case.pool, None)
    leak_search.write_protected(protected, tmp_path / "protected.parquet")
    outcome = mine(case, metric, None, 2, block_rows=3)

    keys_of = keys(t, case.pool, metric)
    leak = np.isin(names, ["pool/copy_v0.png", "pool/copy_t1.png", "pool/copy_v1.png"])
    keys_of[:, leak] = np.inf
    want = [[int(j) for j in np.lexsort((np.arange(len(names)), line))[:2]] for line in keys_of]
    assert pairs_of(outcome, 3)[0] == want
    mined = outcome.mined.column("filepath").to_pylist()
    assert "sets/t2.png" in mined and not {"pool/copy_v0.png", "pool/copy_t1.png"} & set(mined)
    listed = {row["filepath"]: (row["protected_filepath"], row["protected_listing"], row["kind"])
              for row in outcome.leaks.table.to_pylist()}
    assert listed == {"pool/copy_v0.png": ("sets/v0.png", VAL, "identical_bytes"),
                      "pool/copy_t1.png": ("sets/t1.png", TARGETS, "identical_bytes")}
    assert pc.all(pc.is_null(outcome.leaks.table.column("similarity"))).as_py()


# --- 9: odd sizes --------------------------------------------------------------------------------------

@pytest.mark.parametrize("metric", list(Metric))
@pytest.mark.parametrize(("pool_rows", "topn", "block_rows"), [(7, 3, 2), (6, 10, 4), (12, 3, 1), (1, 2, 5)])
def test_pools_smaller_than_the_search_width(tmp_path, metric, pool_rows, topn, block_rows):
    rng = np.random.default_rng(pool_rows * 100 + topn)
    t, v = signs(rng, 3), signs(rng, 2)
    sources = np.concatenate([t, v])
    pool = np.array([flipped(sources[i % 5], (i * 3) % 6, rng) for i in range(pool_rows)], np.float32)
    case = Case(tmp_path, t, v, pool, [f"p{i}.png" for i in range(pool_rows)]).write()
    ref = reference(case, metric, 2, topn)
    outcome = mine(case, metric, 2, topn, block_rows=block_rows)
    assert_answer(outcome, case, ref, metric)


@pytest.mark.parametrize("metric", list(Metric))
def test_without_a_protect_listing_a_row_naming_a_target_is_never_a_vector_leak(tmp_path, metric):
    """The targets only protected: the pool row naming t0 (t0's own vector) has nothing to be compared
    with, so it stays, t0's nearest; t0's near copies under other names are leaks."""
    rng = np.random.default_rng(6)
    t = signs(rng, 2)
    rows = [flipped(t[i % 2], i % 5, rng) for i in range(20)] + [t[0]]
    case = Case(tmp_path, t, np.zeros((0, D), np.float32), np.array(rows, np.float32),
                [f"p{i}.png" for i in range(20)] + ["t0.png"]).write()
    ref = reference(case, metric, 2, 3)
    assert not ref.leak[20] and ref.leak.any()
    outcome = mine(case, metric, 2, 3, block_rows=4)
    assert_answer(outcome, case, ref, metric)
    assert ref.rows[0][0] == 20


def test_no_targets_mine_nothing(tmp_path):
    rng = np.random.default_rng(2)
    case = Case(tmp_path, np.zeros((0, D), np.float32), signs(rng, 2), signs(rng, 9),
                [f"p{i}.png" for i in range(9)]).write()
    outcome = mine(case, Metric.cosine, 2, 3, block_rows=4)
    assert outcome.mined.num_rows == 0 and outcome.pairs.num_rows == 0


def test_all_zero_rows_judged_as_leaks_are_not_taken_from_the_searched_count_twice(tmp_path):
    """Target t0 with many near copies (leaks: the whole pool gets judged), 5 rows opposite-ish to it
    (similarity -0.25: no leak, the only rows left to search) and 2 all-zero rows (left out of a cosine
    search, and leaks: similarity 0 reaches leak_similarity=0)."""
    rng = np.random.default_rng(4)
    t = signs(rng, 1)
    copies = flood(1)
    rows = [flipped(t[0], 1, rng) for _ in range(copies)] + [flipped(t[0], 10, rng) for _ in range(5)]
    pool = np.array(rows[:12] + [np.zeros(D, np.float32)] + rows[12:] + [np.zeros(D, np.float32)], np.float32)
    case = Case(tmp_path, t, np.zeros((0, D), np.float32), pool, [f"p{i}.png" for i in range(len(pool))]).write()
    spec = MiningSpec(topn=1, knn_metric=Metric.cosine, block_rows=6, leak_similarity=0.0,
                      protected_parquet=str(tmp_path / "protected.parquet"))
    outcome = mine_files(tmp_path / "pool.parquet", tmp_path / "targets.parquet", spec, NullEvents())
    # every searchable row judged (the all-zero rows are never searched under cosine, so never judged)
    assert outcome.leaks.judged == len(pool) - 2
    assert outcome.mined.column("filepath").to_pylist() == [f"p{copies + 1}.png"]
    assert outcome.summary.zero_vectors == 2
    assert outcome.searched_rows == outcome.summary.pool == 5  # got 3
