"""Unique matching's classes from COCO json / KITTI folders: the same groups and summary as the
equivalent `label` columns (both written from one truth), images of several classes in every rare
class they hold (a brute-force reference), unannotated images non_rare, bad files refused by field."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from test_unique_matching import _result, _same, _spec, _unit, _write, ref_subset

from deft_mine.engine.unique_matching import allocate_quotas, unique_match
from deft_mine.errors import DeftError

RARE = ["dent", "scratch"]


def _coco(path, truth, folder="images", with_unlisted=()):
    """A COCO json of `truth` ({filepath: [class per box]}): file_name relative (found by file
    name), categories numbered by name; an image with no boxes is listed all the same."""
    names = sorted({c for boxes in truth.values() for c in boxes} | {"unused"})
    cats = {name: i + 1 for i, name in enumerate(names)}
    images, anns = [], []
    for i, (fp, boxes) in enumerate(truth.items()):
        if fp in with_unlisted:
            continue
        images.append({"id": i, "file_name": f"{folder}/{fp.rsplit('/', 1)[-1]}"})
        anns += [{"id": len(anns), "image_id": i, "category_id": cats[c], "bbox": [1, 2, 3, 4]} for c in boxes]
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": i, "name": n} for n, i in cats.items()]}))
    return path


def _kitti(folder, truth):
    """A KITTI folder of `truth`: STEM.txt per image, one line per box (an empty file for none)."""
    folder.mkdir()
    for fp, boxes in truth.items():
        stem = fp.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        (folder / f"{stem}.txt").write_text("".join(f"{c} 0.0 0 0.0 10 20 30 40 1 1 1 0 0 0 0\n" for c in boxes))
    return folder


def _sides(tmp_path, rng, n_pool, n_targets, labels=True, classes=("dent", "scratch", "ok", None)):
    P, T = rng.normal(size=(n_pool, 4)), rng.normal(size=(n_targets, 4))
    pool = {f"/data/pool/p{i}.png": classes[j] for i, j in enumerate(rng.integers(0, len(classes), n_pool))}
    targets = {f"/data/t/t{i}.jpg": classes[j] for i, j in enumerate(rng.integers(0, len(classes), n_targets))}
    _write(tmp_path / "pool.parquet", list(pool), P, list(pool.values()) if labels else None)
    _write(tmp_path / "targets.parquet", list(targets), T, list(targets.values()) if labels else None)
    return P, T, pool, targets


def _boxes(truth):
    return {fp: [] if c is None else [c] for fp, c in truth.items()}


def _without_sources(summary):
    return {k: v for k, v in summary.items() if k != "class_sources"}


@pytest.mark.parametrize("policy", ["class_stratified", "global"])
@pytest.mark.parametrize("seed", range(4))
def test_coco_and_kitti_give_what_the_labels_give(tmp_path, policy, seed):
    rng = np.random.default_rng(seed)
    _, _, pool, targets = _sides(tmp_path, rng, int(rng.integers(8, 30)), int(rng.integers(2, 8)))
    keys = {"desired_unique_count": int(rng.integers(1, 20)), "allocation_policy": policy,
            "rare_class_list": "Scratch, DENT"}
    by_label = unique_match(_spec(tmp_path, **keys))
    # the same vectors and paths, no `label`: the classes come from the files alone
    for name in ("pool", "targets"):
        table = pq.read_table(tmp_path / f"{name}.parquet").drop_columns(["label"])
        pq.write_table(table, tmp_path / f"{name}.parquet")
    coco = {"source_detection_file": _coco(tmp_path / "pool.json", _boxes(pool)),
            "target_detection_file": _coco(tmp_path / "targets.json", _boxes(targets)), "detection_format": "coco"}
    kitti = {"source_detection_file": _kitti(tmp_path / "pool_labels", _boxes(pool)),
             "target_detection_file": _kitti(tmp_path / "target_labels", _boxes(targets)), "detection_format": "kitti"}
    for files in (coco, kitti):
        outcome = unique_match(_spec(tmp_path, **keys, **files))
        assert outcome.selected.equals(by_label.selected)
        assert _without_sources(outcome.summary) == _without_sources(by_label.summary)
        assert outcome.summary["class_sources"]["source"]["rows_without_class"] == \
            sum(c is None for c in pool.values())
        assert outcome.summary["class_sources"]["source"]["rows_not_in_file"] == 0
    assert by_label.summary["class_sources"]["target"]["from"] == "label"


def ref_stratified_sets(P, T, paths, tpaths, pclasses, tclasses, rare, budget, metric="euclidean", factor=5):
    """The container's class_stratified over class sets: an image is in every rare class it holds,
    non_rare when it holds none; each class in name order, then its non_rare fallback, then non_rare."""
    Pn, Tn = _unit(P), _unit(T)
    member = lambda classes, name: (name in classes) if name != "non_rare" else not (set(rare) & classes)
    ratios = {name: sum(member(c, name) for c in tclasses) / len(tclasses) for name in [*rare, "non_rare"]}
    quotas = allocate_quotas(ratios, budget)
    held: set[str] = set()
    out = {}
    common = [member(c, "non_rare") for c in pclasses]
    for name in sorted(rare) + ["non_rare"]:
        targets = [i for i, c in enumerate(tclasses) if member(c, name)]
        own = [member(c, name) for c in pclasses]
        got = ref_subset(Pn, Tn, paths, tpaths, targets, own, held, quotas[name], metric, factor) if any(own) else {}
        if name != "non_rare" and len(got) < quotas[name] and any(common) and targets:
            got.update(ref_subset(Pn, Tn, paths, tpaths, targets, common, held, quotas[name] - len(got), metric,
                                  factor))
        out.update(got)
    return out, quotas


@pytest.mark.parametrize("fmt", ["coco", "kitti"])
@pytest.mark.parametrize("seed", range(4))
def test_an_image_of_several_classes_is_in_each_rare_class_it_holds(tmp_path, fmt, seed):
    rng = np.random.default_rng(50 + seed)
    n_pool, n_targets = int(rng.integers(8, 30)), int(rng.integers(2, 9))
    P, T, pool, targets = _sides(tmp_path, rng, n_pool, n_targets, labels=False)
    words = ["dent", "scratch", "ok", "Dent"]
    boxes = lambda n: {f: [words[j] for j in rng.integers(0, 4, int(rng.integers(0, 4)))] for f in n}
    pool_boxes, target_boxes = boxes(pool), boxes(targets)
    write = _coco if fmt == "coco" else _kitti
    budget = int(rng.integers(1, n_pool + 3))
    outcome = unique_match(_spec(
        tmp_path, desired_unique_count=budget, allocation_policy="class_stratified", rare_class_list="dent,scratch",
        source_detection_file=write(tmp_path / "pool_det", pool_boxes), detection_format=fmt,
        target_detection_file=write(tmp_path / "target_det", target_boxes)))
    lower = lambda truth: [{c.lower() for c in b} for b in truth.values()]
    reference, quotas = ref_stratified_sets(P, T, list(pool), list(targets), lower(pool_boxes), lower(target_boxes),
                                            RARE, budget)
    _same(_result(outcome), reference)
    summary = outcome.summary
    assert {k: v["desired_count"] for k, v in summary["allocation"]["per_class"].items()} == \
        {k: quotas[k] for k in RARE}
    tclasses = lower(target_boxes)
    assert summary["target_queries"] == {"rare": sum(len(c & set(RARE)) for c in tclasses),
                                         "non_rare": sum(not (c & set(RARE)) for c in tclasses)}
    # the per-dataset counts, the container's way: instances are boxes, rare_instances rare classes per image
    expect = {"total_images": len(tclasses), "rare_images": sum(bool(c & set(RARE)) for c in tclasses),
              "rare_instances": sum(len(c & set(RARE)) for c in tclasses)}
    assert {k: summary["target_dataset"][k] for k in expect} == expect
    per_class: dict[str, dict[str, int]] = {}
    for b in target_boxes.values():
        for c in b:
            per_class.setdefault(c, {"image_count": 0, "instance_count": 0})["instance_count"] += 1
        for c in set(b):
            per_class[c]["image_count"] += 1
    assert summary["target_dataset"]["per_class"] == dict(sorted(per_class.items()))


def test_by_hand_a_two_class_target_counts_in_both_and_its_boxes_are_instances(tmp_path):
    _write(tmp_path / "pool.parquet", ["a/p0.png", "a/p1.png", "a/p2.png"], [[1, 0], [0, 1], [1, 1]])
    _write(tmp_path / "targets.parquet", ["b/t0.png", "b/t1.png"], [[1, 0], [0, 1]])
    _kitti(tmp_path / "pool", {"p0.png": ["dent"], "p1.png": ["scratch"], "p2.png": []})
    _kitti(tmp_path / "targets", {"t0.png": ["dent", "Scratch", "Scratch"], "t1.png": ["ok"]})
    outcome = unique_match(_spec(tmp_path, desired_unique_count=3, allocation_policy="class_stratified",
                                 rare_class_list="scratch,dent", detection_format="kitti",
                                 source_detection_file=tmp_path / "pool", target_detection_file=tmp_path / "targets"))
    summary = outcome.summary
    assert summary["target_queries"] == {"rare": 2, "non_rare": 1}
    assert {k: v["target_count"] for k, v in summary["allocation"]["per_class"].items()} == {"dent": 1, "scratch": 1}
    assert summary["target_dataset"] == {
        "total_images": 2, "rare_images": 1, "common_images": 1, "rare_instances": 2,
        "per_class": {"Scratch": {"image_count": 1, "instance_count": 2}, "dent": {"image_count": 1,
                                                                                  "instance_count": 1},
                      "ok": {"image_count": 1, "instance_count": 1}}}
    got = outcome.selected.to_pydict()
    assert dict(zip(got["filepath"], got["class"])) == {"a/p0.png": "dent", "a/p1.png": "scratch",
                                                        "a/p2.png": "non_rare"}
    assert summary["class_sources"]["source"] == {"from": "kitti", "file": str(tmp_path / "pool"), "rows": 3,
                                                  "rows_without_class": 1, "rows_not_in_file": 0}


def test_coco_matches_full_path_then_name_then_stem_and_a_shared_name_matches_nothing(tmp_path):
    paths = ["/x/full.png", "/elsewhere/byname.png", "/y/stem.png", "/z/twice.png", "/w/unlisted.png"]
    _write(tmp_path / "pool.parquet", paths, np.eye(5))
    _write(tmp_path / "targets.parquet", ["t.png"], [[1, 0, 0, 0, 0]])
    images = [{"id": 1, "file_name": "/x/full.png"}, {"id": 2, "file_name": "imgs/byname.png"},
              {"id": 3, "file_name": "stem"}, {"id": 4, "file_name": "a/twice.png"},
              {"id": 5, "file_name": "b/twice.png"}, {"id": 6, "file_name": "t.png"}]
    anns = [{"image_id": i, "category_id": 1, "bbox": [0, 0, 1, 1]} for i in (1, 2, 3, 4, 5, 6)]
    anns.append({"image_id": 1, "category_id": 1})  # no box: a class, but no instance
    (tmp_path / "c.json").write_text(json.dumps({"images": images, "annotations": anns,
                                                 "categories": [{"id": 1, "name": "dent"}]}))
    keys = {"source_detection_file": tmp_path / "c.json", "target_detection_file": tmp_path / "c.json",
            "detection_format": "coco", "allocation_policy": "class_stratified", "rare_class_list": "dent"}
    outcome = unique_match(_spec(tmp_path, desired_unique_count=5, **keys))
    got = outcome.selected.to_pydict()
    assert {p for p, c in zip(got["filepath"], got["subset"]) if c == "dent"} == set(paths[:3])  # its own pool
    assert outcome.summary["class_sources"]["source"]["rows_without_class"] == 2
    assert outcome.summary["class_sources"]["source"]["rows_not_in_file"] == 1  # twice.png is named, unlisted not


def test_unannotated_images_are_non_rare_and_said(tmp_path):
    _write(tmp_path / "pool.parquet", ["p0.png", "p1.png"], [[1, 0], [0, 1]])
    _write(tmp_path / "targets.parquet", ["t0.png", "t1.png"], [[1, 0], [0, 1]])
    _coco(tmp_path / "pool.json", {"p0.png": ["dent"], "p1.png": []})
    _coco(tmp_path / "t.json", {"t0.png": ["dent"], "t1.png": ["dent"]}, with_unlisted={"t1.png"})
    outcome = unique_match(_spec(tmp_path, desired_unique_count=2, allocation_policy="class_stratified",
                                 rare_class_list="dent", detection_format="coco",
                                 source_detection_file=tmp_path / "pool.json", target_detection_file=tmp_path / "t.json"))
    assert outcome.summary["target_queries"] == {"rare": 1, "non_rare": 1}
    assert outcome.summary["class_sources"]["target"]["rows_not_in_file"] == 1
    assert outcome.summary["class_sources"]["source"]["rows_without_class"] == 1
    got = outcome.selected.to_pydict()
    assert dict(zip(got["filepath"], got["class"])) == {"p0.png": "dent", "p1.png": "non_rare"}


# --- bad input: coded, naming the field, before any output --------------------------------------

def _bad(tmp_path, labels=("dent", "ok"), **keys):
    # with `label` on both sides, so that only the detection file given can be at fault
    _write(tmp_path / "pool.parquet", ["p0.png", "p1.png"], [[1, 0], [0, 1]], None if labels is None else list(labels))
    _write(tmp_path / "targets.parquet", ["t0.png"], [[1, 0]], None if labels is None else list(labels[:1]))
    with pytest.raises(DeftError) as info:
        unique_match(_spec(tmp_path, desired_unique_count=1, allocation_policy="class_stratified",
                           rare_class_list="dent", **keys))
    assert not (tmp_path / "out").exists()
    return info.value


def test_a_missing_file_is_file_not_found(tmp_path):
    err = _bad(tmp_path, source_detection_file=tmp_path / "nope.json", detection_format="coco")
    assert err.code == "file_not_found" and err.details["field"] == "source_detection_file"


def test_unparsable_or_non_coco_json_is_detections_invalid(tmp_path):
    (tmp_path / "broken.json").write_text("{not json")
    err = _bad(tmp_path, target_detection_file=tmp_path / "broken.json", detection_format="coco")
    assert (err.code, err.details["field"], err.details["reason"]) == \
        ("detections_invalid", "target_detection_file", "not_json")
    (tmp_path / "list.json").write_text("[1, 2]")
    err = _bad(tmp_path, target_detection_file=tmp_path / "list.json", detection_format="coco")
    assert (err.code, err.details["reason"]) == ("detections_invalid", "not_coco")


def test_a_kitti_folder_without_txt_is_detections_invalid(tmp_path):
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "readme.md").write_text("no labels")
    err = _bad(tmp_path, source_detection_file=tmp_path / "labels", detection_format="kitti")
    assert (err.code, err.details["field"], err.details["reason"]) == \
        ("detections_invalid", "source_detection_file", "no_labels")


def test_a_format_that_does_not_fit_the_file_is_refused_with_the_right_one(tmp_path):
    _coco(tmp_path / "c.json", {"p0.png": ["dent"]})
    err = _bad(tmp_path, source_detection_file=tmp_path / "c.json", detection_format="kitti")
    assert err.code == "detections_invalid" and err.details["reason"] == "format_mismatch"
    assert "detection_format=coco" in err.fix
    _kitti(tmp_path / "k", {"p0.png": ["dent"]})
    err = _bad(tmp_path, source_detection_file=tmp_path / "k", detection_format="coco")
    assert "detection_format=kitti" in err.fix


def test_a_file_naming_none_of_the_images_is_detections_unmatched(tmp_path):
    _coco(tmp_path / "c.json", {"other.png": ["dent"]})
    err = _bad(tmp_path, source_detection_file=tmp_path / "c.json", detection_format="coco")
    assert (err.code, err.details["field"]) == ("detections_unmatched", "source_detection_file")


@pytest.mark.parametrize("keys, field", [
    ({"source_detection_file": "x.json"}, "detection_format"),
    ({"target_detection_file": "x.json", "detection_format": "yolo"}, "detection_format"),
])
def test_detection_format_is_required_and_checked(tmp_path, keys, field):
    with pytest.raises(DeftError) as info:
        _spec(tmp_path, desired_unique_count=1, **keys)
    assert info.value.code == "spec_invalid" and info.value.details["field"] == field


def test_a_side_with_neither_file_nor_label_is_still_refused_naming_label(tmp_path):
    _coco(tmp_path / "c.json", {"p0.png": ["dent"]})
    err = _bad(tmp_path, labels=None, source_detection_file=tmp_path / "c.json", detection_format="coco")
    assert err.code == "column_missing" and err.details["field"] == "target_path"
