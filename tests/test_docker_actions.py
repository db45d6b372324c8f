"""The docker backend's two further actions, `tmm unique_neighbor_matching` (the match tool) and
`embedding text_embeddings` (embed of a text parquet, run --text): passed to an image whose schema
has them, refused naming the action where it has not.

Images: the test double of NVIDIA's (tests/fake_tao.py, the fixture of test_docker_tao.py) — main
has both actions, 7.1.0 text embeddings only, 7.0.2 (made here from main's image, its flavour
switched) neither — and deft-mine's own entrypoint (made here: the host's deft-mine-task with
$PYTHONPATH naming the source this session imports, so the container runs this checkout's code).
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import deft_mine
from conftest import write_image
from deft_mine.errors import DeftError
from deft_mine.tools import embed, match, run
from test_docker_backend import HOST_MOUNTS, _engine
from test_docker_tao import fake_tao  # noqa: F401 - the fixture
from test_text_embeddings import SENTENCES, _with_tokenizer, write_texts

OLD_FAKE = "deft-mine-fake-tao:7.0.2"
OURS = "deft-mine-test-src:latest"


@pytest.fixture(scope="session")
def fake_7_0_2(fake_tao) -> str:  # noqa: F811 - the imported fixture
    """main's image with its flavour switched to 7.0.2 (no text embeddings, no unique matching)."""
    client = _engine()
    box = client.containers.create(fake_tao["main"])
    try:
        box.commit(*OLD_FAKE.split(":"), changes=["ENV FAKE_TAO_FLAVOUR=7.0.2"])
    finally:
        box.remove(force=True)
    return OLD_FAKE


@pytest.fixture(scope="session")
def ours() -> str:
    """deft-mine's entrypoint (deft-mine-task) on an empty root filesystem, importing this checkout."""
    _engine()
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as tar:
        for folder in ("tmp", "etc"):
            entry = tarfile.TarInfo(folder)
            entry.type, entry.mode = tarfile.DIRTYPE, 0o1777
            tar.addfile(entry)
    source = Path(deft_mine.__file__).resolve().parents[1]
    changes = [f"ENV PYTHONPATH={source}", f'ENTRYPOINT ["{Path(sys.executable).parent / "deft-mine-task"}"]']
    subprocess.run(["docker", "import", *(a for c in changes for a in ("--change", c)), "-", OURS],
                   input=data.getvalue(), check=True, capture_output=True)
    return OURS


def docker(image: str) -> dict:
    return {"backend": "docker", "image": image, "mounts": HOST_MOUNTS}


# ------------------------------------------------------------------ tmm unique_neighbor_matching

def _side(path: Path, names: list[str], vectors: np.ndarray, labels: list[str]) -> Path:
    pq.write_table(pa.table({"filepath": names, "embedding": pa.array(vectors.astype(np.float32).tolist(),
                                                                      pa.list_(pa.float32())), "label": labels}), path)
    return path


@pytest.fixture
def sides(tmp_path: Path) -> Path:
    """A 16-row pool and 4 targets, labelled (dent rare), and a spec file naming them."""
    rng = np.random.default_rng(11)
    _side(tmp_path / "pool.parquet", [f"p{i:02d}.png" for i in range(16)], rng.normal(size=(16, 6)),
          ["dent" if i % 4 == 0 else "ok" for i in range(16)])
    _side(tmp_path / "targets.parquet", [f"t{i}.png" for i in range(4)], rng.normal(size=(4, 6)),
          ["dent", "ok", "ok", "ok"])
    (tmp_path / "spec.yaml").write_text(f"source_path: {tmp_path}/pool.parquet\ntarget_path: "
                                        f"{tmp_path}/targets.parquet\ndesired_unique_count: 7\n", encoding="utf-8")
    return tmp_path


def _match(folder: Path, name: str, keys: dict, **backend):
    return match(spec_path=folder / "spec.yaml", overrides={"output_dir": str(folder / name), **keys}, **backend)


def _final(result) -> list[str]:
    return sorted(pq.read_table(result.final_parquet).column("filepath").to_pylist())


@pytest.mark.e2e
def test_match_through_nvidias_main_image_equals_the_local_backend(fake_tao, sides):  # noqa: F811
    keys = {"distance_metric": "cosine", "candidate_expansion_factor": "2"}
    local = _match(sides, "local", keys)
    boxed = _match(sides, "docker", keys, **docker(fake_tao["main"]))
    assert _final(boxed) == _final(local) and len(_final(local)) == 7
    out = sides / "docker"
    assert pq.read_table(out / "final_unique_files.parquet").schema.names == ["filepath"]  # the container's file
    assert json.loads((out / "summary.json").read_text()) == {
        "allocation_policy": "global", "desired_unique_count": 7, "retrieved_unique_count": 7, "coverage_pct": 100.0,
        "target_queries": 4, "rare_classes": []}
    assert [p.file for p in boxed.passes] == [] and [p.file for p in local.passes]  # its summary names no passes
    assert sorted(p.name for p in out.glob("global_iteration_*.parquet")) == sorted(p.file for p in local.passes)
    assert boxed.backend == "docker" and boxed.retrieved_unique_count == local.retrieved_unique_count
    spec = (out / ".deft-mine" / "final_unique_files.unique_matching_spec.yaml").read_text()
    assert "rare_class_list: ''" in spec and "block_rows" not in spec  # its string; none of our keys


@pytest.mark.e2e
def test_class_stratified_passes_to_deft_mines_image_and_is_refused_by_nvidias(fake_tao, ours, sides):  # noqa: F811
    keys = {"allocation_policy": "class_stratified", "rare_class_list": "dent"}
    local = _match(sides, "local", keys)
    boxed = _match(sides, "ours", keys, **docker(ours))
    assert _final(boxed) == _final(local)
    assert boxed.per_class == local.per_class and sum(local.per_class.values()) == 7
    with pytest.raises(DeftError) as exc:
        _match(sides, "nvidia", keys, **docker(fake_tao["main"]))
    assert exc.value.code == "backend_unsupported" and "tmm unique_neighbor_matching" in exc.value.message
    assert "detection files" in exc.value.message and not (sides / "nvidia").exists()


def _coco(path: Path, side: Path) -> Path:
    """The side's `label`s as a COCO file (one box per image): the container's class source."""
    rows = pq.read_table(side).to_pylist()
    names = sorted({r["label"] for r in rows})
    path.write_text(json.dumps({
        "images": [{"id": i, "file_name": r["filepath"]} for i, r in enumerate(rows)],
        "annotations": [{"id": i, "image_id": i, "category_id": names.index(r["label"]) + 1, "bbox": [0, 0, 4, 4]}
                        for i, r in enumerate(rows)],
        "categories": [{"id": i + 1, "name": n} for i, n in enumerate(names)]}), encoding="utf-8")
    return path


@pytest.mark.e2e
def test_class_stratified_with_coco_files_passes_to_nvidias_image_and_equals_local(fake_tao, sides):  # noqa: F811
    keys = {"allocation_policy": "class_stratified", "rare_class_list": "dent", "detection_format": "coco",
            "source_detection_file": str(_coco(sides / "pool.json", sides / "pool.parquet")),
            "target_detection_file": str(_coco(sides / "targets.json", sides / "targets.parquet"))}
    by_label = _match(sides, "by_label", {"allocation_policy": "class_stratified", "rare_class_list": "dent"})
    local = _match(sides, "local", keys)
    boxed = _match(sides, "nvidia", keys, **docker(fake_tao["main"]))
    assert _final(boxed) == _final(local) == _final(by_label) and len(_final(local)) == 7
    assert json.loads((sides / "nvidia" / "summary.json").read_text())["rare_classes"] == ["dent"]


@pytest.mark.e2e
def test_exclusion_by_full_path_alone_is_refused_by_nvidias_image(fake_tao, sides):  # noqa: F811
    """NVIDIA's exclude_path also drops every pool file of the same name: exclude_by=path cannot pass."""
    pq.write_table(pa.table({"filepath": ["p00.png"]}), sides / "exclude.parquet")
    keys = {"exclude_path": str(sides / "exclude.parquet"), "exclude_by": "path"}
    assert "p00.png" not in _final(_match(sides, "local", keys))
    with pytest.raises(DeftError) as exc:
        _match(sides, "nvidia", keys, **docker(fake_tao["main"]))
    assert exc.value.code == "backend_unsupported" and "exclude_by=path" in exc.value.message
    assert not (sides / "nvidia").exists()


@pytest.mark.e2e
def test_match_is_refused_by_an_image_without_the_action(fake_tao, sides):  # noqa: F811
    """7.1.0 has no `tmm unique_neighbor_matching`: its entrypoint's argparse refuses the question."""
    with pytest.raises(DeftError) as exc:
        _match(sides, "docker", {}, **docker(fake_tao["7.1.0"]))
    assert exc.value.code == "backend_unsupported"
    assert "tmm unique_neighbor_matching" in exc.value.message and fake_tao["7.1.0"] in exc.value.message
    assert exc.value.details["action"] == "tmm unique_neighbor_matching"
    assert not (sides / "docker").exists()  # nothing written, not even the question's spec


# ------------------------------------------------------------------ embedding text_embeddings

@pytest.fixture(scope="module")
def siglip(tiny_siglip, tmp_path_factory) -> Path:
    return _with_tokenizer(tiny_siglip, tmp_path_factory.mktemp("docker_text") / "model")


def _encoder(model_path: Path) -> dict:
    return {"model": "SigLIP", "model_path": str(model_path), "batch_size": 2}


@pytest.mark.e2e
@pytest.mark.parametrize("flavour", ["7.1.0", "main"])
def test_text_embeddings_through_nvidias_image_equal_the_local_backend(fake_tao, siglip, tmp_path,  # noqa: F811
                                                                       flavour):
    texts = write_texts(tmp_path / "texts.parquet", [*SENTENCES, None, "  "], label=["a", "b", "c", "d", "e"])
    local = embed(texts, tmp_path / "local.parquet", overrides=_encoder(siglip), no_store=True)
    boxed = embed(texts, tmp_path / "docker.parquet", overrides=_encoder(siglip), no_store=True,
                  **docker(fake_tao[flavour]))
    here, there = pq.read_table(tmp_path / "local.parquet"), pq.read_table(tmp_path / "docker.parquet")
    assert there.schema.names == ["text", "embedding", "label"]  # the container's columns, input's carried
    assert there.column("text").to_pylist() == here.column("text").to_pylist() == SENTENCES
    assert there.column("label").to_pylist() == ["a", "b", "c"]
    np.testing.assert_allclose(np.array(there.column("embedding").to_pylist()),
                               np.array(here.column("embedding").to_pylist()), rtol=1e-5, atol=1e-6)
    assert boxed.rows == local.rows == 3 and boxed.input_rows == 5
    assert dict(boxed.skipped_by_reason) == dict(local.skipped_by_reason) == {"null text": 1, "empty text": 1}
    assert [w.code for w in boxed.warnings] == [w.code for w in local.warnings] == ["texts_skipped"]
    assert boxed.encoder.model == "SigLIP" and boxed.encoder.model_path == str(siglip)
    assert not list(tmp_path.glob(".*texts.parquet"))  # the container's copy without the blank rows is gone
    assert "Execution status: PASS" in (tmp_path / "docker.log").read_text()


@pytest.mark.e2e
def test_run_with_text_through_deft_mines_image_equals_the_local_backend(ours, siglip, tmp_path):
    for i in range(5):
        write_image(tmp_path / "imgs" / f"p{i}.png", seed=i, size=(32, 32))
    pq.write_table(pa.table({"filepath": [f"imgs/p{i}.png" for i in range(5)]}), tmp_path / "pool.parquet")
    keys = {**_encoder(siglip), "topn": 2}
    run(text=SENTENCES[:2], source=tmp_path / "pool.parquet", run_dir=tmp_path / "local", overrides=keys, no_store=True)
    run(text=SENTENCES[:2], source=tmp_path / "pool.parquet", run_dir=tmp_path / "docker", overrides=keys,
        no_store=True, **docker(ours))
    for name in ("mined.parquet", "target_embeddings.parquet"):
        here, there = pq.read_table(tmp_path / "local" / name), pq.read_table(tmp_path / "docker" / name)
        assert there.column_names == here.column_names, name
        if name == "mined.parquet":
            assert there.column("filepath").to_pylist() == here.column("filepath").to_pylist()
        else:
            np.testing.assert_allclose(np.array(there.column("embedding").to_pylist()),
                                       np.array(here.column("embedding").to_pylist()), rtol=1e-5, atol=1e-6)


@pytest.mark.e2e
def test_text_is_refused_by_an_image_without_the_action(fake_7_0_2, siglip, tmp_path):
    texts = write_texts(tmp_path / "texts.parquet", SENTENCES)
    with pytest.raises(DeftError) as exc:
        embed(texts, tmp_path / "out" / "e.parquet", overrides=_encoder(siglip), no_store=True, **docker(fake_7_0_2))
    assert exc.value.code == "backend_unsupported" and exc.value.details["action"] == "embedding text_embeddings"
    assert "embedding text_embeddings" in exc.value.message and fake_7_0_2 in exc.value.message
    assert "backend=local" in exc.value.fix and not (tmp_path / "out" / "e.parquet").exists()
    pq.write_table(pa.table({"filepath": ["p.png"]}), tmp_path / "pool.parquet")
    with pytest.raises(DeftError) as exc:
        run(text=SENTENCES[:1], source=tmp_path / "pool.parquet", run_dir=tmp_path / "run",
            overrides=_encoder(siglip), **docker(fake_7_0_2))
    assert exc.value.code == "backend_unsupported" and "embedding text_embeddings" in exc.value.message
    assert not (tmp_path / "run").exists()  # refused before the run folder
