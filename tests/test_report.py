"""Mining_Report.md and its pictures, built from real run folders (and folders without run.json):
sections in order, word budget, every printed count equal to the recorded one, same text on
regeneration, the report written last, pictures that are real images."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import THUMB_ID, write_embeddings, write_image
from deft_mine.report.render import MAX_LABELS, SECTIONS, SKIP_SENTENCE, count_words
from deft_mine.errors import DeftError
from deft_mine.tools.guards import PathPolicy
from deft_mine.tools.report import report
from deft_mine.tools.run import run


# ----------------------------------------------------------------------------- helpers

def make_set(root: Path, n_targets: int, n_pool: int, *, labels: tuple[str, ...] = ("a", "b"),
             target_labels: bool = True, pool_labels: bool = True, gone: int = 0) -> Path:
    """Targets and a pool of real PNGs listed by relative path; `gone` pool rows name no file."""
    for i in range(n_targets):
        write_image(root / "imgs" / f"t{i}.png", seed=i)
    for j in range(n_pool):
        write_image(root / "imgs" / f"p{j}.png", seed=1000 + j)
    targets = {"filepath": [f"imgs/t{i}.png" for i in range(n_targets)],
               "siamese_score": [0.1 * i for i in range(n_targets)]}
    pool = {"filepath": [f"imgs/p{j}.png" for j in range(n_pool)] + [f"imgs/gone{k}.png" for k in range(gone)]}
    if target_labels:
        targets["label"] = [labels[i % len(labels)] for i in range(n_targets)]
    if pool_labels:
        pool["label"] = [labels[j % len(labels)] for j in range(n_pool + gone)]
    pq.write_table(pa.table(targets), root / "targets.parquet")
    pq.write_table(pa.table(pool), root / "pool.parquet")
    return root


def do_run(root: Path, **overrides) -> Path:
    folder = root / "run"
    run(root / "targets.parquet", root / "pool.parquet", run_dir=folder,
        overrides={"model": "thumbnail", **overrides})
    return folder


def sections(text: str) -> dict[str, str]:
    parts = re.split(r"^## (.+)$", text, flags=re.M)
    return {parts[i].strip(): parts[i + 1].strip() for i in range(1, len(parts), 2)}


def table(body: str, first_header: str) -> list[list[str]]:
    """The rows (cells stripped) of the markdown table whose header starts with `first_header`."""
    lines = body.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split(" | ")])
    return rows


def check_report(folder: Path, result, manifest: dict | None = None) -> str:
    """What every report must satisfy; returns its text."""
    path = folder / "Mining_Report.md"
    assert result.report_path == str(path)
    text = path.read_text(encoding="utf-8")
    assert re.findall(r"^## (.+)$", text, flags=re.M) == list(SECTIONS)
    assert 600 <= result.words <= 1200 and result.words == count_words(text)
    assert "`mined.parquet`" in sections(text)["Recommended Actions"]
    # the report is the newest file of the folder
    newest = max(p.stat().st_mtime_ns for p in folder.iterdir() if p.is_file())
    assert path.stat().st_mtime_ns == newest
    for name in result.pictures:
        assert f"]({name})" in text
        with Image.open(folder / name) as img:
            assert img.format == "PNG" and img.width >= 200 and img.height >= 100
            assert len(img.convert("RGB").getcolors(maxcolors=1 << 20) or [0, 1]) > 1  # not one flat colour
    if manifest is not None:
        check_counts(text, manifest)
    # regenerating gives the same text, word for word
    again = report(folder)
    assert path.read_text(encoding="utf-8") == text and again.words == result.words
    return text


def check_counts(text: str, manifest: dict) -> None:
    """Every count the report prints equals the manifest's."""
    parts = sections(text)
    summary = manifest["mining"]["summary"]
    printed = {row[0].strip("`"): int(row[1]) for row in table(parts["Mining Run"], "Count")}
    assert printed == summary
    bullets = dict(re.findall(r"^- (Targets in|Pool in|Mined out): \*\*(\d+)\*\*", parts["Verdict"], flags=re.M))
    assert int(bullets["Targets in"]) == manifest["inputs"]["targets"]["rows"]
    assert int(bullets["Pool in"]) == manifest["inputs"]["source"]["rows"]
    assert int(bullets["Mined out"]) == summary["mined"]
    inputs = {row[0]: row for row in table(parts["Inputs"], "Side")}
    for name, side, key in (("Targets", "targets", "target"), ("Pool", "source", "source")):
        assert int(inputs[name][2]) == manifest["inputs"][side]["rows"]
        assert int(inputs[name][3]) == manifest["embeddings"][key]["rows"]
        assert int(inputs[name][4]) == manifest["embeddings"][key]["skipped"]
        assert inputs[name][5] == ("yes" if manifest["inputs"][side]["has_label"] else "no")
    labels = manifest["mining"]["labels"]
    if labels is not None:
        rows = table(parts["Per-Label Breakdown"], "Label")
        assert {r[0].strip("`"): int(r[1]) for r in rows if int(r[1])} == labels["targets"]
        assert {r[0].strip("`"): int(r[2]) for r in rows if int(r[2])} == labels["mined"]
        kept = sum(int(r[3]) for r in rows)
        assert kept == summary.get("kept_pairs", summary["pairs"])
    assert f"Mined out: **{summary['mined']}** unique images → `mined.parquet`" in parts["Verdict"]


def manifest_of(folder: Path) -> dict:
    return json.loads((folder / "run.json").read_text())


# ----------------------------------------------------------------------------- run folders

def test_labelled_run(tmp_path):
    folder = do_run(make_set(tmp_path, 6, 30, labels=("scratch", "bridge", "void")), topn=4, filter_by_label=True)
    manifest = manifest_of(folder)
    result = report(folder)
    text = check_report(folder, result, manifest)
    assert result.verdict == "ok" and result.missing_facts == [] and result.warnings == []
    assert result.pictures == ["contact_sheet.png", "labels.png", "score_histogram.png"]
    parts = sections(text)
    assert "**Encoder match: yes**" in parts["Encoder Consistency"]
    assert "Label filter: applied" in parts["Mining Run"]
    assert "no-op did not fire" in parts["Mining Run"]
    assert manifest["mining"]["label_filter"] == "applied"
    # share of kept pairs: per target label, over all kept pairs
    pairs = pq.read_table(folder / "mined_pairs.parquet").to_pylist()
    kept = [p for p in pairs if p["kept"]]
    for row in table(parts["Per-Label Breakdown"], "Label"):
        label = row[0].strip("`")
        n = sum(p["target_label"] == label for p in kept)
        assert int(row[3]) == n and row[4] == f"{100 * n / len(kept):.1f}%"
    assert f"{len(pairs) - len(kept)} were dropped" in parts["Mining Run"]
    assert "On disk: " + f"{manifest['mining']['summary']['mined']} of {manifest['mining']['summary']['mined']}" \
        in parts["Output Sanity"]
    assert "none of the" in parts["Output Sanity"]  # the encoding check passed
    assert "`filepath` is the first column: yes" in parts["Output Sanity"]
    # the contact sheet has one row per target (up to 8) and one tile per neighbour
    with Image.open(folder / "contact_sheet.png") as sheet:
        assert sheet.height > 6 * 112 and sheet.width > 5 * 112


def test_unlabelled_run_skips_the_breakdown_in_one_sentence(tmp_path):
    folder = do_run(make_set(tmp_path, 3, 20, target_labels=False, pool_labels=False), topn=3)
    result = report(folder)
    text = check_report(folder, result, manifest_of(folder))
    assert sections(text)["Per-Label Breakdown"] == SKIP_SENTENCE
    assert "labels.png" not in result.pictures and not (folder / "labels.png").exists()
    assert result.verdict == "ok"


def test_filter_noop_run(tmp_path):
    folder = do_run(make_set(tmp_path, 4, 20, pool_labels=False), topn=3, filter_by_label=True)
    manifest = manifest_of(folder)
    assert manifest["mining"]["label_filter"] == "noop"
    result = report(folder)
    text = check_report(folder, result, manifest)
    parts = sections(text)
    assert result.verdict == "attention"
    assert "filter_by_label_noop" in [w.code for w in result.warnings]
    assert "Label filter: **no-op**" in parts["Mining Run"] and "source side has no `label`" in parts["Mining Run"]
    actions = parts["Recommended Actions"]
    assert "`label`" in actions and "re-run mining only" in actions and "`deft-mine mine " in actions
    # targets are still counted per label; mined per pool label cannot be
    rows = table(parts["Per-Label Breakdown"], "Label")
    assert {r[0].strip("`"): int(r[1]) for r in rows} == {"a": 2, "b": 2}
    assert all(r[2] == "n/a" for r in rows)
    assert sum(int(r[3]) for r in rows) == manifest["mining"]["summary"]["pairs"]
    assert "labels.png" not in result.pictures


def test_pool_exhausted_run(image_set):
    folder = do_run(image_set, topn=5)  # 2 targets × 5 > 4 pool rows
    manifest = manifest_of(folder)
    assert "pool_exhausted" in [w["code"] for w in manifest["warnings"]]
    result = report(folder)
    text = check_report(folder, result, manifest)
    assert result.verdict == "attention"
    actions = sections(text)["Recommended Actions"]
    assert "Grow the pool" in actions and "lower topn" in actions
    assert "topn × targets = 5 × 2 = 10 is more than the 4 pool rows searched" in sections(text)["Verdict"]


def test_run_with_a_skipped_image(tmp_path):
    folder = do_run(make_set(tmp_path, 3, 12, gone=1), topn=2)
    manifest = manifest_of(folder)
    assert manifest["embeddings"]["source"]["skipped"] == 1
    result = report(folder)
    text = check_report(folder, result, manifest)
    parts = sections(text)
    assert result.verdict == "attention"
    assert "Skipped pool images by reason: 1 missing." in parts["Inputs"]
    assert "Images skipped while embedding: 0 targets, 1 pool row." in parts["Output Sanity"]
    assert "image_root" in parts["Recommended Actions"] and "`imgs/gone0.png: missing`" in parts["Recommended Actions"]


def test_a_mined_image_deleted_after_the_run_is_listed(tmp_path):
    folder = do_run(make_set(tmp_path, 2, 10), topn=2)
    first = pq.read_table(folder / "mined.parquet").column("filepath")[0].as_py()
    (tmp_path / first).unlink()
    result = report(folder)
    text = check_report(folder, result)
    sanity = sections(text)["Output Sanity"]
    assert f"- `{first}`" in sanity and "Missing (1)" in sanity
    assert "mined_paths_missing" in [w.code for w in result.warnings]
    with Image.open(folder / "contact_sheet.png") as sheet:  # a grey placeholder stands in for it
        assert sheet.getcolors(maxcolors=1 << 20)


@pytest.mark.parametrize("with_pairs", [True, False])
def test_tao_style_folder_without_run_json(tmp_path, with_pairs):
    original = do_run(make_set(tmp_path, 4, 20), topn=3, filter_by_label=True)
    manifest = manifest_of(original)
    tao = tmp_path / "tao_out"
    tao.mkdir()
    # the container names things its own way; the report finds them by their columns
    shutil.copy(original / "target_embeddings.parquet", tao / "query_emb.parquet")
    shutil.copy(original / "source_embeddings.parquet", tao / "pool_emb.parquet")
    shutil.copy(original / "mined.parquet", tao / "mined.parquet")
    shutil.copy(original / "mining_summary.txt", tao / "mining_summary.txt")
    if with_pairs:
        shutil.copy(original / "mined_pairs.parquet", tao / "mined_pairs.parquet")
    result = report(tao)
    text = check_report(tao, result)
    parts = sections(text)
    assert "run.json" in result.missing_facts and "inputs.targets.path" in result.missing_facts
    assert "`run.json`" in parts["Verdict"]
    assert result.verdict == "attention"
    printed = {row[0].strip("`"): int(row[1]) for row in table(parts["Mining Run"], "Count")}
    assert printed == manifest["mining"]["summary"]
    rows = table(parts["Per-Label Breakdown"], "Label")
    assert {r[0].strip("`"): int(r[1]) for r in rows} == manifest["mining"]["labels"]["targets"]
    assert {r[0].strip("`"): int(r[2]) for r in rows if int(r[2])} == manifest["mining"]["labels"]["mined"]
    assert "**Encoder match: yes**" in parts["Encoder Consistency"]  # our parquets carry the identity
    # images are found from the folder's parent, which holds imgs/
    assert f"{manifest['mining']['summary']['mined']} of {manifest['mining']['summary']['mined']} mined paths exist" \
        in parts["Output Sanity"]
    assert {"contact_sheet.png", "score_histogram.png", "labels.png"} == set(result.pictures)


def test_tao_folder_with_two_encoders_and_odd_paths_fails(tmp_path):
    rng = np.random.default_rng(0)
    other = {**THUMB_ID, "preprocessing": {"side": 32}}
    write_embeddings(tmp_path / "target_embeddings.parquet", rng.normal(size=(3, 8)), identity=THUMB_ID)
    write_embeddings(tmp_path / "source_embeddings.parquet", rng.normal(size=(9, 8)), identity=other)
    pq.write_table(pa.table({"filepath": ["C:\\imgs\\a.png", "imgs/tab\there.png", "imgs/ok.png"]}),
                   tmp_path / "mined.parquet")
    (tmp_path / "mining_summary.txt").write_text("queries: 3\nneighbours_requested: 6\nduplicates_removed: 3\nmined: 3\n")
    result = report(tmp_path)
    text = (tmp_path / "Mining_Report.md").read_text()
    parts = sections(text)
    assert re.findall(r"^## (.+)$", text, flags=re.M) == list(SECTIONS)
    assert result.verdict == "failed" and 600 <= result.words <= 1200
    assert "**Encoder match: NO**" in parts["Encoder Consistency"] and "preprocessing" in parts["Encoder Consistency"]
    assert "1 with control characters" in parts["Output Sanity"] and "1 with backslashes" in parts["Output Sanity"]
    assert "Do not use `mined.parquet`" in parts["Recommended Actions"]
    assert SKIP_SENTENCE == parts["Per-Label Breakdown"]  # these targets have no label
    assert result.pictures == []  # no pairs, no scores, no labels: nothing to draw
    assert "mined_pairs.parquet" in result.missing_facts
    assert "No contact sheet: the folder has no mined_pairs.parquet" in parts["Output Sanity"]
    assert "No score histogram: the folder has no mined_pairs.parquet" in parts["Mining Run"]


def test_a_failed_run_gets_a_failed_report(image_set):
    pq.write_table(pa.table({"filepath": ["imgs/absent.png"]}), image_set / "unreadable.parquet")
    with pytest.raises(DeftError):
        run(image_set / "targets.parquet", image_set / "unreadable.parquet", run_dir=image_set / "r",
            overrides={"model": "thumbnail"})
    result = report(image_set / "r")
    text = (image_set / "r" / "Mining_Report.md").read_text()
    assert result.verdict == "failed" and "no_readable_images" in text
    assert re.findall(r"^## (.+)$", text, flags=re.M) == list(SECTIONS)
    assert "Do not use `mined.parquet`" in sections(text)["Recommended Actions"]


def test_many_labels_stay_within_the_word_cap(tmp_path):
    labels = tuple(f"defect_class_{i:02d}" for i in range(30))
    folder = do_run(make_set(tmp_path, 30, 60, labels=labels), topn=3, filter_by_label=True)
    result = report(folder)
    text = check_report(folder, result)
    rows = table(sections(text)["Per-Label Breakdown"], "Label")
    assert len(rows) == MAX_LABELS and "more labels are not shown" in text
    with Image.open(folder / "labels.png") as chart:
        assert chart.height >= 200


def test_no_run_in_the_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("nothing here")
    with pytest.raises(DeftError) as exc:
        report(tmp_path)
    assert exc.value.code == "report_no_run"
    with pytest.raises(DeftError) as exc:
        report(tmp_path / "absent")
    assert exc.value.code == "report_no_run"


def test_the_report_respects_the_allowed_roots(image_set, tmp_path_factory):
    folder = do_run(image_set, topn=2)
    (folder / "Mining_Report.md").unlink()  # run wrote one; a refused call must not
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    with pytest.raises(DeftError) as exc:
        report(folder, policy=PathPolicy([elsewhere]))
    assert exc.value.code == "path_outside_roots" and not (folder / "Mining_Report.md").exists()
    assert report(folder, policy=PathPolicy([image_set])).verdict in ("ok", "attention")


def test_a_huge_run_is_cut_to_the_word_cap(image_set):
    """Facts of a run far bigger than the tests can make: 60 labels, 80 pool columns, a dozen long
    warnings, hundreds of missing and odd paths — the text still fits the 1200-word cap."""
    from deft_mine.report.facts import MinedCheck, PairStats, ReportFacts
    from deft_mine.report.render import render
    from deft_mine.schemas.manifest import LabelCounts, RunManifest
    from typing import get_args

    from deft_mine.schemas.warnings import ToolWarning, WarningCode

    manifest = RunManifest.model_validate(manifest_of(do_run(image_set, topn=2)))
    labels = {f"defect_label_{i:02d}": i + 1 for i in range(60)}
    manifest.mining.labels = LabelCounts(targets=labels, mined={k: 3 * n for k, n in labels.items()})
    manifest.inputs.source.columns = [f"column_{i}" for i in range(80)]
    codes = [c for c in get_args(WarningCode) if c != "images_skipped"][:12]
    manifest.warnings = [ToolWarning(code=code, message="word " * 80) for code in codes]
    manifest.embeddings.source.skipped = 5
    mined = MinedCheck(name="mined.parquet", columns=[("filepath", "string")] + [(f"c{i}", "int64") for i in range(20)],
                       rows=5000, duplicates=0, checked=5000, missing=400,
                       missing_examples=[f"/data/pool/{i}.png" for i in range(10)], root="/data", root_guessed=False,
                       encoding={"non_utf8": 3, "control": 4, "backslash": 5},
                       encoding_examples={"non_utf8": ["a\ufffd"], "control": ["b\x01"], "backslash": ["c\\d"]})
    facts = ReportFacts(folder="/data/run", manifest=manifest, has_manifest=True, warnings=manifest.warnings,
                        mined=mined, pairs=PairStats(10, 5, 0.1, 0.2, 0.3, {k: 3 for k in labels}),
                        target_labels=labels, mined_labels=manifest.mining.labels.mined,
                        pictures={"contact_sheet": "contact_sheet.png", "labels": "labels.png"})
    rendered = render(facts)
    assert 600 <= rendered.words <= 1200 and rendered.verdict == "attention"
    assert re.findall(r"^## (.+)$", rendered.text, flags=re.M) == list(SECTIONS)
    assert len(table(sections(rendered.text)["Per-Label Breakdown"], "Label")) <= MAX_LABELS
    assert render(facts).text == rendered.text  # a pure function of the facts
