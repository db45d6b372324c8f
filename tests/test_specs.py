"""Spec loading: YAML + key=value overrides through OmegaConf, and every refusal it can make."""

from __future__ import annotations

from pathlib import Path

import pytest

from deft_mine.errors import DeftError
from deft_mine.schemas.specs import EmbeddingSpec, MiningSpec, load_spec, split_overrides


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_follow_the_tao_contract():
    e, m = load_spec(EmbeddingSpec), load_spec(MiningSpec)
    assert (e.model, e.model_path, e.batch_size) == ("SigLIP", "google/siglip-base-patch16-224", 64)
    assert (m.topn, m.knn_metric.value, m.filter_by_label) == (5, "cosine", False)
    assert m.source_embed_column_name == m.target_embed_column_name == "embedding"


def test_overrides_win_over_the_file(tmp_path):
    spec = write(tmp_path / "m.yaml", "topn: 3\nknn_metric: euclidean\n")
    m = load_spec(MiningSpec, spec, ["topn=7"])
    assert m.topn == 7 and m.knn_metric.value == "euclidean"
    m = load_spec(MiningSpec, spec, {"knn_metric": "MANHATTAN"})
    assert m.topn == 3 and m.knn_metric.value == "manhattan"


def test_unset_required_value_names_the_field(tmp_path):
    spec = write(tmp_path / "e.yaml", "model: CLIP\nmodel_path: ???\n")
    with pytest.raises(DeftError) as exc:
        load_spec(EmbeddingSpec, spec)
    assert exc.value.code == "spec_missing_value" and exc.value.details["field"] == "model_path"
    assert "model_path" in exc.value.message
    # ...and an override fills it
    assert load_spec(EmbeddingSpec, spec, ["model_path=/models/clip"]).model_path == "/models/clip"


@pytest.mark.parametrize("typo, closest", [("topm", "topn"), ("knn_metrc", "knn_metric"),
                                           ("filter_by_labels", "filter_by_label")])
def test_unknown_key_suggests_the_closest(tmp_path, typo, closest):
    with pytest.raises(DeftError) as exc:
        load_spec(MiningSpec, None, [f"{typo}=1"])
    assert exc.value.code == "spec_unknown_key"
    assert exc.value.details["closest"] == closest and f"'{closest}'" in exc.value.message


@pytest.mark.parametrize("raw, expected", [("true", True), ("false", False), ("True", True),
                                           (True, True), ("'false'", False)])
def test_filter_by_label_accepts_booleans_and_strings(tmp_path, raw, expected):
    spec = write(tmp_path / "m.yaml", f"filter_by_label: {str(raw).lower() if isinstance(raw, bool) else raw}\n")
    assert load_spec(MiningSpec, spec).filter_by_label is expected
    assert load_spec(MiningSpec, None, {"filter_by_label": raw if not isinstance(raw, str) else raw.strip("'")}).filter_by_label is expected


def test_filter_by_label_refuses_other_strings():
    with pytest.raises(DeftError) as exc:
        load_spec(MiningSpec, None, {"filter_by_label": "yes please"})
    assert exc.value.code == "spec_invalid" and exc.value.details["field"] == "filter_by_label"


def test_bad_metric_lists_the_valid_ones():
    with pytest.raises(DeftError) as exc:
        load_spec(MiningSpec, None, ["knn_metric=hamming"])
    assert exc.value.details["field"] == "knn_metric"
    for name in ("cosine", "euclidean", "manhattan"):
        assert name in exc.value.message


def test_bad_values_name_the_field():
    with pytest.raises(DeftError) as exc:
        load_spec(MiningSpec, None, ["topn=0"])
    assert exc.value.details["field"] == "topn"
    with pytest.raises(DeftError) as exc:
        load_spec(EmbeddingSpec, None, ["batch_size=lots"])
    assert exc.value.details["field"] == "batch_size"


def test_model_names_are_case_insensitive_and_tao_checkpoints_need_a_config():
    assert load_spec(EmbeddingSpec, None, ["model=siglip"]).model == "SigLIP"
    assert load_spec(EmbeddingSpec, None, ["model=Thumbnail"]).model == "thumbnail"
    with pytest.raises(DeftError, match="model_config_path"):
        load_spec(EmbeddingSpec, None, ["model=changenet", "model_path=/w/model.pth"])
    tao = load_spec(EmbeddingSpec, None, ["model=changenet", "model_path=/w/model.pth",
                                          "model_config_path=/w/experiment.yaml"])
    assert tao.is_tao_checkpoint
    with pytest.raises(DeftError, match="SigLIP, CLIP, thumbnail"):
        load_spec(EmbeddingSpec, None, ["model=ResNet"])


def test_missing_and_malformed_spec_files(tmp_path):
    with pytest.raises(DeftError) as exc:
        load_spec(MiningSpec, tmp_path / "nope.yaml")
    assert exc.value.code == "file_not_found"
    with pytest.raises(DeftError) as exc:
        load_spec(MiningSpec, write(tmp_path / "list.yaml", "- 1\n- 2\n"))
    assert exc.value.code == "spec_invalid"
    with pytest.raises(DeftError) as exc:
        load_spec(MiningSpec, write(tmp_path / "bad.yaml", "topn: [1,\n"))
    assert exc.value.code == "spec_invalid"


def test_run_overrides_route_to_the_spec_that_owns_the_key():
    embed, mine = split_overrides(["model=thumbnail", "topn=3", "batch_size=8", "filter_by_label=true"])
    assert embed == ["model=thumbnail", "batch_size=8"]
    assert mine == ["topn=3", "filter_by_label=true"]
    embed, mine = split_overrides({"model": "CLIP", "knn_metric": "euclidean"})
    assert embed == {"model": "CLIP"} and mine == {"knn_metric": "euclidean"}
    with pytest.raises(DeftError) as exc:
        split_overrides(["output_parquet=x.parquet"])
    assert "set by run" in exc.value.message
    with pytest.raises(DeftError) as exc:
        split_overrides(["btach_size=4"])
    assert exc.value.code == "spec_unknown_key" and exc.value.details["closest"] == "batch_size"


def test_spec_to_yaml_writes_spelled_values_in_place_and_leaves_excluded_keys_out():
    from deft_mine.schemas.specs import UniqueMatchingSpec, spec_to_yaml

    spec = UniqueMatchingSpec(source_path="/s.parquet", target_path="/t.parquet", output_dir="/o",
                              desired_unique_count=5, rare_class_list=["scratch", "dent"])
    assert "- scratch" in spec_to_yaml(spec)
    assert "rare_class_list: ''\n" in spec_to_yaml(spec, None, {"rare_class_list": ""})
    assert "rare_class_list" not in spec_to_yaml(spec, {"rare_class_list"}, {"rare_class_list": "dent,scratch"})
