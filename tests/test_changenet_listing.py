"""A ChangeNet CSV as a listing: one row per CSV row and light, resolved as the DEFT loop's
resolver resolves it, refused (or skipped and counted) before any embedding; and the two checks
every listing gets before embedding: an empty side, and a target label the pool lacks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from deft_mine.engine import changenet as cn
from deft_mine.engine.listings import open_listing
from deft_mine.errors import DeftError
from deft_mine.schemas.inputs import ChangeNetOptions
from deft_mine.tools.embed import embed
from deft_mine.tools.preflight import preflight
from deft_mine.tools.run import run

LIGHTS = ["SolderLight", "UniformLight"]
HEADER = "input_path,golden_path,label,object_name,boardname\n"


def jpg(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (24, 20), ((seed * 53) % 256, (seed * 97) % 256, (seed * 31) % 256)).save(path)
    return path


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    """A workspace: images/ (the images root) with two boards' components in two lights and their
    goldens, and pool.csv beside images/ (paths relative to images/)."""
    images = tmp_path / "images"
    for b, board in enumerate(("B1", "B2")):
        for c in (1, 2):
            for l, light in enumerate(LIGHTS):
                jpg(images / board / "PerComponent" / f"C{c}_{light}.jpg", 10 * b + 3 * c + l)
                jpg(images / "golden" / "images" / board / f"C{c}_{light}.jpg", 100 + 10 * b + 3 * c + l)
    (tmp_path / "pool.csv").write_text(HEADER + "B1/PerComponent,golden/images/B1/,PASS,C1,0510\n"
                                       "B1/PerComponent,golden/images/B1/,missing,C2,0510\n"
                                       "B2/PerComponent,,PASS,C1,0777\n")
    return tmp_path


def opts(ws: Path, **kw) -> ChangeNetOptions:
    return ChangeNetOptions(images_dir=str(ws / "images"), lights=LIGHTS, **kw)


def listing_of(ws: Path, csv: str = "pool.csv", **kw):
    return open_listing(ws / csv, "source", None, opts(ws, **kw))


def test_each_row_becomes_one_listing_row_per_light_with_every_column(ws):
    listing = listing_of(ws)
    assert listing.format == "changenet" and listing.images_root == (ws / "images").resolve()
    assert listing.schema.names == ["filepath", "input_path", "golden_path", "label", "object_name", "boardname",
                                    "light", "golden_filepath", "csv_row"]
    assert listing.schema.field("csv_row").type == pa.int64() and listing.schema.field("boardname").type == pa.string()
    rows = listing.table.to_pylist()
    expected = []
    for r, (board, golden, label, obj, name) in enumerate((("B1", "golden/images/B1/", "PASS", "C1", "0510"),
                                                          ("B1", "golden/images/B1/", "missing", "C2", "0510"),
                                                          ("B2", "", "PASS", "C1", "0777"))):
        for light in LIGHTS:
            expected.append({"filepath": f"{board}/PerComponent/{obj}_{light}.jpg",
                             "input_path": f"{board}/PerComponent", "golden_path": golden, "label": label,
                             "object_name": obj, "boardname": name, "light": light,
                             "golden_filepath": f"golden/images/{board}/{obj}_{light}.jpg" if golden else None,
                             "csv_row": r})
    assert rows == expected
    assert listing.rows == 6 and listing.unresolved == 0


@pytest.mark.parametrize("input_path", ["images/B1/PerComponent", "B1/PerComponent"])
def test_a_leading_images_component_resolves_with_or_without_it(ws, input_path):
    (ws / "p.csv").write_text(HEADER + f"{input_path},images/golden/images/B1,PASS,C1,x\n")
    rows = listing_of(ws, "p.csv").table.to_pylist()
    assert [r["filepath"] for r in rows] == [f"B1/PerComponent/C1_{light}.jpg" for light in LIGHTS]
    assert [r["golden_filepath"] for r in rows] == [f"golden/images/B1/C1_{light}.jpg" for light in LIGHTS]


def test_beside_the_csv_absolute_and_direct_file_forms(ws, tmp_path):
    # beside the CSV (images_dir elsewhere), an absolute folder, and a direct file (no object_name)
    other = tmp_path / "elsewhere"
    other.mkdir()
    outside = jpg(tmp_path / "loose" / "X_SolderLight.jpg", 7)
    (ws / "p.csv").write_text(HEADER + "images/B1/PerComponent,,PASS,C1,a\n"
                              f"{outside.parent},,PASS,X,b\n"
                              "images/B2/PerComponent/C2_SolderLight.jpg,,PASS,,c\n")
    listing = open_listing(ws / "p.csv", "source", None, ChangeNetOptions(images_dir=str(other)))
    assert listing.table.column("filepath").to_pylist() == [
        str(ws / "images/B1/PerComponent/C1_SolderLight.jpg"), str(outside),
        str(ws / "images/B2/PerComponent/C2_SolderLight.jpg")]  # outside the images root: absolute
    # the CSV's folder is the default images root: relative again
    listing = open_listing(ws / "p.csv", "source")
    assert listing.table.column("filepath").to_pylist()[0] == "images/B1/PerComponent/C1_SolderLight.jpg"


def test_candidates_are_listed_in_the_resolvers_order(ws):
    layout = cn.Layout(Path("/data/images"), Path("/work/csv"), ("SolderLight",), ".jpg")
    root, here = str(layout.images_dir), str(layout.csv_dir)
    assert [str(p) for p in cn.candidates("images/B1/PC", "C1", "SolderLight", layout)] == [
        f"{here}/images/B1/PC", f"{root}/images/B1/PC", f"{root}/B1/PC",
        f"{here}/images/B1/PC/C1_SolderLight.jpg", f"{root}/images/B1/PC/C1_SolderLight.jpg",
        f"{root}/B1/PC/C1_SolderLight.jpg"]
    assert [str(p) for p in cn.candidates("/abs/PC", "C1", "L", layout)] == ["/abs/PC", "/abs/PC/C1_L.jpg"]
    # a candidate two bases name alike is tried once
    assert len(cn.candidates("images/B1/PC", "C1", "L", cn.layout_of(opts(ws), ws / "pool.csv", ws))) == 4
    layout = cn.layout_of(opts(ws), ws / "pool.csv", ws)
    root = str(layout.images_dir)
    found = cn.resolve("B1/PerComponent", "C1", "SolderLight", layout)
    assert found.path == f"{root}/B1/PerComponent/C1_SolderLight.jpg"
    missing = cn.resolve("B1/PerComponent", "C9", "SolderLight", layout)
    assert missing.path is None and missing.found == () and len(missing.tried) == 4


def test_two_names_of_one_file_are_one_match_two_files_are_refused(ws):
    # the CSV inside the images root: beside-the-CSV and under-the-root name the same files
    (ws / "images" / "p.csv").write_text(HEADER + "B1/PerComponent,golden/images/B1,PASS,C1,a\n")
    assert open_listing(ws / "images" / "p.csv", "source", None, ChangeNetOptions(lights=LIGHTS)).rows == 2
    # beside the CSV, and through a symlink under the root: two names of one file, one match
    os.symlink(ws / "images", ws / "images" / "images", target_is_directory=True)
    (ws / "p.csv").write_text(HEADER + "images/B1/PerComponent,,PASS,C1,a\n")
    assert listing_of(ws, "p.csv").table.column("filepath").to_pylist()[0] == "B1/PerComponent/C1_SolderLight.jpg"
    (ws / "images" / "images").unlink()
    # two different files: refused, naming both
    jpg(ws / "images" / "images" / "B1" / "PerComponent" / "C1_SolderLight.jpg", 99)
    (ws / "p.csv").write_text(HEADER + "images/B1/PerComponent,,PASS,C1,a\n")
    with pytest.raises(DeftError) as exc:
        listing_of(ws, "p.csv")
    err = exc.value
    assert err.code == "changenet_unresolved" and (err.details["row"], err.details["line"]) == (0, 2)
    assert err.details["light"] == "SolderLight" and len(err.details["found"]) == 2
    assert "row 0 (line 2), light SolderLight: input_path resolves to 2 files" in err.message


def test_an_unresolved_row_is_refused_naming_row_light_and_paths_or_skipped_and_counted(ws):
    (ws / "images" / "B2" / "PerComponent" / "C1_UniformLight.jpg").unlink()
    with pytest.raises(DeftError) as exc:
        listing_of(ws)
    err = exc.value
    assert err.code == "changenet_unresolved" and err.details["field"] == "input_path"
    assert (err.details["row"], err.details["line"], err.details["light"]) == (2, 4, "UniformLight")
    assert str(ws.resolve() / "images/B2/PerComponent/C1_UniformLight.jpg") in err.details["tried"]
    assert "line 4" in err.message and "--skip-unresolved" in err.fix
    listing = listing_of(ws, skip_unresolved=True)
    assert listing.rows == 5 and listing.unresolved == 1
    assert listing.table.column("csv_row").to_pylist() == [0, 0, 1, 1, 2]
    assert "row 2 (line 4), light UniformLight" in listing.unresolved_examples[0]


def test_a_golden_that_does_not_resolve_is_refused(ws):
    (ws / "images" / "golden" / "images" / "B1" / "C2_SolderLight.jpg").unlink()
    with pytest.raises(DeftError) as exc:
        listing_of(ws)
    assert exc.value.code == "changenet_unresolved" and exc.value.details["field"] == "golden_path"
    assert (exc.value.details["row"], exc.value.details["light"]) == (1, "SolderLight")
    assert listing_of(ws, skip_unresolved=True).unresolved == 1


def test_a_light_that_resolves_nowhere_is_refused_even_when_skipping(ws):
    for skip in (False, True):
        with pytest.raises(DeftError) as exc:
            open_listing(ws / "pool.csv", "source", None, ChangeNetOptions(
                images_dir=str(ws / "images"), lights=["SolderLight", "TopLight"], skip_unresolved=skip))
        assert exc.value.code == "changenet_light_unresolved" and exc.value.details["light"] == "TopLight"
        assert any(p.endswith("C1_TopLight.jpg") for p in exc.value.details["tried"])
    with pytest.raises(DeftError) as exc:  # the wrong extension is the same refusal
        listing_of(ws, image_ext="png")
    assert exc.value.code == "changenet_light_unresolved" and "'.png'" in exc.value.message


def test_lights_and_extension_come_from_a_changenet_spec(ws):
    spec = ws / "spec.yaml"
    spec.write_text("dataset:\n  classify:\n    image_ext: jpg\n    input_map:\n      UniformLight: 1\n"
                    "      SolderLight: 0\n")
    listing = open_listing(ws / "pool.csv", "source", None,
                           ChangeNetOptions(images_dir=str(ws / "images"), changenet_spec=str(spec)))
    assert listing.table.column("light").to_pylist()[:2] == ["SolderLight", "UniformLight"]
    # default: SolderLight only
    listing = open_listing(ws / "pool.csv", "source", None, ChangeNetOptions(images_dir=str(ws / "images")))
    assert set(listing.table.column("light").to_pylist()) == {"SolderLight"} and listing.rows == 3
    spec.write_text("dataset:\n  classify:\n    batch_size: 4\n")
    with pytest.raises(DeftError) as exc:
        open_listing(ws / "pool.csv", "source", None, ChangeNetOptions(changenet_spec=str(spec)))
    assert exc.value.code == "changenet_spec_invalid"


def test_bad_inputs_are_refused_with_their_codes(ws):
    (ws / "half.csv").write_text("input_path,label\nB1/PerComponent,PASS\n")
    with pytest.raises(DeftError) as exc:
        open_listing(ws / "half.csv", "source")
    assert exc.value.code == "changenet_columns_missing"
    assert exc.value.details["missing"] == ["golden_path", "object_name"]
    with pytest.raises(DeftError) as exc:
        open_listing(ws / "pool.csv", "source", None, ChangeNetOptions(images_dir=str(ws / "pool.csv")))
    assert exc.value.code == "images_dir_invalid" and exc.value.details["field"] == "images_dir"
    (ws / "nolabel.csv").write_text(HEADER + "B1/PerComponent,,PASS,C1,a\nB1/PerComponent,, ,C2,a\n")
    with pytest.raises(DeftError) as exc:
        listing_of(ws, "nolabel.csv")
    assert exc.value.code == "label_empty" and (exc.value.details["row"], exc.value.details["line"]) == (1, 3)
    (ws / "clash.csv").write_text("input_path,golden_path,label,object_name,light\nB1/PerComponent,,PASS,C1,x\n")
    with pytest.raises(DeftError) as exc:
        listing_of(ws, "clash.csv")
    assert exc.value.code == "changenet_column_reserved"


def test_a_csv_with_filepath_stays_a_plain_csv(ws):
    (ws / "plain.csv").write_text("filepath,input_path,golden_path,label,object_name\n"
                                  "images/B1/PerComponent/C1_SolderLight.jpg,B1/PerComponent,,PASS,C1\n")
    listing = open_listing(ws / "plain.csv", "source")
    assert listing.format == "csv" and "light" not in listing.schema.names


def test_images_dir_and_a_different_image_root_are_refused(ws):
    with pytest.raises(DeftError) as exc:
        embed(str(ws / "pool.csv"), str(ws / "e.parquet"), images_dir=str(ws / "images"),
              overrides={"model": "thumbnail", "image_root": str(ws)})
    assert exc.value.code == "images_dir_conflict"
    assert {exc.value.details["images_dir"], exc.value.details["image_root"]} == {str(ws / "images"), str(ws)}
    assert not (ws / "e.parquet").exists()


def test_run_with_a_changenet_pool_and_targets(ws):
    (ws / "targets.csv").write_text(HEADER + "B1/PerComponent,golden/images/B1/,PASS,C1,0510\n")
    (ws / "images" / "B1" / "PerComponent" / "C2_UniformLight.jpg").unlink()
    result = run(str(ws / "targets.csv"), str(ws / "pool.csv"), run_dir=str(ws / "r"),
                 images_dir=str(ws / "images"), lights=LIGHTS, skip_unresolved=True,
                 overrides={"model": "thumbnail", "topn": 2})
    source = pq.read_table(result.source_embed.output_parquet)
    assert source.schema.names[:1] == ["filepath"] and {"light", "golden_filepath", "csv_row", "boardname",
                                                         "embedding"} <= set(source.schema.names)
    assert source.num_rows == 5 and result.source_embed.input_rows == 6
    assert result.source_embed.skipped_by_reason == {"unresolved": 1}
    (skipped,) = [w for w in result.warnings if w.code == "images_skipped"]
    assert skipped.details["side"] == "source" and skipped.details["by_reason"] == {"unresolved": 1}
    assert result.target_embed.rows == 2 and result.mined >= 1
    manifest = json.loads((ws / "r" / "run.json").read_text())
    assert manifest["inputs"]["source"]["format"] == "changenet"
    # without skipping, the same pool is refused before a run folder exists
    with pytest.raises(DeftError) as exc:
        run(str(ws / "targets.csv"), str(ws / "pool.csv"), run_dir=str(ws / "r2"), images_dir=str(ws / "images"),
            lights=LIGHTS, overrides={"model": "thumbnail"})
    assert exc.value.code == "changenet_unresolved" and not (ws / "r2").exists()


def test_preflight_resolves_a_changenet_pool(ws):
    result = preflight(source=str(ws / "pool.csv"), images_dir=str(ws / "images"), lights=LIGHTS)
    assert not [w for w in result.warnings if w.code == "images_skipped"]
    with pytest.raises(DeftError) as exc:
        preflight(source=str(ws / "pool.csv"), images_dir=str(ws / "images"), lights=["Nope"])
    assert exc.value.code == "changenet_light_unresolved"


def test_an_empty_listing_is_warned_by_embed_run_and_preflight(image_set):
    pq.write_table(pa.table({"filepath": pa.array([], pa.string())}), image_set / "empty.parquet")
    done = embed(str(image_set / "empty.parquet"), str(image_set / "e.parquet"), overrides={"model": "thumbnail"})
    (warning,) = [w for w in done.warnings if w.code == "listing_empty"]
    assert str(image_set / "empty.parquet") in warning.message and done.rows == 0
    checked = preflight(targets=str(image_set / "targets.parquet"), source=str(image_set / "empty.parquet"))
    (warning,) = [w for w in checked.warnings if w.code == "listing_empty"]
    assert warning.details["side"] == "source" and warning.message.startswith("source: ")
    result = run(str(image_set / "targets.parquet"), str(image_set / "empty.parquet"), run_dir=str(image_set / "r"),
                 overrides={"model": "thumbnail"})
    (warning,) = [w for w in result.warnings if w.code == "listing_empty"]
    assert warning.details["side"] == "source" and result.mined == 0


def test_the_yield_precheck_warns_before_embedding_in_every_label_mode(ws):
    (ws / "targets.csv").write_text(HEADER + "B1/PerComponent,golden/images/B1/,Shift,C1,a\n"
                                    "B1/PerComponent,golden/images/B1/, pass ,C2,a\n")
    for mode, label_filter in (("post_filter", "true"), ("post_filter", "false"), ("per_label", "true")):
        result = run(str(ws / "targets.csv"), str(ws / "pool.csv"), output_dir=str(ws / "out"),
                     images_dir=str(ws / "images"), overrides={"model": "thumbnail", "label_mode": mode,
                                                               "filter_by_label": label_filter})
        (warning,) = [w for w in result.warnings if w.code == "label_missing_in_pool"]
        assert warning.details["labels"] == ["Shift"]  # " pass " is PASS by the container's rule
        if mode == "post_filter":
            assert warning.details["targets_per_label"] == {"Shift": 1} and warning.details["precheck"]
            assert "guaranteed 0" in warning.message
    checked = preflight(targets=str(ws / "targets.csv"), source=str(ws / "pool.csv"), images_dir=str(ws / "images"))
    (warning,) = [w for w in checked.warnings if w.code == "label_missing_in_pool"]
    assert warning.details["targets_per_label"] == {"Shift": 1}


def test_a_dotdot_or_linked_folder_is_written_as_the_loops_resolver_writes_it(ws):
    """The loop writes the real file relative to the real images root: `..` and a linked folder
    resolved (else absolute), so its ledger and ours name each image the same way."""
    (ws / "images" / "B1link").symlink_to(ws / "images" / "B1")
    (ws / "p.csv").write_text(HEADER + "../images/B1/PerComponent,,PASS,C1,a\nB1link/PerComponent,,PASS,C2,b\n")
    rows = listing_of(ws, "p.csv").table.to_pylist()
    assert [r["filepath"] for r in rows] == [f"B1/PerComponent/C{c}_{light}.jpg" for c in (1, 2) for light in LIGHTS]
