"""`run` with mode=unique: the run folder's embeddings matched to a budget (the match tool's own
answer on the same embeddings), global and class_stratified, a shortfall in run.json and the
report, a history ledger whose earlier selections take none of the budget, ChangeNet pools and
sentences as targets, the refusals at the door, and nearest mode as it was."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import write_image
from deft_mine.errors import DeftError
from deft_mine.tools import match, run

UNIQUE = {"model": "thumbnail", "mode": "unique"}


@pytest.fixture
def aoi(tmp_path: Path) -> Path:
    """Four labelled targets and a 14-image labelled pool (dent rare), real PNGs under imgs/."""
    for i in range(18):
        write_image(tmp_path / "imgs" / f"{i}.png", seed=100 + i)
    pq.write_table(pa.table({"filepath": [f"imgs/{i}.png" for i in range(4)],
                             "label": ["dent", "ok", "ok", "scratch"]}), tmp_path / "targets.parquet")
    pool_labels = ["dent", "ok", "ok", "dent", "ok", "ok", "ok", "dent", "ok", "ok", "ok", "ok", "ok", "Dent "]
    pq.write_table(pa.table({"filepath": [f"imgs/{i}.png" for i in range(4, 18)], "label": pool_labels}),
                   tmp_path / "pool.parquet")
    return tmp_path


def _run(folder: Path, name: str, **keys):
    return run(folder / "targets.parquet", folder / "pool.parquet", run_dir=folder / name,
               overrides={**UNIQUE, **{k: str(v) for k, v in keys.items()}}, no_store=True)


def _manifest(run_dir: str | Path) -> dict:
    return json.loads((Path(run_dir) / "run.json").read_text())


@pytest.mark.parametrize("keys", [
    {"desired_unique_count": 7},
    {"desired_unique_count": 8, "allocation_policy": "class_stratified", "rare_class_list": "dent,scratch",
     "knn_metric": "euclidean", "candidate_expansion_factor": 2},
])
def test_a_unique_run_selects_what_match_selects_on_the_same_embeddings(aoi, keys):
    result = _run(aoi, "r", **keys)
    folder = Path(result.run_dir)
    assert result.mine is None and result.match is not None and "mine" in result.model_dump()
    # the reference: the match tool on the run folder's own embeddings
    metric = keys.get("knn_metric", "cosine")
    reference = match(overrides={"source_path": str(folder / "source_embeddings.parquet"),
                                 "target_path": str(folder / "target_embeddings.parquet"),
                                 "output_dir": str(aoi / "matched"), "distance_metric": metric,
                                 **{k: str(v) for k, v in keys.items() if k != "knn_metric"}})
    final = pq.read_table(reference.final_parquet)
    mined = pq.read_table(folder / "mined.parquet")
    assert mined.column_names == ["filepath", "matched_target", "distance", "class"]
    assert mined.equals(final.select(mined.column_names))
    assert pq.read_table(folder / "unique_matching" / "final_unique_files.parquet").equals(final)
    assert result.mined == mined.num_rows == keys["desired_unique_count"] == result.match.retrieved_unique_count
    assert len(set(mined.column("filepath").to_pylist())) == mined.num_rows
    # the pairs the report draws: one kept pair per selected file, with the target that claimed it
    pairs = pq.read_table(folder / "mined_pairs.parquet").to_pylist()
    assert len(pairs) == mined.num_rows and all(p["kept"] for p in pairs)
    claimed = {r["filepath"]: (r["matched_target"], r["distance"]) for r in mined.to_pylist()}
    targets = pq.read_table(folder / "target_embeddings.parquet").column("filepath").to_pylist()
    for p in pairs:
        target, distance = claimed[p["filepath"]]
        assert p["target_filepath"] == target == targets[p["target_row"]]
        assert p["score"] == pytest.approx(1 - distance if metric == "cosine" else distance)
    # run.json: the spec as run (its mode's keys only), the budget per group
    manifest = _manifest(folder)
    assert manifest["mining_spec"]["mode"] == "unique" and "topn" not in manifest["mining_spec"]
    unique = manifest["mining"]["unique"]
    assert (unique["desired"], unique["retrieved"], unique["coverage_pct"]) == (mined.num_rows,) * 2 + (100.0,)
    assert unique["passes"] == len(reference.passes) and unique["distance_metric"] == metric
    assert sum(g["got"] for g in unique["groups"]) == mined.num_rows
    if keys.get("allocation_policy"):
        assert [g["group"] for g in unique["groups"]] == ["dent", "scratch", "non_rare"]
        assert {g["group"]: g["got"] for g in unique["groups"]} == {**dict.fromkeys(
            ["dent", "scratch", "non_rare"], 0), **reference.per_class}
        assert [g["quota"] for g in unique["groups"]] == [2, 2, 4]  # 1:1:2 targets
    else:
        assert unique["groups"] == [{"group": "global", "quota": 7, "got": 7, "from_non_rare": 0, "shortfall": 0, "reason": None}]
    # mining_spec.yaml loads back as the same spec
    again = run(aoi / "targets.parquet", aoi / "pool.parquet", run_dir=aoi / "again",
                mining_spec_path=folder / "mining_spec.yaml", overrides={"model": "thumbnail"}, no_store=True)
    assert pq.read_table(Path(again.run_dir) / "mined.parquet").equals(mined)
    text = (folder / "Mining_Report.md").read_text()
    assert "## Budget" in text and "The budget was spent in full." in text and "deft-mine match -e" in text
    assert f"mode=unique, desired_unique_count={mined.num_rows}" in text


def test_a_shortfall_is_reported_in_run_json_the_warnings_and_the_report(aoi):
    result = _run(aoi, "r", desired_unique_count=20)
    assert result.mined == 14  # the whole pool, once each
    (warning,) = [w for w in result.warnings if w.code == "unique_count_short"]
    manifest = _manifest(result.run_dir)
    assert "unique_count_short" in [w["code"] for w in manifest["warnings"]]
    assert manifest["mining"]["unique"]["groups"] == [
        {"group": "global", "quota": 20, "got": 14, "from_non_rare": 0, "shortfall": 6, "reason": "pool_spent"}]
    assert manifest["mining"]["unique"]["coverage_pct"] == 70.0
    text = (Path(result.run_dir) / "Mining_Report.md").read_text()
    assert "It fell short by 6 (warning `unique_count_short`)" in text
    assert "| `global` | 20 | 14 | 6 | `pool_spent` |" in text and "**Verdict: ATTENTION**" in text


def test_a_stratified_shortfall_names_its_class(aoi):
    # scratch has no pool rows of its own: only the non_rare fallback can feed it
    result = _run(aoi, "r", desired_unique_count=14, allocation_policy="class_stratified",
                  rare_class_list="dent,scratch")
    groups = _manifest(result.run_dir)["mining"]["unique"]["groups"]
    # quotas 1:1:2 by the targets (3.5, 3.5, 7: the odd unit to the name that sorts last); scratch is fed
    # from the non_rare pool, which then has 6 of non_rare's 7 left (the 4th dent row is dent's alone)
    assert [(g["group"], g["quota"], g["got"], g["from_non_rare"], g["shortfall"], g["reason"]) for g in groups] == [
        ("dent", 3, 3, 0, 0, None), ("scratch", 4, 4, 4, 0, None), ("non_rare", 7, 6, 0, 1, "pool_spent")]
    assert result.mined == 13
    text = (Path(result.run_dir) / "Mining_Report.md").read_text()
    assert "| `non_rare` | 7 | 6 | 0 | 1 | `pool_spent` |" in text and "split over the rare classes" in text
    assert "| `scratch` | 4 | 4 | 4 | 0 | — |" in text


def test_with_history_a_second_run_excludes_the_first_runs_selections(aoi):
    ledger = aoi / "history.json"
    first = run(aoi / "targets.parquet", aoi / "pool.parquet", run_dir=aoi / "r1", history=str(ledger),
                overrides={**UNIQUE, "desired_unique_count": "5"}, no_store=True)
    second = run(aoi / "targets.parquet", aoi / "pool.parquet", run_dir=aoi / "r2", history=str(ledger),
                 overrides={**UNIQUE, "desired_unique_count": "5"}, no_store=True)
    picked = [pq.read_table(aoi / name / "mined.parquet").column("filepath").to_pylist() for name in ("r1", "r2")]
    assert len(picked[0]) == len(picked[1]) == 5 and not set(picked[0]) & set(picked[1])
    # the candidates are this round's budget: the ledger's earlier picks never compete for it
    assert pq.read_table(aoi / "r2" / "mined_candidates.parquet").column("filepath").to_pylist() == picked[1]
    excluded = pq.read_table(aoi / "r2" / "previously_selected.parquet").column("filepath").to_pylist()
    assert sorted(excluded) == sorted(picked[0]) and not (aoi / "r1" / "previously_selected.parquet").exists()
    assert (first.select.iteration, second.select.iteration) == (1, 2)
    assert (second.select.candidates, second.select.previously_selected, second.select.newly_selected) == (5, 0, 5)
    book = json.loads(ledger.read_text())
    recorded = [sorted(Path(p).relative_to(aoi).as_posix() for p in it["selected"]) for it in book["iterations"]]
    assert recorded == [sorted(picked[0]), sorted(picked[1])]
    manifest = _manifest(second.run_dir)
    assert manifest["mining"]["unique"]["excluded_rows"] == 5 and manifest["history"]["iteration"] == 2
    text = (aoi / "r2" / "Mining_Report.md").read_text()
    assert "## Budget" in text and "## History" in text and "5 pool rows were kept out of the budget" in text


def test_with_history_a_file_name_shared_across_boards_excludes_only_the_file_selected(tmp_path):
    """Every board has a C1.png: by the container's rule (full path or file name) the first round's
    board-1 C1.png would also exclude board 2's; the run excludes by full path when names collide."""
    for board in (1, 2, 3):
        for part in ("C1", "R7"):
            write_image(tmp_path / "imgs" / f"B{board}" / f"{part}.png", seed=10 * board + len(part) + ord(part[0]))
    # (seed 99 would be B3/C1.png's own bytes: a byte copy of the target, which the guard keeps out)
    write_image(tmp_path / "imgs" / "t.png", seed=999)
    pq.write_table(pa.table({"filepath": ["imgs/t.png"]}), tmp_path / "targets.parquet")
    pool = [f"imgs/B{b}/{p}.png" for b in (1, 2, 3) for p in ("C1", "R7")]
    pq.write_table(pa.table({"filepath": pool}), tmp_path / "pool.parquet")
    ledger = tmp_path / "history.json"
    rounds = [run(tmp_path / "targets.parquet", tmp_path / "pool.parquet", run_dir=tmp_path / f"r{i}",
                  history=str(ledger), overrides={**UNIQUE, "desired_unique_count": "2"}, no_store=True)
              for i in (1, 2, 3)]
    picked = [pq.read_table(tmp_path / f"r{i}" / "mined.parquet").column("filepath").to_pylist() for i in (1, 2, 3)]
    assert sorted(p for r in picked for p in r) == sorted(pool)  # three rounds of two spend the pool exactly
    spec = (tmp_path / "r2" / "unique_matching" / "unique_matching_spec.yaml").read_text()
    assert "exclude_by: path\n" in spec
    assert [r.match.retrieved_unique_count for r in rounds] == [2, 2, 2]


def test_mine_refuses_mode_unique_rather_than_mining_nearest(tmp_path):
    import numpy as np

    from conftest import write_embeddings
    from deft_mine.tools import mine

    write_embeddings(tmp_path / "pool.parquet", np.eye(4))
    write_embeddings(tmp_path / "targets.parquet", np.eye(4)[:1])
    with pytest.raises(DeftError) as err:
        mine(tmp_path / "pool.parquet", tmp_path / "targets.parquet", tmp_path / "out.parquet",
             overrides={"mode": "unique", "desired_unique_count": "3"})
    assert err.value.code == "spec_invalid" and err.value.details["field"] == "mode" and "deft-mine match" in err.value.fix
    assert not (tmp_path / "out.parquet").exists()


def test_a_changenet_pool_matches_to_a_budget_and_writes_training_rows(tmp_path):
    from test_training_rows import LIGHTS, changenet_csv_pool

    files = changenet_csv_pool(tmp_path, 6)
    pq.write_table(pa.table({"filepath": files[:3]}), tmp_path / "targets.parquet")
    result = run(tmp_path / "targets.parquet", tmp_path / "pool.csv", run_dir=tmp_path / "r",
                 images_dir=str(tmp_path), lights=list(LIGHTS), no_store=True,
                 overrides={**UNIQUE, "desired_unique_count": "4", "image_root": str(tmp_path)})
    mined = pq.read_table(tmp_path / "r" / "mined.parquet").column("filepath").to_pylist()
    assert result.mined == len(mined) == 4 and set(mined) <= set(files)
    with (tmp_path / "r" / "mined_training_rows.csv").open(newline="") as fh:
        objects = {r["object_name"] for r in csv.DictReader(fh)}
    assert objects == {Path(p).name.split("_")[0] for p in mined}
    assert result.training_rows is not None and result.training_rows.components == len(objects)


def test_sentences_as_targets_match_to_a_budget(image_set, tiny_siglip, tmp_path):
    from test_text_embeddings import SENTENCES, _with_tokenizer

    model = _with_tokenizer(tiny_siglip, tmp_path / "model")
    result = run(text=SENTENCES[:2], source=image_set / "pool.parquet", run_dir=image_set / "r", no_store=True,
                 overrides={"model": "SigLIP", "model_path": str(model), "mode": "unique",
                            "desired_unique_count": "3"})
    folder = Path(result.run_dir)
    mined = pq.read_table(folder / "mined.parquet")
    assert result.mined == mined.num_rows == 3
    # the sentences name the targets, in the mined files and the pairs the contact sheet draws
    assert set(mined.column("matched_target").to_pylist()) <= set(SENTENCES[:2])
    pairs = pq.read_table(folder / "mined_pairs.parquet").to_pylist()
    assert all(SENTENCES[p["target_row"]] == p["target_filepath"] for p in pairs)
    assert "## Budget" in (folder / "Mining_Report.md").read_text()


@pytest.mark.parametrize("keys, code, field", [
    ({"mode": "unique"}, "spec_missing_value", "desired_unique_count"),
    ({"mode": "unique", "desired_unique_count": "3", "topn": "5"}, "spec_invalid", "topn"),
    ({"mode": "unique", "desired_unique_count": "3", "filter_by_label": "true"}, "spec_invalid", "filter_by_label"),
    ({"mode": "unique", "desired_unique_count": "3", "min_similarity": "0.5"}, "spec_invalid", "min_similarity"),
    ({"mode": "unique", "desired_unique_count": "3", "distance_threshold": "0.3"}, "spec_invalid",
     "distance_threshold"),
    ({"mode": "unique", "desired_unique_count": "3", "floor_rule": "best_target"}, "spec_invalid", "floor_rule"),
    ({"mode": "unique", "desired_unique_count": "3", "label_mode": "per_label"}, "spec_invalid", "label_mode"),
    ({"mode": "unique", "desired_unique_count": "3", "exclude_targets": "true"}, "spec_invalid", "exclude_targets"),
    ({"mode": "unique", "desired_unique_count": "0"}, "spec_invalid", "desired_unique_count"),
    ({"mode": "unique", "desired_unique_count": "3", "allocation_policy": "class_stratified"}, "spec_invalid",
     "rare_class_list"),
    ({"mode": "unique", "desired_unique_count": "3", "allocation_policy": "per_class"}, "spec_invalid",
     "allocation_policy"),
    ({"desired_unique_count": "3"}, "spec_invalid", "desired_unique_count"),
    ({"allocation_policy": "global"}, "spec_invalid", "allocation_policy"),
    ({"rare_class_list": "dent"}, "spec_invalid", "rare_class_list"),
    ({"mode": "budget"}, "spec_invalid", "mode"),
])
def test_keys_a_mode_would_ignore_are_refused_before_a_run_folder_exists(aoi, keys, code, field):
    with pytest.raises(DeftError) as exc:
        run(aoi / "targets.parquet", aoi / "pool.parquet", run_dir=aoi / "r",
            overrides={"model": "thumbnail", **keys})
    assert (exc.value.code, exc.value.details["field"]) == (code, field)
    if field == "mode":
        assert "nearest, unique" in exc.value.message
    assert not (aoi / "r").exists()


def test_class_stratified_needs_labels_on_both_sides_before_any_embedding(aoi):
    pq.write_table(pa.table({"filepath": ["imgs/0.png"]}), aoi / "bare.parquet")
    with pytest.raises(DeftError) as exc:
        run(aoi / "bare.parquet", aoi / "pool.parquet", run_dir=aoi / "r",
            overrides={**UNIQUE, "desired_unique_count": "3", "allocation_policy": "class_stratified",
                       "rare_class_list": "dent"})
    assert (exc.value.code, exc.value.details["field"]) == ("column_missing", "targets")
    assert not (aoi / "r").exists()


def test_nearest_mode_reads_as_it_did(aoi):
    result = run(aoi / "targets.parquet", aoi / "pool.parquet", run_dir=aoi / "r",
                 overrides={"model": "thumbnail", "topn": "2"}, no_store=True)
    folder = Path(result.run_dir)
    assert result.match is None and "match" not in result.model_dump() and result.mine is not None
    spec = (folder / "mining_spec.yaml").read_text()
    keys = [line.split(":")[0] for line in spec.splitlines()]
    assert "topn" in keys and not {"mode", "desired_unique_count", "allocation_policy", "rare_class_list"} & set(keys)
    manifest = _manifest(folder)
    assert "unique" not in manifest["mining"] and "mode" not in manifest["mining_spec"]
    assert not (folder / "unique_matching").exists()
    text = (folder / "Mining_Report.md").read_text()
    assert "## Budget" not in text and "topn=2" in text and "deft-mine mine -e" in text


def test_a_tao_skill_ledger_records_a_round_whose_pool_was_all_selected_before(aoi):
    """Round 2 finds every pool image in the ledger: no pass runs, nothing is selected, and the
    ledger still gets its topn (the first share, ceil(budget / targets)) the loop's resume compares."""
    ledger = aoi / "mining_history.json"
    runs = [run(aoi / "targets.parquet", aoi / "pool.parquet", run_dir=aoi / f"r{i}", history=str(ledger),
                ledger_format="tao-skill", overrides={**UNIQUE, "desired_unique_count": "14"}, no_store=True)
            for i in (1, 2)]
    assert [r.match.retrieved_unique_count for r in runs] == [14, 0]
    assert "unique_count_short" in [w.code for w in runs[1].warnings]
    book = json.loads(ledger.read_text())
    assert [it.get("topn") for it in book["iterations"]] == [4, 4]  # ceil(14 / 4) both times
    assert pq.read_table(aoi / "r2" / "mined.parquet").num_rows == 0


def test_the_near_duplicate_rule_is_counted_and_reported_where_its_list_lies(tmp_path):
    """mode=unique with dedup_similarity: mining_summary.txt and run.json count the pool files set
    aside, and the report says what the rule did while claiming and names unique_matching/'s list."""
    from PIL import Image

    for i in range(6):
        write_image(tmp_path / "imgs" / f"{i}.png", seed=200 + i)
    for i in (2, 3):  # re-encoded: the same pixels in other bytes (byte copies are identical_images' business)
        with Image.open(tmp_path / "imgs" / f"{i}.png") as image:
            image.save(tmp_path / "imgs" / f"{i}_copy.png", compress_level=1)
        assert (tmp_path / "imgs" / f"{i}_copy.png").read_bytes() != (tmp_path / "imgs" / f"{i}.png").read_bytes()
    (tmp_path / "targets.csv").write_text("filepath\nimgs/0.png\nimgs/1.png\n")
    (tmp_path / "pool.csv").write_text("filepath\n" + "".join(f"imgs/{n}.png\n" for n in
                                                               ("2", "2_copy", "3", "3_copy", "4", "5")))
    result = run(tmp_path / "targets.csv", tmp_path / "pool.csv", run_dir=tmp_path / "r", no_store=True,
                 overrides={**UNIQUE, "desired_unique_count": "6", "dedup_similarity": "0.999"})
    folder = Path(result.run_dir)
    near = pq.read_table(folder / "unique_matching" / "near_duplicates.parquet")
    assert near.num_rows == 2 and result.mined == 4 and not (folder / "near_duplicates.parquet").exists()
    assert "near_duplicates_removed: 2" in (folder / "mining_summary.txt").read_text().splitlines()
    manifest = _manifest(folder)
    assert manifest["mining"]["summary"]["near_duplicates_removed"] == 2
    assert manifest["mining"]["unique"]["near_duplicates_removed"] == 2
    text = (folder / "Mining_Report.md").read_text()
    assert "Near-duplicate rule (`dedup_similarity` = 0.999): 2 pool images lay within that similarity of a " \
           "file already held and were never claimed" in text
    assert "`unique_matching/near_duplicates.parquet`" in text and "not recorded images" not in text
    assert "walking the mined images" not in text


def test_files_with_identical_bytes_are_claimed_once_whatever_the_threshold(tmp_path):
    """mode=unique without dedup_*: a pool file that repeats a held file's bytes is never claimed
    (identical_images, always on, as mode=nearest mines such files once), listed with kind
    identical_bytes; the budget goes to distinct files."""
    import shutil

    for i in range(5):
        write_image(tmp_path / "imgs" / f"{i}.png", seed=300 + i)
    shutil.copy(tmp_path / "imgs" / "2.png", tmp_path / "imgs" / "2_copy.png")
    (tmp_path / "targets.csv").write_text("filepath\nimgs/0.png\n")
    (tmp_path / "pool.csv").write_text("filepath\n" + "".join(f"imgs/{n}.png\n" for n in ("1", "2", "2_copy", "3", "4")))
    result = run(tmp_path / "targets.csv", tmp_path / "pool.csv", run_dir=tmp_path / "r", no_store=True,
                 overrides={**UNIQUE, "desired_unique_count": "5"})
    folder = Path(result.run_dir)
    mined = pq.read_table(folder / "mined.parquet").column("filepath").to_pylist()
    assert result.mined == 4 and len({"imgs/2.png", "imgs/2_copy.png"} & set(mined)) == 1
    near = pq.read_table(folder / "unique_matching" / "near_duplicates.parquet").to_pylist()
    assert [(r["kind"], r["similarity"]) for r in near] == [("identical_bytes", None)]
    assert {near[0]["filepath"], near[0]["duplicate_of"]} == {"imgs/2.png", "imgs/2_copy.png"}
    assert "identical_images: 1" in (folder / "mining_summary.txt").read_text().splitlines()
    summary = json.loads((folder / "unique_matching" / "summary.json").read_text())
    assert summary["identical_images"] == 1 and "near_duplicates_removed" not in summary
