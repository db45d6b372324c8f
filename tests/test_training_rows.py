"""mined_training_rows.csv: a ChangeNet pool's mined components as ChangeNet training rows, checked
against brute-force references and an independent re-implementation of the DEFT loop's validator."""

from __future__ import annotations

import csv
import json
import random
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_image

from deft_mine.engine import changenet as cn
from deft_mine.engine import training_rows as tr
from deft_mine.errors import DeftError
from deft_mine.schemas.inputs import PassGolden
from deft_mine.tools.report import report
from deft_mine.tools.run import run

LIGHTS = ("SolderLight", "UniformLight")
EXT = ".jpg"
LISTING_COLUMNS = ["filepath", "input_path", "golden_path", "label", "object_name", "boardname", "light",
                   "golden_filepath", "csv_row"]


def component(i: int, label: str = "short", golden: bool = True, board: str = "B1", **extra) -> dict:
    return {"dir": f"images/{board}/PerComponent", "obj": f"C{i}", "label": label, "board": board,
            "golden_dir": f"golden/{board}/PerComponent" if golden else None, **extra}


def workspace(root: Path, comps: list[dict], images: bool = True) -> pa.Table:
    """Files on disk for `comps` (every light, image and golden, unless a comp says `missing`), and the
    standard listing a ChangeNet pool gives: one row per (CSV row, light)."""
    rows = []
    for i, c in enumerate(comps):
        for light in LIGHTS:
            image = f"{c['dir']}/{c['obj']}_{light}{EXT}"
            golden = None if c["golden_dir"] is None else f"{c['golden_dir']}/{c['obj']}_{light}{EXT}"
            for rel, what in ((image, "image"), (golden, "golden")):
                if rel is not None and (what, light) not in c.get("missing", ()):
                    if images:
                        write_image(root / rel, seed=zlib.crc32(rel.encode()), size=(8, 6))
                    else:
                        (root / rel).parent.mkdir(parents=True, exist_ok=True)
                        (root / rel).write_bytes(b"x")
            rows.append({"filepath": image, "input_path": c["dir"], "golden_path": c["golden_dir"] or "",
                         "label": c["label"], "object_name": c["obj"], "boardname": c["board"], "light": light,
                         "golden_filepath": golden, "csv_row": i})
    return pa.Table.from_pylist(rows, pa.schema([(n, pa.int64() if n == "csv_row" else pa.string())
                                                 for n in LISTING_COLUMNS]))


def loop_validator(path: Path, root: Path, lights=LIGHTS, ext=EXT, validation: Path | None = None) -> list[str]:
    """The DEFT loop's checks on a training CSV, written afresh from its rules (stdlib csv, as it reads)."""
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        columns, rows = reader.fieldnames or [], list(reader)
    errors = [f"missing column {c}" for c in ("input_path", "golden_path", "label", "object_name")
              if c not in columns]
    for i, row in enumerate(rows):
        raw = row["label"] or ""
        if not raw.strip():
            errors.append(f"row {i}: empty label")
        elif raw != ("PASS" if raw == "PASS" else raw.lower().strip()):
            errors.append(f"row {i}: label case {raw!r}")
        for col in ("input_path", "golden_path"):
            value = (row[col] or "").strip()
            if not value or (root / value).is_file():
                errors.append(f"row {i}: {col} {value!r} is empty or a file, not a directory")
            for light in lights:
                if not (root / value / f"{row['object_name'].strip()}_{light}{ext}").is_file():
                    errors.append(f"row {i}: {col} {value}/{row['object_name']}_{light}{ext} missing")
    if validation is not None:
        with validation.open(newline="") as fh:
            reader = csv.DictReader(fh)
            val_columns, val_rows = reader.fieldnames or [], list(reader)
        keys = [k for k in ("input_path", "golden_path", "label", "object_name", "boardname")
                if k in columns and k in val_columns]
        held = {tuple((r.get(k) or "").strip() for k in keys) for r in val_rows}
        errors += [f"row {i}: leak" for i, r in enumerate(rows) if tuple((r.get(k) or "").strip() for k in keys) in held]
    return errors


def written(rows: tr.TrainingRows, path: Path) -> list[dict]:
    tr.write(path, rows)
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize("label, canonical", [("PASS", "PASS"), ("pass", "PASS"), (" Pass ", "PASS"),
                                              ("Short", "short"), ("short ", "short"), (" MISSING\t", "missing"),
                                              ("", ""), ("  ", ""), (None, "")])
def test_labels_take_changenets_canonical_case(label, canonical):
    assert cn.canonical_label(label) == canonical


def test_the_lights_of_a_component_collapse_into_one_row_in_first_appearance_order(tmp_path):
    comps = [component(i, label) for i, label in enumerate(["Short", " PASS", "pass", "short "])]
    listing = workspace(tmp_path, comps)
    files = listing.column("filepath").to_pylist()  # (comp, light) in order: comp i light j at 2i + j
    mined = [files[5], files[0], files[4], files[1], files[3]]  # comps 2, 0, 2, 0, 1
    rows = tr.build(mined, listing, tmp_path, PassGolden.none)
    assert rows.components == 3 and not rows.left_out and not rows.leaks
    out = written(rows, tmp_path / "rows.csv")
    assert list(out[0]) == ["input_path", "golden_path", "label", "object_name", "boardname"]
    assert [(r["object_name"], r["label"]) for r in out] == [("C2", "PASS"), ("C0", "short"), ("C1", "PASS")]
    assert all(r["input_path"] == "images/B1/PerComponent" and r["golden_path"] == "golden/B1/PerComponent"
               for r in out)
    assert loop_validator(tmp_path / "rows.csv", tmp_path) == []


def test_metadata_columns_are_carried_in_pool_order_and_quoted_only_when_needed(tmp_path):
    listing = workspace(tmp_path, [component(0), component(1)])
    listing = listing.append_column("note", pa.array(['a, "b"', None, "plain", "plain"]))
    rows = tr.build(listing.column("filepath").to_pylist(), listing, tmp_path, PassGolden.none)
    out = written(rows, tmp_path / "rows.csv")
    assert [(r["boardname"], r["note"]) for r in out] == [("B1", 'a, "b"'), ("B1", "plain")]
    # the header is plain; Arrow quotes the rows once one value needs it
    assert (tmp_path / "rows.csv").read_text().splitlines()[1].startswith('"images/B1/PerComponent"')
    rows = tr.build(listing.column("filepath").to_pylist()[2:], listing, tmp_path, PassGolden.none)
    written(rows, tmp_path / "rows.csv")
    assert (tmp_path / "rows.csv").read_text().splitlines() == [
        "input_path,golden_path,label,object_name,boardname,note",
        "images/B1/PerComponent,golden/B1/PerComponent,short,C1,B1,plain"]


def test_a_row_that_cannot_form_a_training_row_is_left_out_by_reason(tmp_path):
    comps = [component(0, "short", golden=False),  # no golden, not PASS
             component(1, "PASS", golden=False),  # PASS without golden: left out unless asked
             component(2, "short", missing={("image", "UniformLight")}),
             component(3, "short", missing={("golden", "UniformLight")}),
             component(4, "  "),
             component(5, "short")]
    listing = workspace(tmp_path, comps)
    files = listing.column("filepath").to_pylist()
    mined = [files[2 * i] for i in range(6)] + ["images/B1/PerComponent/elsewhere.jpg"]
    rows = tr.build(mined, listing, tmp_path, PassGolden.none)
    reasons = {x.csv_row: str(x.reason) for x in rows.left_out}
    assert reasons == {0: "no_golden", 1: "no_golden", 2: "light_missing", 3: "golden_missing", 4: "empty_label",
                       None: "not_in_pool"}
    assert rows.components == 7 and rows.table.num_rows == 1
    assert rows.by_reason() == {"empty_label": 1, "golden_missing": 1, "light_missing": 1, "no_golden": 2,
                                "not_in_pool": 1}
    (warning,) = rows.warnings(None)
    assert warning.code == "training_rows_left_out" and warning.details["count"] == 6
    # every reason has an example, before any second example of one reason
    assert {e["reason"] for e in warning.details["examples"]} >= {"no_golden", "light_missing", "golden_missing",
                                                                  "empty_label", "not_in_pool"}
    assert "UniformLight" in next(x.detail for x in rows.left_out if x.csv_row == 2)
    # asked, a PASS row without golden uses its own image directory as its golden
    rows = tr.build(mined, listing, tmp_path, PassGolden.self)
    out = written(rows, tmp_path / "rows.csv")
    assert [(r["object_name"], r["golden_path"]) for r in out] == [("C1", "images/B1/PerComponent"),
                                                                   ("C5", "golden/B1/PerComponent")]
    assert {str(x.reason) for x in rows.left_out if x.csv_row == 0} == {"no_golden"}  # never for non-PASS
    assert loop_validator(tmp_path / "rows.csv", tmp_path) == []


def test_images_outside_the_root_or_not_named_by_the_siamese_form_are_left_out(tmp_path):
    root = tmp_path / "ws"
    listing = workspace(root, [component(0), component(1)])
    outside = write_image(tmp_path / "other" / "C9_SolderLight.jpg", 1, (8, 6))
    odd = write_image(root / "images" / "B1" / "PerComponent" / "C1.jpg", 2, (8, 6))
    data = listing.to_pylist()
    data[0]["filepath"], data[2]["filepath"] = str(outside), "images/B1/PerComponent/C1.jpg"
    listing = pa.Table.from_pylist(data, listing.schema)
    rows = tr.build([str(outside), str(odd)], listing, root, PassGolden.none)  # odd: absolute, under the root
    assert [(x.csv_row, str(x.reason)) for x in rows.left_out] == [(0, "outside_images_root"), (1, "not_siamese")]


def test_a_training_row_equal_to_a_validation_row_is_left_out_as_a_leak(tmp_path):
    comps = [component(i, "short", board=board) for i, board in enumerate(["B1", "B1", "B2"])]
    listing = workspace(tmp_path, comps)
    files = listing.column("filepath").to_pylist()
    validation = tmp_path / "validation.csv"
    validation.write_text("input_path,golden_path,label,object_name,boardname,extra\n"
                          " images/B1/PerComponent ,golden/B1/PerComponent,short, C0 ,B1,x\n"  # a leak (stripped)
                          "images/B1/PerComponent,golden/B1/PerComponent,short,C1,B9,x\n")  # another board
    rows = tr.build([files[0], files[2], files[4]], listing, tmp_path, PassGolden.none, tr.read_validation(validation))
    assert rows.join_keys == ["input_path", "golden_path", "label", "object_name", "boardname"]
    assert [r["object_name"] for r in rows.leaks] == ["C0"] and rows.components == 3
    out = written(rows, tmp_path / "rows.csv")
    assert [r["object_name"] for r in out] == ["C1", "C2"]
    assert loop_validator(tmp_path / "rows.csv", tmp_path, validation=validation) == []
    (warning,) = rows.warnings(tr.read_validation(validation))
    assert warning.code == "training_rows_leaked" and warning.details["count"] == 1
    # without boardname in the validation CSV, the keys are the four: C1 is a leak too
    validation.write_text("input_path,golden_path,label,object_name\n"
                          "images/B1/PerComponent,golden/B1/PerComponent,short,C1\n")
    rows = tr.build([files[0], files[2]], listing, tmp_path, PassGolden.none, tr.read_validation(validation))
    assert rows.join_keys == list(cn.COLUMNS) and [r["object_name"] for r in rows.leaks] == ["C1"]


def test_a_validation_csv_without_any_leak_key_is_refused(tmp_path):
    (tmp_path / "v.csv").write_text("path,cls\na,b\n")
    with pytest.raises(DeftError) as exc:
        tr.read_validation(tmp_path / "v.csv")
    assert exc.value.code == "column_missing" and exc.value.details["field"] == "validation_csv"


@pytest.mark.parametrize("seed", range(12))
def test_random_pools_against_a_brute_force_reference(tmp_path, seed):
    rng = random.Random(seed)
    labels = ["PASS", "pass", " Pass ", "Short", "short ", "MISSING", " "]
    comps = []
    for i in range(rng.randint(1, 14)):
        missing = {(what, light) for what in ("image", "golden") for light in LIGHTS if rng.random() < 0.12}
        comps.append(component(i, rng.choice(labels), golden=rng.random() < 0.7, board=rng.choice(["B1", "B2"]),
                               missing=missing))
    listing = workspace(tmp_path, comps, images=False)
    files = listing.column("filepath").to_pylist()
    mined = [files[rng.randrange(len(files))] for _ in range(rng.randint(0, 2 * len(files)))]
    pass_golden = rng.choice(list(PassGolden))
    # the reference: the components by first appearance, each judged from how it was made
    order = list(dict.fromkeys(files.index(f) // len(LIGHTS) for f in mined))
    expected, reasons = [], {}
    for i in order:
        c = comps[i]
        label = "PASS" if c["label"].strip().upper() == "PASS" else c["label"].lower().strip()
        own = c["golden_dir"] is None and label == "PASS" and pass_golden == "self"
        checks = [(f"{what}_missing" if what == "golden" else "light_missing", (what, light))
                  for light in LIGHTS for what in ("image", "golden")]
        if own:  # the golden is the image itself
            checks = [(r, ("image", k[1])) if k[0] == "golden" else (r, k) for r, k in checks]
        why = ("empty_label" if not label else "no_golden" if c["golden_dir"] is None and not own else
               next((r.replace("image", "light") for r, k in checks if k in c["missing"]), None))
        if why:
            reasons[i] = why
        else:
            expected.append({"input_path": c["dir"], "golden_path": c["dir"] if own else c["golden_dir"],
                             "label": label, "object_name": c["obj"], "boardname": c["board"]})
    validation = None
    if expected and rng.random() < 0.5:
        leaked = rng.sample(expected, rng.randint(1, len(expected)))
        validation = tmp_path / "validation.csv"
        with validation.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, ["object_name", "label", "input_path", "golden_path", "boardname"])
            writer.writeheader()
            writer.writerows({k: f" {v} " for k, v in r.items()} for r in leaked)
        expected = [r for r in expected if r not in leaked]
    rows = tr.build(mined, listing, tmp_path, pass_golden, validation and tr.read_validation(validation))
    assert {x.csv_row: str(x.reason) for x in rows.left_out} == reasons
    assert rows.components == len(order) == rows.table.num_rows + len(rows.left_out) + len(rows.leaks)
    assert written(rows, tmp_path / "rows.csv") == expected
    assert loop_validator(tmp_path / "rows.csv", tmp_path, validation=validation) == []


# ----------------------------------------------------------------------------- through run


def changenet_run_set(tmp_path: Path) -> tuple[Path, Path]:
    """A ChangeNet pool already in the standard listing's form (what a ChangeNet CSV becomes), and
    targets: C0..C3 PASS/short with goldens, C4 short without one, C5 PASS without one."""
    comps = [component(i, label) for i, label in enumerate(["PASS", "Short", "pass", "short"])]
    comps += [component(4, "short", golden=False), component(5, " PASS ", golden=False)]
    listing = workspace(tmp_path, comps)
    pool = tmp_path / "pool.parquet"
    pq.write_table(listing, pool)
    pq.write_table(pa.table({"filepath": listing.column("filepath").to_pylist()[:4]}), tmp_path / "targets.parquet")
    return tmp_path / "targets.parquet", pool


def test_run_with_a_changenet_pool_writes_validated_training_rows(tmp_path):
    targets, pool = changenet_run_set(tmp_path)
    validation = tmp_path / "validation.csv"
    validation.write_text("input_path,golden_path,label,object_name,boardname\n"
                          "images/B1/PerComponent,golden/B1/PerComponent,short,C3,B1\n")
    result = run(targets, pool, run_dir=tmp_path / "r", validation_csv=validation, pass_golden="self",
                 overrides={"model": "thumbnail", "topn": 12, "image_root": str(tmp_path)})
    path = tmp_path / "r" / "mined_training_rows.csv"
    facts = result.training_rows
    assert facts is not None and facts.path == str(path) and facts.components == 6
    assert (facts.rows, facts.left_out, facts.leaks) == (4, 1, 1)
    assert facts.left_out_by_reason == {"no_golden": 1} and facts.lights == list(LIGHTS) and facts.image_ext == EXT
    assert loop_validator(path, tmp_path, validation=validation) == []
    with path.open(newline="") as fh:
        out = list(csv.DictReader(fh))
    assert {r["object_name"]: r["label"] for r in out} == {"C0": "PASS", "C1": "short", "C2": "PASS", "C5": "PASS"}
    manifest = json.loads((tmp_path / "r" / "run.json").read_text())
    assert manifest["training_rows"]["rows"] == 4 and manifest["training_rows"]["pass_golden"] == "self"
    assert "mined_training_rows.csv" in manifest["artifacts"]
    codes = [w["code"] for w in manifest["warnings"]]
    assert "training_rows_left_out" in codes and "training_rows_leaked" in codes
    text = (tmp_path / "r" / "Mining_Report.md").read_text()
    assert "## Training Rows" in text and "4 ChangeNet training rows" in text
    assert "training rows: 4 of 6 mined components" in result.text()
    # the report reads the file as it is now
    path.write_text("input_path,golden_path,label,object_name,boardname\n")
    report(tmp_path / "r")
    assert "now holds 0 rows, not the 4 written" in (tmp_path / "r" / "Mining_Report.md").read_text()


def test_a_run_without_a_changenet_pool_is_unchanged(image_set):
    result = run(image_set / "targets.parquet", image_set / "pool.parquet", run_dir=image_set / "r",
                 overrides={"model": "thumbnail", "topn": 2})
    assert result.training_rows is None and "training_rows" not in result.model_dump()
    assert not (image_set / "r" / "mined_training_rows.csv").exists()
    assert "training_rows" not in json.loads((image_set / "r" / "run.json").read_text())
    assert "Training Rows" not in (image_set / "r" / "Mining_Report.md").read_text()


@pytest.mark.parametrize("option", [{"pass_golden": "self"}, {"validation_csv": "v.csv"}])
def test_training_row_options_need_a_changenet_pool(image_set, option):
    (image_set / "v.csv").write_text("input_path,golden_path,label,object_name\n")
    option = {k: str(image_set / v) if k == "validation_csv" else v for k, v in option.items()}
    with pytest.raises(DeftError) as exc:
        run(image_set / "targets.parquet", image_set / "pool.parquet", run_dir=image_set / "r",
            overrides={"model": "thumbnail"}, **option)
    assert exc.value.code == "not_changenet_pool" and exc.value.details["field"] == next(iter(option))
    assert not (image_set / "r").exists()


def changenet_csv_pool(root: Path, count: int) -> list[str]:
    """A ChangeNet CSV pool on disk (root/pool.csv; every component valid, both lights, goldens); its images."""
    comps = [component(i, ["PASS", "short"][i % 2]) for i in range(count)]
    files = workspace(root, comps).column("filepath").to_pylist()
    with (root / "pool.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["input_path", "golden_path", "label", "object_name", "boardname"])
        writer.writerows([c["dir"], c["golden_dir"], c["label"], c["obj"], c["board"]] for c in comps)
    return files


def object_of(filepath: str) -> str:
    return Path(filepath).name.split("_")[0]


@pytest.mark.parametrize("ledger_format", ["deft-mine", "tao-skill"])
@pytest.mark.parametrize("seed", range(3))
def test_a_component_is_a_training_row_once_across_iterations(tmp_path, ledger_format, seed):
    rng = random.Random(seed)
    files = changenet_csv_pool(tmp_path, 8)
    ledger = tmp_path / "history.json"
    mined, rows, results = [], [], []
    # iteration 1 aims at some components' SolderLight images, iteration 2 at others' UniformLight,
    # always one of iteration 1's among them (its other light: a new image, the same component)
    first = rng.sample(range(8), rng.randint(1, 4))
    second = [rng.choice(first), *rng.sample(range(8), rng.randint(0, 3))]
    for iteration, (chosen, light) in enumerate(((first, 0), (second, 1)), start=1):
        pq.write_table(pa.table({"filepath": [files[2 * i + light] for i in chosen]}), tmp_path / "targets.parquet")
        result = run(tmp_path / "targets.parquet", tmp_path / "pool.csv", run_dir=tmp_path / f"r{iteration}",
                     images_dir=str(tmp_path), lights=list(LIGHTS), history=str(ledger), ledger_format=ledger_format,
                     overrides={"model": "thumbnail", "topn": rng.randint(1, 3), "image_root": str(tmp_path)})
        assert result.select is not None and result.select.iteration == iteration
        mined.append(pq.read_table(tmp_path / f"r{iteration}" / "mined.parquet").column("filepath").to_pylist())
        with (tmp_path / f"r{iteration}" / "mined_training_rows.csv").open(newline="") as fh:
            rows.append([r["object_name"] for r in csv.DictReader(fh)])
        results.append(result)
    # the reference: a component iteration 1 mined an image of is left out of iteration 2's rows
    earlier, now = ({object_of(p) for p in m} for m in mined)
    assert sorted(rows[0]) == sorted(earlier) and sorted(rows[1]) == sorted(now - earlier)
    assert not set(rows[0]) & set(rows[1]) and set(rows[0]) | set(rows[1]) == earlier | now
    facts = results[1].training_rows
    assert facts is not None and facts.components == len(now) and facts.rows == len(now - earlier)
    assert facts.left_out_by_reason == ({"trained_before": len(now & earlier)} if now & earlier else {})
    assert now & earlier and not results[0].training_rows.left_out
    # nothing is wrong with a component an earlier round wrote: counted and reported, not warned
    assert not [w for w in results[1].warnings if w.code == "training_rows_left_out"]
    assert "trained_before" in (tmp_path / "r2" / "Mining_Report.md").read_text()


def test_training_rows_keep_the_pool_csvs_coordinates(tmp_path):
    """The loop's layout: the pool CSV spells `images/B1/…` relative to the workspace, its images
    resolve under images_dir=<ws>/images (the resolver drops the leading `images/`), and the
    training CSV the loop appends to is read against the workspace root. The rows keep the pool's
    spelling, so the loop's validator, rooted at the workspace, accepts them."""
    ws = tmp_path / "ws"
    workspace(ws, [component(0, "short"), component(1, "PASS")])
    for rel in {f"golden/B1/PerComponent/C{i}_{light}{EXT}" for i in (0, 1) for light in LIGHTS}:
        (ws / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
        (ws / rel).rename(ws / "images" / rel)  # goldens under images/ too, spelled images/golden/…
    pool = ws / "augmentation" / "pool.csv"
    pool.parent.mkdir()
    pool.write_text("input_path,golden_path,label,object_name,boardname\n"
                    "images/B1/PerComponent,images/golden/B1/PerComponent,short,C0,B1\n"
                    "images/B1/PerComponent/C1_SolderLight.jpg,images/golden/B1/PerComponent,PASS,C1,B1\n")
    pq.write_table(pa.table({"filepath": [f"B1/PerComponent/C{i}_{light}{EXT}" for i in (0, 1) for light in LIGHTS]}),
                   ws / "targets.parquet")
    result = run(ws / "targets.parquet", pool, run_dir=tmp_path / "r", images_dir=str(ws / "images"),
                 lights=list(LIGHTS), overrides={"model": "thumbnail", "topn": 4, "image_root": str(ws / "images")})
    path = tmp_path / "r" / "mined_training_rows.csv"
    with path.open(newline="") as fh:
        out = {r["object_name"]: (r["input_path"], r["golden_path"]) for r in csv.DictReader(fh)}
    assert result.training_rows is not None and result.training_rows.rows == 2
    assert out == {"C0": ("images/B1/PerComponent", "images/golden/B1/PerComponent"),
                   "C1": ("images/B1/PerComponent", "images/golden/B1/PerComponent")}
    assert loop_validator(path, ws) == []
    # C1's input_path names its SolderLight file: each light still finds its own image beside it
    listing = pq.read_table(tmp_path / "r" / "source_listing.parquet").to_pylist()
    assert {(r["object_name"], r["light"]): r["filepath"] for r in listing}[("C1", "UniformLight")] == \
        "B1/PerComponent/C1_UniformLight.jpg"


def test_a_validation_csv_is_read_as_every_csv_is_semicolons_included(tmp_path):
    """One CSV reader: a ';'-separated validation CSV (as spreadsheets write them, and as pools are
    accepted) gives its keys, values verbatim (a board 0510 stays 0510)."""
    path = tmp_path / "val.csv"
    path.write_text("input_path;golden_path;label;object_name;boardname\nimages/B;golden/B;short;C3;0510\n")
    validation = tr.read_validation(path)
    assert validation.columns == ("input_path", "golden_path", "label", "object_name", "boardname")
    assert validation.rows == [("images/B", "golden/B", "short", "C3", "0510")]


@pytest.mark.parametrize("ledger_format", ["deft-mine", "tao-skill"])
def test_a_run_stopped_before_its_training_rows_leaves_the_iteration_unrecorded(tmp_path, monkeypatch,
                                                                                 ledger_format):
    """The ledger records an iteration only once its training rows are written: a full disk at
    that moment (injected) fails the run, the ledger stays as it was, and the next run mines the
    same iteration again, training rows and all."""
    files = changenet_csv_pool(tmp_path, 4)
    ledger = tmp_path / "history.json"
    pq.write_table(pa.table({"filepath": files[:2]}), tmp_path / "targets.parquet")
    args = dict(images_dir=str(tmp_path), lights=list(LIGHTS), history=str(ledger), ledger_format=ledger_format,
                overrides={"model": "thumbnail", "topn": 2, "image_root": str(tmp_path)})
    run(tmp_path / "targets.parquet", tmp_path / "pool.csv", run_dir=tmp_path / "r1", **args)
    before = ledger.read_bytes()

    def disk_full(path: Path, rows: tr.TrainingRows) -> None:
        raise DeftError("disk_full", f"no space left on the device writing {path}", fix="free some space")
    monkeypatch.setattr(tr, "write", disk_full)
    with pytest.raises(DeftError) as failed:
        run(tmp_path / "targets.parquet", tmp_path / "pool.csv", run_dir=tmp_path / "r2", **args)
    assert failed.value.code == "disk_full" and ledger.read_bytes() == before
    assert json.loads((tmp_path / "r2" / "run.json").read_text())["status"] == "failed"
    monkeypatch.undo()
    again = run(tmp_path / "targets.parquet", tmp_path / "pool.csv", run_dir=tmp_path / "r3", **args)
    assert again.select is not None and again.select.iteration == 2
    assert (tmp_path / "r3" / "mined_training_rows.csv").exists()
