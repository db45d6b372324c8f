"""Near-duplicate collapse of the mined set: the keep rule against a brute-force walk, end to end, refusals."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import THUMB_ID, write_embeddings, write_image
from deft_mine.backends.local import write_mining
from deft_mine.backends.base import MineOutputs
from deft_mine.backends.ray_mine import plan_shards
from deft_mine.cli import main as cli_main
from deft_mine.engine.dedup import collapse
from deft_mine.engine.mining import finish, merge, mine_files, prepare, search_range
from deft_mine.errors import DeftError
from deft_mine.report.render import count_words
from deft_mine.events import NullEvents
from deft_mine.schemas.specs import Metric, MiningSpec, load_spec
from deft_mine.task import main as task_main
from deft_mine.tools.mine import mine
from deft_mine.tools.run import run


def brute_walk(vectors: np.ndarray, metric: Metric, threshold: float) -> tuple[list[int], list[float]]:
    """The rule as written: in order, drop an image within the threshold of any kept one (mapped to
    the nearest kept, the earliest on a tie); one pair at a time, in float64."""
    x = vectors.astype(np.float32)
    if metric is Metric.cosine:
        x = x / np.maximum(np.sqrt(np.einsum("ij,ij->i", x, x)), np.finfo(np.float32).tiny)[:, None]
    x = x.astype(np.float32).astype(np.float64)
    kept: list[int] = []
    duplicate_of, scores = [-1] * len(x), [float("nan")] * len(x)
    for i in range(len(x)):
        best = None
        for j in kept:
            score = {Metric.cosine: lambda: float((x[i] * x[j]).sum()),
                     Metric.euclidean: lambda: float(np.sqrt(np.square(x[i] - x[j]).sum())),
                     Metric.manhattan: lambda: float(np.abs(x[i] - x[j]).sum())}[metric]()
            within = score >= threshold if metric is Metric.cosine else score <= threshold
            nearer = best is None or (score > best[1] if metric is Metric.cosine else score < best[1])
            if within and nearer:
                best = (j, score)
        if best is None:
            kept.append(i)
        else:
            duplicate_of[i], scores[i] = best
    return duplicate_of, scores


@pytest.mark.parametrize("metric,threshold", [(Metric.cosine, 0.9), (Metric.cosine, 0.5),
                                              (Metric.euclidean, 1.0), (Metric.manhattan, 2.5)])
@pytest.mark.parametrize("seed", range(6))
def test_the_collapse_equals_the_brute_force_walk(metric, threshold, seed):
    rng = np.random.default_rng(seed)
    n, d = int(rng.integers(1, 140)), int(rng.integers(1, 24))  # odd sizes, blocks cut anywhere
    centres = rng.normal(size=(max(1, n // 5), d))
    vectors = np.round(centres[rng.integers(0, len(centres), n)] + rng.normal(scale=0.25, size=(n, d)), 1)
    vectors[rng.integers(0, n, n // 4)] = vectors[0]  # exact copies: ties in similarity
    got = collapse(vectors.astype(np.float32), metric, threshold, block_rows=int(rng.integers(1, 40)))
    duplicate_of, scores = brute_walk(vectors, metric, threshold)
    assert got.duplicate_of.tolist() == duplicate_of
    np.testing.assert_allclose(got.scores, scores, rtol=0, atol=1e-12)


def test_a_chain_keeps_its_ends_and_ties_go_to_the_earliest_kept():
    angle = np.radians([0, 15, 30])  # A≈B and B≈C within 20 degrees, A and C not
    chain = np.stack([np.cos(angle), np.sin(angle)], axis=1)
    got = collapse(chain, Metric.cosine, float(np.cos(np.radians(20))))
    assert got.duplicate_of.tolist() == [-1, 0, -1]  # A kept, B dropped into A, C kept
    # B lies exactly between two kept images A and C: it goes to A, the earlier
    line = np.array([[0.0], [2.0], [1.0]])
    got = collapse(line, Metric.euclidean, 1.0)
    assert got.duplicate_of.tolist() == [-1, -1, 0] and got.scores[2] == 1.0
    assert collapse(line, Metric.manhattan, 0.999).removed == 0  # the threshold itself is within, no more


def _pool(tmp_path, metric_copies: float = 0.001):
    rng = np.random.default_rng(3)
    base = rng.normal(size=(12, 16))
    pool = np.repeat(base, 3, axis=0) + rng.normal(scale=metric_copies, size=(36, 16))  # three near copies each
    targets = base[:4] + rng.normal(scale=0.3, size=(4, 16))
    write_embeddings(tmp_path / "pool.parquet", pool, identity=THUMB_ID)
    write_embeddings(tmp_path / "targets.parquet", targets, identity=THUMB_ID)
    return tmp_path / "pool.parquet", tmp_path / "targets.parquet"


@pytest.mark.parametrize("metric,key,threshold", [("cosine", "dedup_similarity", 0.99),
                                                  ("euclidean", "dedup_distance", 0.1),
                                                  ("manhattan", "dedup_distance", 0.3)])
def test_mine_drops_the_near_copies_and_lists_them(tmp_path, metric, key, threshold):
    source, target = _pool(tmp_path)
    common = dict(source_parquet=str(source), target_parquet=str(target))
    plain = mine(output_parquet=str(tmp_path / "a" / "mined.parquet"),
                 overrides={"topn": 8, "knn_metric": metric, **common})
    done = mine(output_parquet=str(tmp_path / "b" / "mined.parquet"),
                overrides={"topn": 8, "knn_metric": metric, key: threshold, **common})
    before = pq.read_table(plain.output_parquet)
    after = pq.read_table(done.output_parquet)
    near = pq.read_table(tmp_path / "b" / "near_duplicates.parquet")
    assert done.near_duplicates_parquet == str(tmp_path / "b" / "near_duplicates.parquet")
    assert not (tmp_path / "a" / "near_duplicates.parquet").exists() and "near_duplicates_removed" not in plain.summary
    # the reference: the plain mined order walked by brute force over the pool rows' vectors
    vectors = np.asarray(pq.read_table(source).column("embedding").to_pylist())
    row = {p: i for i, p in reversed(list(enumerate(pq.read_table(source).column("filepath").to_pylist())))}
    paths = before.column("filepath").to_pylist()
    duplicate_of, scores = brute_walk(vectors[[row[p] for p in paths]], Metric(metric), threshold)
    assert after.column("filepath").to_pylist() == [p for p, d in zip(paths, duplicate_of) if d < 0]
    assert near.column_names == ["filepath", "duplicate_of", "similarity" if metric == "cosine" else "distance", "kind"]
    assert set(near.column("kind").to_pylist()) == {"similar"}  # no file: no bytes to repeat
    assert near.column("filepath").to_pylist() == [p for p, d in zip(paths, duplicate_of) if d >= 0]
    assert near.column("duplicate_of").to_pylist() == [paths[d] for d in duplicate_of if d >= 0]
    np.testing.assert_allclose(near.column(2).to_numpy(), [s for s, d in zip(scores, duplicate_of) if d >= 0],
                               atol=1e-12, rtol=0)
    assert near.num_rows > 0 and done.summary["near_duplicates_removed"] == near.num_rows
    assert done.mined == after.num_rows == before.num_rows - near.num_rows
    summary = (tmp_path / "b" / "mining_summary.txt").read_text().splitlines()
    assert summary.index(f"near_duplicates_removed: {near.num_rows}") == summary.index(
        f"duplicates_removed: {plain.summary['duplicates_removed']}") + 1


def test_a_threshold_that_reaches_everything_leaves_one_image(tmp_path):
    source, target = _pool(tmp_path)
    for metric, key, threshold in (("cosine", "dedup_similarity", -1.0), ("euclidean", "dedup_distance", 1e6)):
        done = mine(source_parquet=str(source), target_parquet=str(target),
                    output_parquet=str(tmp_path / metric / "mined.parquet"),
                    overrides={"topn": 10, "knn_metric": metric, key: threshold})
        first = pq.read_table(tmp_path / metric / "near_duplicates.parquet").column("duplicate_of").unique()
        assert done.mined == 1 and first.to_pylist() == pq.read_table(done.output_parquet).column(
            "filepath").to_pylist()


def test_sharded_searches_finish_as_the_local_one(tmp_path):
    """Ray mining runs prepare, a search per shard, merge, finish and write_mining: the same files."""
    source, target = _pool(tmp_path)
    spec = MiningSpec(topn=9, dedup_similarity=0.99, block_rows=5)
    local = mine_files(source, target, spec, NullEvents())
    prep = prepare(source, target, spec)
    parts = [search_range(spec, source, target, prep.queries, prep.drop[a:b], a, b, 16 if a else None)
             for a, b in plan_shards(prep.total, spec.block_rows, 3)]
    sharded = finish(prep, merge(parts, spec.topn))
    write_mining(sharded, MineOutputs(tmp_path / "ray" / "mined.parquet"))
    assert sharded.mined.equals(local.mined) and sharded.near_duplicates.equals(local.near_duplicates)
    assert pq.read_table(tmp_path / "ray" / "near_duplicates.parquet").equals(local.near_duplicates)


@pytest.mark.parametrize("overrides,field", [
    ({"dedup_similarity": 0.9, "knn_metric": "euclidean"}, "dedup_similarity"),
    ({"dedup_distance": 0.5}, "dedup_distance"),  # cosine
    ({"dedup_similarity": 1.5}, "dedup_similarity"),
    ({"dedup_distance": -0.1, "knn_metric": "manhattan"}, "dedup_distance"),
    ({"dedup_distance": 0.9, "mode": "unique", "desired_unique_count": 5}, "dedup_distance"),  # cosine
])
def test_a_threshold_on_the_wrong_scale_or_mode_is_refused(overrides, field):
    with pytest.raises(DeftError) as refused:
        load_spec(MiningSpec, None, [f"{k}={v}" for k, v in overrides.items()])
    assert refused.value.code in {"spec_invalid", "spec_invalid_value"} and field in refused.value.message


def test_a_spec_without_the_keys_reads_as_before(tmp_path):
    from deft_mine.schemas.specs import spec_to_yaml

    assert "dedup" not in spec_to_yaml(MiningSpec())
    assert "dedup_similarity: 0.95" in spec_to_yaml(MiningSpec(dedup_similarity=0.95))


def _images(tmp_path):
    """Two targets and a pool of six pictures, each twice: 2-4 byte for byte (identical files), 5-7
    re-encoded (the same pixels in other bytes: near copies, similarity 1)."""
    for i in range(8):
        write_image(tmp_path / "imgs" / f"{i}.png", seed=i)
    for i in range(2, 5):
        shutil.copy(tmp_path / "imgs" / f"{i}.png", tmp_path / "imgs" / f"{i}_copy.png")
    for i in range(5, 8):
        with Image.open(tmp_path / "imgs" / f"{i}.png") as img:
            img.save(tmp_path / "imgs" / f"{i}_copy.png", compress_level=1)
    (tmp_path / "targets.csv").write_text("filepath\nimgs/0.png\nimgs/1.png\n")
    (tmp_path / "pool.csv").write_text("filepath\n" + "".join(f"imgs/{i}.png\nimgs/{i}_copy.png\n"
                                                               for i in range(2, 8)))
    return tmp_path / "targets.csv", tmp_path / "pool.csv"


def test_run_collapses_before_history_and_reports_it(tmp_path):
    targets, pool = _images(tmp_path)
    ledger = tmp_path / "ledger.json"
    done = run(targets, pool, run_dir=tmp_path / "r", history=ledger,
               overrides={"model": "thumbnail", "topn": 12, "dedup_similarity": 0.999})
    folder = tmp_path / "r"
    near = pq.read_table(folder / "near_duplicates.parquet")
    candidates = pq.read_table(folder / "mined_candidates.parquet").column("filepath").to_pylist()
    assert near.num_rows == 6 and not set(near.column("filepath").to_pylist()) & set(candidates)
    assert done.select.candidates == len(candidates) == 6 and done.mined == 6  # the budget never met a copy
    assert near.column("kind").to_pylist().count("identical_bytes") == 3
    manifest = json.loads((folder / "run.json").read_text())
    assert manifest["mining"]["summary"]["near_duplicates_removed"] == 3
    assert manifest["mining"]["summary"]["identical_images"] == 3
    assert manifest["mining_spec"]["dedup_similarity"] == 0.999
    report = (folder / "Mining_Report.md").read_text()
    assert "Near-duplicate collapse (`dedup_similarity` = 0.999)" in report and "3 images lay within" in report
    assert "Identical files: 3 mined images repeated the bytes" in report
    assert 600 <= done.report.words <= 1200 and done.report.words == count_words(report)


def test_the_cli_and_the_task_entrypoint_take_the_key(tmp_path, capsys):
    targets, pool = _images(tmp_path)
    assert cli_main(["run", "--targets", str(targets), "--source", str(pool), "--run-dir", str(tmp_path / "c"),
                     "model=thumbnail", "topn=12", "dedup_similarity=0.95", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["mine"]["summary"]["near_duplicates_removed"] == 3 and result["mined"] == 6
    assert result["mine"]["summary"]["identical_images"] == 3
    folder = tmp_path / "c"
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"source_parquet: {folder / 'source_embeddings.parquet'}\n"
                    f"target_parquet: {folder / 'target_embeddings.parquet'}\n"
                    f"output_parquet: {tmp_path / 't' / 'mined.parquet'}\ntopn: 12\n")
    # the pool's relative paths resolve against its listing's folder, which the task is told
    assert task_main(["tmm", "nearest_neighbors", "-e", str(spec), "dedup_similarity=0.95",
                      f"pool_image_root={tmp_path}"]) == 0
    assert pq.read_table(tmp_path / "t" / "near_duplicates.parquet").equals(
        pq.read_table(folder / "near_duplicates.parquet"))
    assert "near_duplicates_removed: 3\nidentical_images: 3" in (tmp_path / "t" / "mining_summary.txt").read_text()


def brute_identical(paths: list[str], root) -> list[int]:
    """Per path (in order), the first earlier path whose file's bytes are equal, read whole (-1: none)."""
    seen: dict[bytes, int] = {}
    out = []
    for i, path in enumerate(paths):
        full = root / path
        data = full.read_bytes() if full.is_file() else None
        first = seen.setdefault(data, i) if data is not None else i
        out.append(first if first != i else -1)
    return out


def test_identical_files_are_mined_once_with_the_threshold_off(tmp_path):
    targets, pool = _images(tmp_path)
    done = run(targets, pool, run_dir=tmp_path / "r", overrides={"model": "thumbnail", "topn": 12})
    folder = tmp_path / "r"
    plain = pq.read_table(folder / "mined_pairs.parquet").column("filepath").to_pylist()
    order = list(dict.fromkeys(plain))  # the mined order before the collapse: target order, then rank
    twin = brute_identical(order, tmp_path)
    near = pq.read_table(folder / "near_duplicates.parquet")
    assert near.column("filepath").to_pylist() == [p for p, t in zip(order, twin) if t >= 0]
    assert near.column("duplicate_of").to_pylist() == [order[t] for t in twin if t >= 0]
    assert near.column("kind").to_pylist() == ["identical_bytes"] * 3 and near.column("similarity").null_count == 3
    assert pq.read_table(folder / "mined.parquet").column("filepath").to_pylist() == \
        [p for p, t in zip(order, twin) if t < 0]
    assert done.mine.summary["identical_images"] == 3 and "near_duplicates_removed" not in done.mine.summary
    assert done.mined == 9 and done.mine.near_duplicates_parquet == str(folder / "near_duplicates.parquet")
    assert "identical_images: 3" in (folder / "mining_summary.txt").read_text()


def test_a_pool_without_byte_copies_reads_as_before(tmp_path):
    targets, pool = _images(tmp_path)
    pool.write_text("filepath\n" + "".join(f"imgs/{i}.png\nimgs/{i}_copy.png\n" for i in range(5, 8)))
    done = run(targets, pool, run_dir=tmp_path / "r", overrides={"model": "thumbnail", "topn": 12})
    assert not (tmp_path / "r" / "near_duplicates.parquet").exists() and done.mined == 6
    assert "identical_images" not in done.mine.summary and done.mine.near_duplicates_parquet is None


def test_identical_against_brute_force_on_files(tmp_path):
    from deft_mine.engine.dedup import identical

    rng = np.random.default_rng(0)
    names = []
    for i in range(40):  # few distinct contents, several sizes shared by different bytes
        content = bytes(rng.integers(0, 4, int(rng.integers(1, 4)), dtype=np.uint8))
        (tmp_path / f"{i}.bin").write_bytes(content)
        names.append(f"{i}.bin")
    names += ["missing.bin", "0.bin"]  # an unreadable file, and a path repeated
    assert identical(names, tmp_path).tolist() == brute_identical(names, tmp_path)


def test_a_byte_copy_of_an_image_the_walk_dropped_names_the_image_kept():
    """a, b ~ a (the walk drops b), b2 = bytes of b: b2 must name a, which is kept, never b."""
    from deft_mine.engine.dedup import Collapse, with_identical

    twin = np.array([-1, -1, 1])  # b2 (row 2) repeats b's bytes (row 1)
    walk = Collapse(np.array([-1, 0]), np.array([np.nan, 0.97]))  # over the rows left, a and b: b -> a
    found = with_identical(twin, walk)
    assert found.duplicate_of.tolist() == [-1, 0, 0] and found.keep.tolist() == [True, False, False]
    assert all(found.keep[found.duplicate_of[~found.keep]])  # every dropped image names a kept one


# --- mode=unique: the rule while claiming --------------------------------------------------------

def _unit32(x):
    x = np.asarray(x, dtype=np.float32)
    return (x / np.maximum(np.sqrt(np.einsum("ij,ij->i", x, x)), np.finfo(np.float32).tiny)[:, None]).astype(np.float64)


def ref_unique(P, T, budget, metric, threshold, factor=5):
    """tests/test_unique_matching.py's ref_global walked with the near-duplicate rule (pool paths
    unique): a row within the threshold of a held row is not free; within a pass a target skips a
    row within it of a row an earlier satisfied target of the pass, or itself, picked before; when
    the targets that failed saw every free row, the share drops to the most any of them took.
    Returns ({row: (target, distance)}, rows set aside)."""
    import math

    P, T = _unit32(P), _unit32(T)

    def dist(q, x):
        return {"cosine": lambda: 1.0 - float(q @ x), "euclidean": lambda: math.sqrt(float(((q - x) ** 2).sum())),
                "manhattan": lambda: float(np.abs(q - x).sum())}[metric]()

    def near(a, b):
        if metric == "cosine":
            return float(P[a] @ P[b]) >= threshold
        return dist(P[a], P[b]) <= threshold

    got, held, blocked = {}, [], set()
    topn, current, number = math.ceil(budget / len(T)), list(range(len(T))), 0
    while len(got) < budget:
        blocked |= {r for r in range(len(P)) if r not in got and any(near(r, h) for h in held)}
        free = [r for r in range(len(P)) if r not in got and r not in blocked]
        if not free:
            break
        share = min(topn, len(free))
        number += 1
        k = min(factor * number * share, len(free))
        taken, picks, failed, found = [], [], [], []
        for t in current:
            ranked = sorted(free, key=lambda r: (dist(T[t], P[r]), r))[:k]
            tentative = []
            for r in ranked:
                if len(tentative) == share:
                    break
                if r in taken or r in tentative or any(near(r, x) for x in taken + tentative):
                    continue
                tentative.append(r)
            if len(tentative) < share:
                failed.append(t)
                found.append(len(tentative))
                continue
            taken += tentative
            picks += [(dist(T[t], P[r]), f"p{r:03d}", r, t) for r in tentative]
        for d, _, r, t in sorted(picks)[:budget - len(got)]:
            got[r] = (t, d)
            held.append(r)
        if failed and k >= len(free):  # they saw every free row: the share drops to what they could take
            topn = max(1, max(found))
        current = failed if failed else (list(range(len(T))) if len(got) < budget else [])
    return got


@pytest.mark.parametrize("metric,threshold", [("cosine", 0.95), ("euclidean", 0.35), ("manhattan", 1.2)])
@pytest.mark.parametrize("seed", range(4))
def test_unique_claiming_skips_near_copies_as_the_brute_force_does(tmp_path, metric, threshold, seed):
    from deft_mine.engine.unique_matching import unique_match
    from deft_mine.schemas.specs import UniqueMatchingSpec

    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(12, 6))
    P = centres[rng.integers(0, 12, 80)] + rng.normal(scale=0.15, size=(80, 6))  # clusters of near copies
    T = centres[:4] + rng.normal(scale=0.3, size=(4, 6))
    write_embeddings(tmp_path / "pool.parquet", P)
    write_embeddings(tmp_path / "targets.parquet", T)
    paths = pq.read_table(tmp_path / "pool.parquet").column("filepath").to_pylist()
    budget = int(rng.integers(3, 14))
    key = "dedup_similarity" if metric == "cosine" else "dedup_distance"
    spec = UniqueMatchingSpec(source_path=str(tmp_path / "pool.parquet"), target_path=str(tmp_path / "targets.parquet"),
                              output_dir=str(tmp_path / "out"), desired_unique_count=budget, distance_metric=metric,
                              candidate_expansion_factor=int(rng.integers(1, 4)), block_rows=7, **{key: threshold})
    outcome = unique_match(spec)
    reference = ref_unique(P, T, budget, metric, threshold, spec.candidate_expansion_factor)
    got = dict(zip(outcome.selected.column("filepath").to_pylist(), outcome.selected.column("distance").to_pylist()))
    assert sorted(got) == sorted(paths[r] for r in reference)
    for r, (_, d) in reference.items():
        assert got[paths[r]] == pytest.approx(d, abs=1e-5)
    # no two selected files lie within the threshold of each other
    x = _unit32(P[[paths.index(p) for p in got]])
    scores = x @ x.T if metric == "cosine" else None
    if scores is not None:
        assert (scores[~np.eye(len(x), dtype=bool)] < threshold).all()
    near = outcome.near_duplicates
    assert near is not None and outcome.summary["near_duplicates_removed"] == near.num_rows
    assert set(near.column("duplicate_of").to_pylist()) <= set(got) and not set(near.column("filepath").to_pylist()) & set(got)


def test_nvidias_unique_matching_is_never_asked_for_the_rule(tmp_path):
    from deft_mine.backends.docker import _refuse_ours_only
    from deft_mine.schemas.specs import UniqueMatchingSpec

    base = dict(source_path="p", target_path="t", output_dir="o", desired_unique_count=3, distance_metric="cosine")
    _refuse_ours_only(UniqueMatchingSpec(**base), "nvcr.io/nvidia/tao/tao-toolkit:data-services")
    with pytest.raises(DeftError) as refused:
        _refuse_ours_only(UniqueMatchingSpec(**base, dedup_similarity=0.9), "nvcr.io/nvidia/tao/tao-toolkit:data-services")
    assert refused.value.code == "backend_unsupported" and "dedup_similarity" in refused.value.message


def test_run_mode_unique_fills_the_budget_with_distinct_images(tmp_path):
    targets, pool = _images(tmp_path)
    done = run(targets, pool, run_dir=tmp_path / "u", overrides={
        "model": "thumbnail", "mode": "unique", "desired_unique_count": 6, "dedup_similarity": 0.999})
    mined = pq.read_table(tmp_path / "u" / "mined.parquet").column("filepath").to_pylist()
    assert done.mined == 6 and sorted(p.replace("_copy", "") for p in mined) == [f"imgs/{i}.png" for i in range(2, 8)]
    near = list((tmp_path / "u").glob("**/near_duplicates.parquet"))
    assert len(near) == 1 and pq.read_table(near[0]).num_rows == 6
    plain = run(targets, pool, run_dir=tmp_path / "p", overrides={
        "model": "thumbnail", "mode": "unique", "desired_unique_count": 6})
    assert len({p.replace("_copy", "") for p in pq.read_table(plain.mined_parquet).column("filepath").to_pylist()}) < 6


def _unique_spec(tmp_path, P, T, budget, **keys):
    from deft_mine.schemas.specs import UniqueMatchingSpec

    write_embeddings(tmp_path / "pool.parquet", P)
    write_embeddings(tmp_path / "targets.parquet", T)
    return UniqueMatchingSpec(source_path=str(tmp_path / "pool.parquet"), target_path=str(tmp_path / "targets.parquet"),
                              output_dir=str(tmp_path / "out"), desired_unique_count=budget, **keys)


@pytest.mark.parametrize("dedup", [{"dedup_similarity": 0.95}, {}])
def test_a_lone_target_over_a_pool_with_a_near_pair_gets_every_usable_image(tmp_path, dedup):
    """Pool A, A2 (a near copy of A), C; one target; a budget of 3. With the rule the target can
    take 2 (A, C), not its share of 3: it must get those two, and the shortfall of 1 warned."""
    from deft_mine.engine.unique_matching import unique_match

    P = np.array([[1.0, 0.0, 0.0], [1.0, 0.01, 0.0], [0.0, 1.0, 0.0]])
    spec = _unique_spec(tmp_path, P, np.array([[1.0, 0.2, 0.0]]), 3, distance_metric="cosine", **dedup)
    outcome = unique_match(spec)
    paths = pq.read_table(tmp_path / "pool.parquet").column("filepath").to_pylist()
    got = sorted(outcome.selected.column("filepath").to_pylist())
    if dedup:
        assert got == sorted([paths[1], paths[2]])  # A2 lies nearer the target than A: it is held, A set aside
        assert [s.as_dict() for s in outcome.shortfall] == [
            {"group": "global", "wanted": 3, "got": 2, "missing": 1, "reason": "pool_spent"}]
        assert [w.code for w in outcome.warnings] == ["unique_count_short"]
        assert outcome.near_duplicates.column("filepath").to_pylist() == [paths[0]]
    else:
        assert got == sorted(paths) and not outcome.shortfall


@pytest.mark.parametrize("seed", range(12))
def test_small_pools_and_budgets_over_them_match_the_brute_force(tmp_path, seed):
    """Few targets, pools of near-copy clusters, budgets up to past the pool: where the targets
    cannot fill their share for the near copies, they still take what they can; over the pool,
    every pool file is selected or set aside as a near copy of one selected."""
    from deft_mine.engine.unique_matching import unique_match

    rng = np.random.default_rng(1000 + seed)
    metric = ["cosine", "euclidean", "manhattan"][seed % 3]
    threshold = {"cosine": 0.95, "euclidean": 0.35, "manhattan": 1.2}[metric]
    n, targets = int(rng.integers(3, 20)), int(rng.integers(1, 4))
    centres = rng.normal(size=(5, 6))
    P = centres[rng.integers(0, 5, n)] + rng.normal(scale=0.15, size=(n, 6))
    T = centres[:targets] + rng.normal(scale=0.3, size=(targets, 6))
    budget = int(rng.integers(1, n + 4))
    key = "dedup_similarity" if metric == "cosine" else "dedup_distance"
    spec = _unique_spec(tmp_path, P, T, budget, distance_metric=metric,
                        candidate_expansion_factor=int(rng.integers(1, 4)), block_rows=5, **{key: threshold})
    outcome = unique_match(spec)
    paths = pq.read_table(tmp_path / "pool.parquet").column("filepath").to_pylist()
    reference = ref_unique(P, T, budget, metric, threshold, spec.candidate_expansion_factor)
    got = dict(zip(outcome.selected.column("filepath").to_pylist(), outcome.selected.column("distance").to_pylist()))
    assert sorted(got) == sorted(paths[r] for r in reference) and got
    for r, (_, d) in reference.items():
        assert got[paths[r]] == pytest.approx(d, abs=1e-5)
    set_aside = set(outcome.near_duplicates.column("filepath").to_pylist())
    if budget >= n:
        assert set(got) | set_aside == set(paths) and not set(got) & set_aside
    assert bool(outcome.shortfall) == (len(got) < budget)


def test_mine_over_the_roots_refuses_a_pool_naming_images_outside_them(tmp_path):
    """Attack: an embedding parquet naming /etc files, so that the byte check (identical_images)
    would stat and hash them for a client confined to its roots: refused, nothing written."""
    from deft_mine.tools.guards import PathPolicy

    inside = tmp_path / "inside"
    inside.mkdir()
    write_embeddings(inside / "pool.parquet", np.eye(3), filepaths=["/etc/passwd", "/etc/hostname", "a.png"])
    write_embeddings(inside / "t.parquet", np.eye(3)[:1], filepaths=["t.png"])
    with pytest.raises(DeftError) as err:
        mine(inside / "pool.parquet", inside / "t.parquet", inside / "out.parquet", policy=PathPolicy([inside]))
    assert err.value.code == "path_outside_roots" and "/etc/passwd" in err.value.message
    assert not (inside / "out.parquet").exists()


# --- the report: collapsed images per label, and the groups drawn ------------------------------------

def _labelled_images(tmp_path):
    """_images with labels: two classes, one of them spelled two ways in the pool (`b` and ` B`)."""
    targets, pool = _images(tmp_path)
    targets.write_text("filepath,label\nimgs/0.png,a\nimgs/1.png,b\n")
    spelled = {2: ("a", "a"), 3: ("b", '" B"'), 4: ("a", "a"), 5: ("b", "b"), 6: ("a", "a"), 7: ('" B"', "b")}
    pool.write_text("filepath,label\n" + "".join(f"imgs/{i}.png,{one}\nimgs/{i}_copy.png,{two}\n"
                                                 for i, (one, two) in spelled.items()))
    return targets, pool


def _label_table(report: str) -> tuple[list[str], dict[str, list[str]]]:
    """The Per-Label Breakdown's table: its column titles, and each row's cells by its label."""
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| Label | Targets |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0].strip("`")] = cells
    return header, rows


def _tile_box(row: int, column: int) -> tuple[int, int]:
    """Where contact_sheet puts a tile's top-left corner."""
    from deft_mine.report.pictures import CAPTION_LINES, GAP, LINE, TILE

    return GAP + column * (TILE + GAP), 36 + row * (TILE + 6 + CAPTION_LINES * LINE + GAP)


def _thumbnail(path):
    """A tile's picture of an image: the image fitted into the tile, centred."""
    from PIL import ImageOps

    from deft_mine.report.pictures import TILE

    with Image.open(path) as img:
        thumb = ImageOps.contain(img.convert("RGB"), (TILE, TILE), method=Image.Resampling.BICUBIC)
    return np.asarray(thumb), ((TILE - thumb.width) // 2, (TILE - thumb.height) // 2)


def _tile_pixels(sheet, row, column, thumb, offset):
    x, y = _tile_box(row, column)
    x, y = x + offset[0], y + offset[1]
    return np.asarray(sheet)[y:y + thumb.shape[0], x:x + thumb.shape[1]]


def test_the_report_counts_the_collapsed_images_per_label_and_draws_their_groups(tmp_path):
    from deft_mine.report.pictures import CAPTION_LINES, GAP, LINE, NEAR_SHEET_COPIES, TILE

    targets, pool = _labelled_images(tmp_path)
    done = run(targets, pool, run_dir=tmp_path / "r", overrides={"model": "thumbnail", "topn": 12,
                                                                 "dedup_similarity": 0.999})
    folder = tmp_path / "r"
    near = pq.read_table(folder / "near_duplicates.parquet").to_pylist()
    assert len(near) == 6 and done.mine.summary["near_duplicates_removed"] == 3
    # the reference: each collapsed image's own pool label, compared as the container compares labels
    table = pcsv.read_csv(pool)
    label_of = dict(zip(table.column("filepath").to_pylist(), table.column("label").to_pylist()))
    expected: dict[str, int] = {}
    for row in near:
        key = str(label_of[row["filepath"]]).strip().upper()
        expected[key] = expected.get(key, 0) + 1
    assert len(expected) == 2  # both classes lost images: the test sees both counted
    report = (folder / "Mining_Report.md").read_text()
    header, rows = _label_table(report)
    assert header[-1] == "Collapsed" and set(rows) == {"a", "b"}  # ` B` counted as `b`, the table's name
    got = {label.upper(): int(cells[-1]) for label, cells in rows.items()}
    assert got == expected and sum(got.values()) == len(near)
    assert "*Collapsed* counts the images of `near_duplicates.parquet`" in report
    assert 600 <= done.report.words <= 1200 and done.report.words == count_words(report)

    # the picture: one row per kept image (in the file's order), its collapsed images beside it
    assert "near_duplicates.png" in done.report.pictures
    assert "![Mined images kept beside the ones collapsed into them](near_duplicates.png)" in report
    groups: dict[str, list[str]] = {}
    for row in near:
        groups.setdefault(row["duplicate_of"], []).append(row["filepath"])
    with Image.open(folder / "near_duplicates.png") as img:
        assert img.format == "PNG" and img.mode == "RGB"
        sheet = img.copy()
    columns = 1 + min(NEAR_SHEET_COPIES, max(len(v) for v in groups.values()))
    assert sheet.size == (max(GAP + columns * (TILE + GAP), 360),
                          36 + len(groups) * (TILE + 6 + CAPTION_LINES * LINE + GAP) + GAP)
    for r, (kept, dropped) in enumerate(groups.items()):
        for c, name in enumerate([kept] + dropped[:NEAR_SHEET_COPIES]):
            thumb, offset = _thumbnail(tmp_path / name)
            assert np.array_equal(_tile_pixels(sheet, r, c, thumb, offset), thumb), (r, c, name)


def test_images_outside_the_roots_are_grey_and_a_failed_picture_is_a_warning(tmp_path):
    from deft_mine.report import write_report
    from deft_mine.report.pictures import PLACEHOLDER, TILE

    targets, pool = _labelled_images(tmp_path)
    run(targets, pool, run_dir=tmp_path / "r", overrides={"model": "thumbnail", "topn": 12, "dedup_similarity": 0.999})
    folder = tmp_path / "r"
    result = write_report(folder, NullEvents(), image_allowed=lambda path: False)
    assert "near_duplicates.png" in result.pictures
    with Image.open(folder / "near_duplicates.png") as img:
        sheet = np.asarray(img.convert("RGB"))
    for c in range(2):  # the kept image and its first collapsed one: never opened, a grey tile
        x, y = _tile_box(0, c)
        assert tuple(sheet[y + TILE // 4, x + 4]) == PLACEHOLDER
    # a picture that cannot be written: a warning, the report still written (its table too)
    (folder / "near_duplicates.png").unlink()
    (folder / "near_duplicates.png").mkdir()
    result = write_report(folder, NullEvents())
    failed = [w for w in result.warnings if w.code == "picture_failed"]
    assert len(failed) == 1 and "near_duplicates.png" in failed[0].message
    report = (folder / "Mining_Report.md").read_text()
    assert "near_duplicates.png" not in result.pictures and "](near_duplicates.png)" not in report
    assert _label_table(report)[0][-1] == "Collapsed" and 600 <= result.words <= 1200


def test_a_run_that_collapsed_nothing_has_no_column_and_no_picture(tmp_path):
    targets, pool = _labelled_images(tmp_path)
    pool.write_text("filepath,label\n" + "".join(f"imgs/{i}.png,{'ab'[i % 2]}\n" for i in range(2, 8)))
    done = run(targets, pool, run_dir=tmp_path / "r", overrides={"model": "thumbnail", "topn": 12,
                                                                 "dedup_similarity": 0.999999})
    report = (tmp_path / "r" / "Mining_Report.md").read_text()
    assert done.mine.summary["near_duplicates_removed"] == 0
    assert "Collapsed" not in _label_table(report)[0] and "near_duplicates.png" not in done.report.pictures


def test_mode_unique_reports_the_files_set_aside_from_the_matchers_listing(tmp_path):
    targets, pool = _labelled_images(tmp_path)
    done = run(targets, pool, run_dir=tmp_path / "u", overrides={
        "model": "thumbnail", "mode": "unique", "desired_unique_count": 6, "dedup_similarity": 0.999})
    report = (tmp_path / "u" / "Mining_Report.md").read_text()
    near = pq.read_table(tmp_path / "u" / "unique_matching" / "near_duplicates.parquet")
    kinds = near.column("kind").to_pylist()  # the byte copies (2-4) identical_bytes, the re-encoded (5-7) similar
    assert kinds.count("identical_bytes") == kinds.count("similar") == 3
    assert ("3 pool images lay within that similarity of a file already held" in report
            and "3 pool images repeated the bytes of a file already held" in report
            and "`unique_matching/near_duplicates.parquet`" in report)
    header, rows = _label_table(report)
    assert header[-1] == "Collapsed" and sum(int(cells[-1]) for cells in rows.values()) == near.num_rows
    assert "near_duplicates.png" in done.report.pictures and 600 <= done.report.words <= 1200


@pytest.mark.e2e
def test_one_run_with_the_collapse_through_the_mcp_server(tmp_path):
    """dedup_similarity as an MCP argument over stdio: the counts in the result, the listing on disk."""
    from mcp_helpers import SyncClient, ok, stdio_params

    targets, pool = _images(tmp_path)
    with SyncClient(stdio_params(tmp_path)) as client:
        got = ok(client.call("run", {"targets": str(targets), "source": str(pool), "run_dir": str(tmp_path / "m"),
                                     "no_store": True, "overrides": {"model": "thumbnail", "topn": 12,
                                                                     "dedup_similarity": 0.999}}))
    listing = tmp_path / "m" / "near_duplicates.parquet"
    assert got["mine"]["summary"]["near_duplicates_removed"] == 3 and got["mine"]["summary"]["identical_images"] == 3
    assert got["mine"]["near_duplicates_parquet"] == str(listing) and listing.is_file()
    assert pq.read_table(listing).num_rows == 6 and got["mined"] == 6
    assert "near_duplicates.png" in got["report"]["pictures"]
