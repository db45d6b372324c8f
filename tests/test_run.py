"""The run tool called directly, as pytest and the MCP server will: folders, CSV pools, failures."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deft_mine.errors import DeftError
from deft_mine.tools.run import run


def test_run_with_a_csv_pool_and_inline_overrides(image_set):
    (image_set / "pool.csv").write_text("filepath,label,lot\n" + "".join(
        f"imgs/{i}.png,{'ab'[i % 2]},L{i}\n" for i in range(2, 6)))
    result = run(image_set / "targets.parquet", image_set / "pool.csv", run_dir=image_set / "r",
                 overrides={"model": "thumbnail", "topn": 2, "knn_metric": "manhattan"})
    source = pq.read_table(result.source_embed.output_parquet)
    assert source.schema.names == ["filepath", "label", "lot", "embedding"]
    manifest = json.loads((image_set / "r" / "run.json").read_text())
    assert manifest["inputs"]["source"]["format"] == "csv"
    # the CSV is kept as the run read it: a filepath parquet beside the embeddings, every row and column
    listing = pq.read_table(image_set / "r" / "source_listing.parquet")
    assert listing.to_pylist() == [{"filepath": f"imgs/{i}.png", "label": "ab"[i % 2], "lot": f"L{i}"} for i in range(2, 6)]
    assert {"source_listing.parquet", "target_listing.parquet"} <= set(manifest["artifacts"])
    assert manifest["mining_spec"]["knn_metric"] == "manhattan"
    assert result.mine.summary["pairs"] == 4 and result.mined == pq.read_table(result.mined_parquet).num_rows


def test_skipped_images_surface_in_the_run_result(image_set):
    pq.write_table(pa.table({"filepath": ["imgs/2.png", "imgs/gone.png", "imgs/3.png"]}),
                   image_set / "pool2.parquet")
    result = run(image_set / "targets.parquet", image_set / "pool2.parquet", output_dir=image_set,
                 overrides=["model=thumbnail", "topn=1"])
    (warning,) = [w for w in result.warnings if w.code == "images_skipped"]
    assert warning.details["side"] == "source" and warning.details["count"] == 1
    assert warning.message.startswith("source: ")
    manifest = json.loads(open(result.run_dir + "/run.json").read())
    assert manifest["embeddings"]["source"]["skipped"] == 1
    assert [w["code"] for w in manifest["warnings"]] == [w.code for w in result.warnings]


def test_a_bad_mining_spec_is_refused_before_any_work(image_set):
    with pytest.raises(DeftError) as exc:
        run(image_set / "targets.parquet", image_set / "pool.parquet", output_dir=image_set / "out",
            overrides={"model": "thumbnail", "knn_metric": "jaccard"})
    assert exc.value.details["field"] == "knn_metric"
    assert not (image_set / "out").exists()


def test_a_listing_without_filepath_is_refused_before_a_run_folder_exists(image_set):
    pq.write_table(pa.table({"path": ["imgs/2.png"]}), image_set / "nofilepath.parquet")
    with pytest.raises(DeftError) as exc:
        run(image_set / "targets.parquet", image_set / "nofilepath.parquet", run_dir=image_set / "r",
            overrides={"model": "thumbnail"})
    assert exc.value.code == "column_missing" and exc.value.details["field"] == "source"
    assert not (image_set / "r").exists()


def test_a_failed_run_says_so_in_its_manifest(image_set):
    pq.write_table(pa.table({"filepath": ["imgs/absent.png"]}), image_set / "unreadable.parquet")
    with pytest.raises(DeftError) as exc:
        run(image_set / "targets.parquet", image_set / "unreadable.parquet", run_dir=image_set / "r",
            overrides={"model": "thumbnail"})
    assert exc.value.code == "no_readable_images"
    manifest = json.loads((image_set / "r" / "run.json").read_text())
    assert manifest["status"] == "failed" and manifest["error"]["code"] == "no_readable_images"
    assert (image_set / "r" / "target_embeddings.parquet").exists()  # finished work is kept


def test_exactly_one_of_output_dir_and_run_dir(image_set):
    for kwargs in ({}, {"output_dir": image_set, "run_dir": image_set / "r"}):
        with pytest.raises(DeftError) as exc:
            run(image_set / "targets.parquet", image_set / "pool.parquet", **kwargs)
        assert "exactly one" in exc.value.message


def test_an_empty_target_list_is_a_valid_zero_row_run(image_set):
    pq.write_table(pa.table({"filepath": pa.array([], pa.string())}), image_set / "none.parquet")
    result = run(image_set / "none.parquet", image_set / "pool.parquet", run_dir=image_set / "r",
                 overrides={"model": "thumbnail"})
    assert result.mined == 0 and pq.read_table(result.mined_parquet).num_rows == 0
    assert pq.read_table(result.target_embed.output_parquet).schema.names == ["filepath", "embedding"]


def test_the_run_records_every_pair_it_found(image_set):
    result = run(image_set / "targets.parquet", image_set / "pool.parquet", run_dir=image_set / "r",
                 overrides={"model": "thumbnail", "topn": 3, "filter_by_label": True})
    pairs = pq.read_table(image_set / "r" / "mined_pairs.parquet").to_pylist()
    assert len(pairs) == result.mine.summary["pairs"] == 6
    assert sum(p["kept"] for p in pairs) == result.mine.summary["kept_pairs"]
    assert all(p["kept"] == (p["target_label"] == p["source_label"]) for p in pairs)
    assert [(p["target_row"], p["rank"]) for p in pairs] == [(t, r) for t in (0, 1) for r in (1, 2, 3)]
    kept_paths = list(dict.fromkeys(p["filepath"] for p in pairs if p["kept"]))
    assert pq.read_table(result.mined_parquet).column("filepath").to_pylist() == kept_paths


def test_runs_with_a_history_ledger_never_select_an_image_twice(image_set):
    ledger = image_set / "ledger.json"
    first = run(image_set / "targets.parquet", image_set / "pool.parquet", run_dir=image_set / "r1",
                overrides={"model": "thumbnail", "topn": 1}, history=ledger)
    second = run(image_set / "targets.parquet", image_set / "pool.parquet", run_dir=image_set / "r2",
                 overrides={"model": "thumbnail", "topn": 3}, history=ledger)
    assert (first.select.iteration, second.select.iteration) == (1, 2)
    one = pq.read_table(image_set / "r1" / "mined.parquet").column("filepath").to_pylist()
    two = pq.read_table(image_set / "r2" / "mined.parquet").column("filepath").to_pylist()
    candidates = pq.read_table(image_set / "r2" / "mined_candidates.parquet").column("filepath").to_pylist()
    assert not set(one) & set(two) and two == [p for p in candidates if p not in one]
    assert second.mined == len(two) == second.select.newly_selected
    assert second.select.previously_selected == len(set(one) & set(candidates))
    manifest = json.loads((image_set / "r2" / "run.json").read_text())
    assert [it["cumulative"] for it in manifest["history"]["iterations"]] == [len(one), len(one) + len(two)]
    text = (image_set / "r2" / "Mining_Report.md").read_text()
    assert "## History" in text and text.index("## History") < text.index("## Recommended Actions")
    assert f"| 2 | {len(candidates)} | {second.select.previously_selected} | {len(two)} |" in text
