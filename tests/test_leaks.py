"""The leakage guard (run --protect, leak_similarity / leak_distance): pool copies of protected images
never reach the search, against a brute-force reference, through the Python call and the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import write_image
from deft_mine.engine import leaks
from deft_mine.engine.knn import l2_normalise
from deft_mine.errors import DeftError
from deft_mine.schemas.specs import Metric, MiningSpec
from deft_mine.tools.run import run

THUMB = {"model": "thumbnail"}


# --- the exact search, against brute force ----------------------------------------------------------

def _brute_nearest(pool: np.ndarray, protected: np.ndarray, metric: Metric) -> tuple[np.ndarray, np.ndarray]:
    """Each pool row's nearest protected row in float64, ties to the lower protected row."""
    p, q = pool.astype(np.float64), protected.astype(np.float64)
    if metric is Metric.cosine:
        # unit vectors as the engine stores them (float32), then exact float64 products
        p, q = l2_normalise(pool).astype(np.float64), l2_normalise(protected).astype(np.float64)
        scores = p @ q.T
        near = -scores
    else:
        diff = p[:, None, :] - q[None, :, :]
        scores = np.sqrt((diff ** 2).sum(-1)) if metric is Metric.euclidean else np.abs(diff).sum(-1)
        near = scores
    # a tie (equal up to float64 rounding of equal values): the lower protected row
    best = np.argmax(near <= near.min(axis=1, keepdims=True) + 1e-12, axis=1)
    return best, scores[np.arange(len(p)), best]


@pytest.mark.parametrize("metric", list(Metric))
def test_each_pool_rows_nearest_protected_is_exact_with_ties_to_the_lower_row(metric):
    rng = np.random.default_rng(3)
    protected = rng.integers(-3, 4, (40, 6)).astype(np.float32)
    protected[7] = protected[31]  # a tie: the pool row near both names row 7
    pool = np.concatenate([rng.integers(-3, 4, (300, 6)).astype(np.float32), protected[[31, 5]]])
    names_target = np.zeros(len(pool), bool)
    found = leaks.Protected([f"p{i}" for i in range(40)], [Path(f"/none/p{i}") for i in range(40)], ["v.parquet"] * 40, protected)
    rows, scores = leaks.nearest_protected([pool[:128], pool[128:]], found, names_target, metric)
    want_rows, want_scores = _brute_nearest(pool, protected, metric)
    close = np.isclose(scores, want_scores, rtol=0, atol=1e-9)
    assert close.all()
    # where the brute force has an exact tie the lower row wins; elsewhere the same row
    assert (rows == want_rows).all()
    assert rows[300] == 7


def test_a_row_naming_a_target_file_is_compared_with_the_protect_listings_only():
    vectors = np.eye(4, dtype=np.float32)
    protected = leaks.Protected(["t0", "v0"], [Path("/x/t0"), Path("/x/v0")], [leaks.TARGETS, "v.parquet"],
                                vectors[[0, 1]])
    pool = vectors[[0, 0]]
    rows, scores = leaks.nearest_protected([pool], protected, np.array([True, False]), Metric.cosine)
    assert rows.tolist() == [1, 0] and scores[0] == pytest.approx(0.0) and scores[1] == pytest.approx(1.0)


# --- a run ------------------------------------------------------------------------------------------

@pytest.fixture
def guarded_set(tmp_path: Path) -> Path:
    """Targets t0, t1; a validation image v0; a pool of six unrelated images plus: a byte copy of
    t0 under another path, a byte copy of v0, a re-encoded v0 (same pixels, other bytes) and a
    slightly noisy v1 copy (a near-copy the thumbnail encoder puts close)."""
    for name, seed in (("t0", 100), ("t1", 101), ("v0", 200), ("v1", 201)):
        write_image(tmp_path / "sets" / f"{name}.png", seed)
    for i in range(6):
        write_image(tmp_path / "pool" / f"p{i}.png", seed=i)
    shutil.copyfile(tmp_path / "sets" / "t0.png", tmp_path / "pool" / "copy_t0.png")
    shutil.copyfile(tmp_path / "sets" / "v0.png", tmp_path / "pool" / "copy_v0.png")
    pixels = np.asarray(Image.open(tmp_path / "sets" / "v0.png"))
    Image.fromarray(pixels).save(tmp_path / "pool" / "reenc_v0.png", compress_level=1)
    noisy = np.clip(np.asarray(Image.open(tmp_path / "sets" / "v1.png")).astype(int) +
                    np.random.default_rng(9).integers(-4, 5, pixels.shape), 0, 255).astype(np.uint8)
    Image.fromarray(noisy).save(tmp_path / "pool" / "noisy_v1.png")
    assert (tmp_path / "pool" / "reenc_v0.png").read_bytes() != (tmp_path / "sets" / "v0.png").read_bytes()
    pool = [f"pool/p{i}.png" for i in range(6)] + ["pool/copy_t0.png", "pool/copy_v0.png", "pool/reenc_v0.png",
                                                   "pool/noisy_v1.png"]
    pq.write_table(pa.table({"filepath": ["sets/t0.png", "sets/t1.png"]}), tmp_path / "targets.parquet")
    pq.write_table(pa.table({"filepath": pool}), tmp_path / "pool.parquet")
    pq.write_table(pa.table({"filepath": ["sets/v0.png", "sets/v1.png"]}), tmp_path / "val.parquet")
    return tmp_path


def _leaks(run_dir: str) -> dict[str, tuple[str, str]]:
    table = pq.read_table(Path(run_dir) / "leaks.parquet").to_pylist()
    return {row["filepath"]: (row["protected_filepath"], row["kind"]) for row in table}


SCOPES = pytest.mark.parametrize("scope", ["pool", "mined"])


def _listed(run_dir: str, scope: str, every: dict[str, tuple[str, str]]) -> None:
    """leak_scope=pool lists every leak in the pool; leak_scope=mined those among the rows it judged
    (the search's candidates), each with the same verdict."""
    found = _leaks(run_dir)
    assert found == every if scope == "pool" else found.items() <= every.items()


@SCOPES
def test_byte_copies_are_leaks_always_and_a_targets_copy_never_reaches_its_search(guarded_set, scope):
    result = run(guarded_set / "targets.parquet", guarded_set / "pool.parquet", run_dir=guarded_set / "r",
                 protect=[str(guarded_set / "val.parquet")], overrides={**THUMB, "topn": 1, "leak_scope": scope})
    _listed(result.run_dir, scope, {"pool/copy_t0.png": ("sets/t0.png", "identical_bytes"),
                                    "pool/copy_v0.png": ("sets/v0.png", "identical_bytes")})
    assert "pool/copy_t0.png" in _leaks(result.run_dir)  # t0's nearest neighbour: judged in either scope
    mined = pq.read_table(result.mined_parquet).column("filepath").to_pylist()
    assert not {"pool/copy_t0.png", "pool/copy_v0.png"} & set(mined)
    # the byte copy was t0's nearest neighbour: the mined set holds the next one (brute force)
    source = pq.read_table(Path(result.run_dir) / "source_embeddings.parquet")
    target = pq.read_table(Path(result.run_dir) / "target_embeddings.parquet")
    keep = [i for i, p in enumerate(source.column("filepath").to_pylist()) if p not in _leaks(result.run_dir)]
    vectors = np.asarray(source.column("embedding").to_pylist())[keep]
    queries = np.asarray(target.column("embedding").to_pylist())
    best, _ = _brute_nearest(queries, vectors, Metric.cosine)
    want = list(dict.fromkeys(source.column("filepath").to_pylist()[keep[b]] for b in best))
    assert mined == want
    (warning,) = [w for w in result.warnings if w.code == "leaks_excluded"]
    count = len(_leaks(result.run_dir))
    assert warning.details["by_kind"] == {"identical_bytes": count, "similar": 0}
    manifest = json.loads((Path(result.run_dir) / "run.json").read_text())
    assert manifest["leaks"]["leaks_excluded"] == count and result.leaks.leaks_excluded == count
    assert manifest["leaks"]["scope"] == scope
    assert manifest["mining"]["summary"]["pool"] == 10 - count  # ten rows, the leaks left out
    spec = (Path(result.run_dir) / "mining_spec.yaml").read_text()
    assert ("leaks_parquet" if scope == "pool" else "protected_parquet") in spec
    report = (Path(result.run_dir) / "Mining_Report.md").read_text()
    assert "## Leakage Guard" in report and "`pool/copy_t0.png`" in report


@SCOPES
def test_leak_similarity_catches_re_encoded_and_near_copies(guarded_set, scope):
    result = run(guarded_set / "targets.parquet", guarded_set / "pool.parquet", run_dir=guarded_set / "r",
                 protect=[str(guarded_set / "val.parquet")],
                 overrides={**THUMB, "topn": 3, "leak_similarity": 0.9, "leak_scope": scope})
    found = _leaks(result.run_dir)
    if scope == "pool":
        assert found["pool/reenc_v0.png"] == ("sets/v0.png", "similar")
        assert found["pool/noisy_v1.png"] == ("sets/v1.png", "similar")
    assert found["pool/copy_t0.png"][1] == "identical_bytes"
    # the reference: every pool row whose nearest protected cosine reaches 0.9, or whose bytes repeat one
    source = pq.read_table(Path(result.run_dir) / "source_embeddings.parquet")
    protected = np.concatenate([np.asarray(pq.read_table(Path(result.run_dir) / name).column("embedding").to_pylist())
                                for name in ("target_embeddings.parquet", "protected_embeddings.parquet")])
    _, scores = _brute_nearest(np.asarray(source.column("embedding").to_pylist()), protected, Metric.cosine)
    paths = source.column("filepath").to_pylist()
    every = {p for p, s in zip(paths, scores) if s >= 0.9} | {"pool/copy_t0.png", "pool/copy_v0.png"}
    assert set(found) == every if scope == "pool" else set(found) <= every
    # the answer is the same in both scopes: each target's topn nearest among the pool rows that are no leak
    keep = [i for i, p in enumerate(paths) if p not in every]
    queries = np.asarray(pq.read_table(Path(result.run_dir) / "target_embeddings.parquet").column("embedding").to_pylist())
    near = l2_normalise(queries).astype(np.float64) @ l2_normalise(
        np.asarray(source.column("embedding").to_pylist())[keep]).astype(np.float64).T
    want = {paths[keep[j]] for row in near for j in np.lexsort((np.arange(len(keep)), -row))[:3]}
    table = pq.read_table(Path(result.run_dir) / "leaks.parquet")
    assert table.column_names[:1] == ["filepath"] and "similarity" in table.column_names
    mined = set(pq.read_table(result.mined_parquet).column("filepath").to_pylist())
    assert mined == want and not mined & every
    # the histogram: every pool row (pool), or the fixed sample of them (mined: here the whole small pool)
    assert result.leaks.nearest is not None and sum(result.leaks.nearest["counts"]) == len(paths)


def test_leak_similarity_without_protect_guards_the_targets(guarded_set):
    result = run(guarded_set / "targets.parquet", guarded_set / "pool.parquet", run_dir=guarded_set / "r",
                 overrides={**THUMB, "topn": 2, "leak_similarity": 0.99})
    assert _leaks(result.run_dir) == {"pool/copy_t0.png": ("sets/t0.png", "identical_bytes")}
    assert result.leaks.protected_listings == [] and result.leaks.threshold == 0.99


def test_a_run_through_the_cli(guarded_set, capsys):
    from deft_mine.cli import main

    code = main(["run", "--targets", str(guarded_set / "targets.parquet"), "--source", str(guarded_set / "pool.parquet"),
                 "--run-dir", str(guarded_set / "r"), "--protect", str(guarded_set / "val.parquet"), "--json",
                 "model=thumbnail", "topn=2", "leak_similarity=0.99", "leak_scope=pool"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["leaks"]["by_kind"] == {"identical_bytes": 2, "similar": 2} and result["leaks"]["scope"] == "pool"
    assert "pool/reenc_v0.png" in _leaks(result["run_dir"])


def test_euclidean_takes_leak_distance(guarded_set):
    result = run(guarded_set / "targets.parquet", guarded_set / "pool.parquet", run_dir=guarded_set / "r",
                 protect=[str(guarded_set / "val.parquet")],
                 overrides={**THUMB, "topn": 1, "knn_metric": "euclidean", "leak_distance": 1e-6, "leak_scope": "pool"})
    assert _leaks(result.run_dir)["pool/reenc_v0.png"] == ("sets/v0.png", "similar")
    assert "distance" in pq.read_table(Path(result.run_dir) / "leaks.parquet").column_names


def test_a_pool_of_leaks_only_gives_an_empty_valid_answer(guarded_set):
    pq.write_table(pa.table({"filepath": ["pool/copy_t0.png", "pool/copy_v0.png"]}), guarded_set / "leaky.parquet")
    result = run(guarded_set / "targets.parquet", guarded_set / "leaky.parquet", run_dir=guarded_set / "r",
                 protect=[str(guarded_set / "val.parquet")], overrides={**THUMB, "topn": 2})
    assert result.mined == 0 and pq.read_table(result.mined_parquet).num_rows == 0
    (warning,) = [w for w in result.warnings if w.code == "leaks_excluded"]
    assert "every pool row is a leak" in warning.message
    assert json.loads((Path(result.run_dir) / "run.json").read_text())["status"] == "finished"


def test_without_a_guard_and_without_copies_nothing_changes(guarded_set):
    pq.write_table(pa.table({"filepath": [f"pool/p{i}.png" for i in range(6)]}), guarded_set / "clean.parquet")
    result = run(guarded_set / "targets.parquet", guarded_set / "clean.parquet", run_dir=guarded_set / "r",
                 overrides={**THUMB, "topn": 2})
    assert result.leaks is None and not (Path(result.run_dir) / "leaks.parquet").exists()
    assert "leak" not in (Path(result.run_dir) / "mining_spec.yaml").read_text()
    assert "leaks" not in json.loads((Path(result.run_dir) / "run.json").read_text())


# --- refusals ---------------------------------------------------------------------------------------

def _refused(guarded_set: Path, protect: list[str] | None = None, **overrides) -> DeftError:
    with pytest.raises(DeftError) as exc:
        run(guarded_set / "targets.parquet", guarded_set / "pool.parquet", run_dir=guarded_set / "r",
            protect=protect, overrides={**THUMB, **overrides})
    assert not (guarded_set / "r").exists()  # refused before a run folder exists
    return exc.value


def test_refusals_name_the_field(guarded_set):
    error = _refused(guarded_set, [str(guarded_set / "absent.parquet")])
    assert (error.code, error.details["field"]) == ("file_not_found", "protect")
    pq.write_table(pa.table({"path": ["sets/v0.png"]}), guarded_set / "nofp.parquet")
    error = _refused(guarded_set, [str(guarded_set / "nofp.parquet")])
    assert (error.code, error.details["field"]) == ("column_missing", "protect")
    pq.write_table(pa.table({"filepath": ["sets/gone.png", "sets/gone2.png"]}), guarded_set / "gone.parquet")
    error = _refused(guarded_set, [str(guarded_set / "gone.parquet")])
    assert (error.code, error.details["field"]) == ("no_readable_images", "protect")
    error = _refused(guarded_set, leak_similarity=1.5)
    assert error.details["field"] == "leak_similarity"
    error = _refused(guarded_set, leak_distance=0.5)
    assert (error.code, error.details["field"]) == ("spec_invalid", "leak_distance")
    error = _refused(guarded_set, knn_metric="manhattan", leak_similarity=0.5)
    assert (error.code, error.details["field"]) == ("spec_invalid", "leak_similarity")
    error = _refused(guarded_set, knn_metric="manhattan", leak_distance=-1)
    assert error.details["field"] == "leak_distance"


def test_docker_applies_the_guard_on_the_host_and_a_backend_that_cannot_is_refused():
    """docker mines on the host with the leak rows left out (as it applies the floor; run against the
    fake TAO image in test_docker_leaks.py); a backend whose search cannot leave rows out is refused."""
    from dataclasses import replace

    from deft_mine.backends.docker import _HOST_KEYS, DockerBackend
    from deft_mine.schemas.inputs import RunInput
    from deft_mine.tools.run_leaks import applies

    docker = DockerBackend("nvcr.io/nvidia/tao/tao-toolkit:6.0.0-data-services")  # asked nothing of an engine here
    inputs = RunInput(targets="t.parquet", source="s.parquet", run_dir="r", protect=["v.parquet"])
    assert "leaks_parquet" in _HOST_KEYS
    assert applies(inputs, MiningSpec(), docker, sentences=False)
    assert applies(RunInput(targets="t.parquet", source="s.parquet", run_dir="r"), MiningSpec(), docker, False)
    docker.capabilities = replace(docker.capabilities, leaves_rows_out=False)
    with pytest.raises(DeftError) as exc:
        applies(inputs, MiningSpec(), docker, sentences=False)
    assert (exc.value.code, exc.value.details["field"]) == ("backend_unsupported", "protect")
    # unasked, the guard stays off there: the program's answer stands as before
    assert not applies(RunInput(targets="t.parquet", source="s.parquet", run_dir="r"), MiningSpec(), docker, False)


def test_a_leak_scope_that_cannot_hold_is_refused_not_ignored():
    """leak_scope=mined where the search cannot judge its candidates (docker), leak_scope with sentences
    as targets, and protected_parquet (the guard in the search) beside leak_scope=pool: each refused."""
    from deft_mine.backends.docker import DockerBackend
    from deft_mine.backends.local import LocalBackend
    from deft_mine.schemas.inputs import RunInput
    from deft_mine.tools.run_leaks import applies

    plain = RunInput(targets="t.parquet", source="s.parquet", run_dir="r")
    docker = DockerBackend("nvcr.io/nvidia/tao/tao-toolkit:6.0.0-data-services")
    with pytest.raises(DeftError) as exc:
        applies(plain, MiningSpec(leak_scope="mined"), docker, sentences=False)
    assert (exc.value.code, exc.value.details["field"]) == ("backend_unsupported", "leak_scope")
    assert applies(plain, MiningSpec(leak_scope="pool"), docker, sentences=False)  # docker judges the whole pool
    with pytest.raises(DeftError) as exc:
        applies(plain, MiningSpec(leak_scope="pool"), LocalBackend(), sentences=True)
    assert (exc.value.code, exc.value.details["field"]) == ("spec_invalid", "leak_scope")
    with pytest.raises(DeftError) as exc:
        MiningSpec(protected_parquet="protected.parquet", leak_scope="pool")
    assert (exc.value.code, exc.value.details["field"]) == ("spec_invalid", "leak_scope")


# --- the report's pictures --------------------------------------------------------------------------

def test_the_histogram_bins_the_scores_own_range_with_the_threshold_inside():
    got = leaks.histogram(np.array([0.2, 0.3, np.nan, 0.5]), Metric.cosine, threshold=0.9)
    assert got["edges"][0] == 0.2 and got["edges"][-1] == 0.9 and sum(got["counts"]) == 3
    got = leaks.histogram(np.array([0.99, 1.0]), Metric.cosine, threshold=None)
    assert got["edges"][-1] == 1.0 and sum(got["counts"]) == 2
    got = leaks.histogram(np.array([0.0, 0.0]), Metric.euclidean, threshold=None)
    assert got["edges"][0] == 0.0 and got["counts"][0] == 2


def test_the_report_draws_leak_pairs_and_the_nearest_histogram_within_its_words(guarded_set):
    from deft_mine.report.pictures import CAPTION_LINES, GAP, LINE, PLACEHOLDER, TILE
    from deft_mine.report.render import MAX_WORDS, MIN_WORDS, count_words
    from deft_mine.schemas import artifacts
    from deft_mine.tools.guards import PathPolicy
    from deft_mine.tools.report import report

    result = run(guarded_set / "targets.parquet", guarded_set / "pool.parquet", run_dir=guarded_set / "r",
                 protect=[str(guarded_set / "val.parquet")],
                 overrides={**THUMB, "topn": 3, "leak_similarity": 0.9, "leak_scope": "pool"})
    folder = Path(result.run_dir)
    assert {artifacts.LEAK_PAIRS_PICTURE, artifacts.LEAK_NEAREST_PICTURE} <= set(result.report.pictures)
    text = (folder / artifacts.REPORT).read_text()
    assert f"]({artifacts.LEAK_PAIRS_PICTURE})" in text and f"]({artifacts.LEAK_NEAREST_PICTURE})" in text
    assert MIN_WORDS <= count_words(text) <= MAX_WORDS and result.report.words == count_words(text)
    # three protected images copied (t0; v0 twice; v1), each a row: the protected image, then its copies
    cell_w, cell_h = TILE + GAP, TILE + 6 + CAPTION_LINES * LINE + GAP
    with Image.open(folder / artifacts.LEAK_PAIRS_PICTURE) as sheet:
        assert sheet.size == (max(GAP + 3 * cell_w, 360), 36 + 3 * cell_h + GAP)
        assert sheet.convert("RGB").getpixel((GAP + TILE // 2 + 10, 36 + TILE // 4)) != PLACEHOLDER
    with Image.open(folder / artifacts.LEAK_NEAREST_PICTURE) as chart:
        assert chart.size == (720, 400)
    edges = result.leaks.nearest["edges"]
    assert edges[0] <= 0.9 <= edges[-1]  # the threshold's line falls inside the bins drawn
    # images outside the server's roots are never opened: grey tiles
    report(folder, policy=PathPolicy([folder]))
    with Image.open(folder / artifacts.LEAK_PAIRS_PICTURE) as sheet:
        rgb = sheet.convert("RGB")
        for column in (0, 1):
            assert rgb.getpixel((GAP + column * cell_w + TILE // 2 + 10, 36 + TILE // 4)) == PLACEHOLDER


def test_a_bytes_only_guard_draws_the_pairs_and_no_histogram(guarded_set):
    from deft_mine.report.render import MAX_WORDS, MIN_WORDS, count_words
    from deft_mine.schemas import artifacts

    result = run(guarded_set / "targets.parquet", guarded_set / "pool.parquet", run_dir=guarded_set / "r",
                 protect=[str(guarded_set / "val.parquet")], overrides={**THUMB, "topn": 2})
    assert artifacts.LEAK_PAIRS_PICTURE in result.report.pictures
    assert artifacts.LEAK_NEAREST_PICTURE not in result.report.pictures
    assert MIN_WORDS <= result.report.words <= MAX_WORDS
    assert result.report.words == count_words((Path(result.run_dir) / artifacts.REPORT).read_text())
