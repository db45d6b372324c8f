"""The docker backend against a test double of NVIDIA's TAO data-services image (tests/fake_tao.py).

Three images are made by `docker import` (as in test_docker_backend.py): an empty root filesystem
holding the fake's script, whose ENTRYPOINT is the host's Python (bind-mounted read-only, the
backend's `mounts`), with /etc empty — the caller's uid has no passwd entry unless the backend
brings the host's — and WORKDIR /workspace, which has no experiment_specs/. The flavour is baked
in as $FAKE_TAO_FLAVOUR: `7.1.0`, `main` and `main-lies` (a liar that says FAIL and exits 0).

The `test_fake_*` tests drive the double through the Docker SDK alone, so that it is known to
keep the real image's contract; the others drive deft-mine's docker backend against it and
compare with --backend local (model=thumbnail: the fake embeds with the same weight-free encoder).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from conftest import write_embeddings, write_image
from deft_mine.errors import DeftError
from deft_mine.tools.run import run
from test_docker_backend import HOST_MOUNTS, _engine

FAKE = Path(__file__).with_name("fake_tao.py")
FLAVOURS = ("7.1.0", "main", "main-lies")
IMAGES = {flavour: f"deft-mine-fake-tao:{flavour}" for flavour in FLAVOURS}
NVIDIA = ("7.1.0", "main")  # the honest flavours
OVERRIDES = {"model": "thumbnail", "topn": 2, "filter_by_label": True}
EMBEDDING_KEYS = ["input_parquet", "output_parquet", "model", "model_path", "model_config_path", "batch_size"]
MINING_KEYS = ["source_parquet", "target_parquet", "output_parquet", "topn", "knn_metric",
               "source_embed_column_name", "target_embed_column_name", "filter_by_label"]
STRANGER = "4242:4242"  # a uid no image has in /etc/passwd


@pytest.fixture(scope="session")
def fake_tao() -> dict[str, str]:
    """The three flavours' images, rebuilt each session from tests/fake_tao.py."""
    client = _engine()
    for flavour, tag in IMAGES.items():
        data = io.BytesIO()
        with tarfile.open(fileobj=data, mode="w") as tar:
            for folder, mode in (("tmp", 0o1777), ("etc", 0o755), ("workspace", 0o755), ("opt", 0o755),
                                 ("opt/fake_tao", 0o755)):
                entry = tarfile.TarInfo(folder)
                entry.type, entry.mode = tarfile.DIRTYPE, mode
                tar.addfile(entry)
            script = tarfile.TarInfo("opt/fake_tao/fake_tao.py")
            script.size, script.mode = FAKE.stat().st_size, 0o644  # anyone may read it, whatever the checkout's mode
            tar.addfile(script, io.BytesIO(FAKE.read_bytes()))
            busybox = shutil.which("busybox")  # a shell to look around with; the fake needs none
            if busybox:
                tar.add(busybox, arcname="bin/busybox")
                link = tarfile.TarInfo("bin/sh")
                link.type, link.linkname = tarfile.SYMTYPE, "busybox"
                tar.addfile(link)
        changes = [f"ENV FAKE_TAO_FLAVOUR={flavour}", "WORKDIR /workspace",
                   f'ENTRYPOINT ["{sys.executable}", "/opt/fake_tao/fake_tao.py"]']
        subprocess.run(["docker", "import", *(a for c in changes for a in ("--change", c)), "-", tag],
                       input=data.getvalue(), check=True, capture_output=True)
        client.images.get(tag)
    return IMAGES


def docker_args(flavour: str) -> dict:
    return {"backend": "docker", "image": IMAGES[flavour], "mounts": HOST_MOUNTS}


def fake(flavour: str, args: list[str], workdir: Path, *, user: str | None = None, passwd: bool = True,
         cwd: Path | None = None) -> tuple[int, str]:
    """One container of the double, as a person would start it: (exit code, whole log)."""
    client = _engine()
    volumes = {p: {"bind": p, "mode": "ro"} for p in HOST_MOUNTS}
    volumes[str(workdir)] = {"bind": str(workdir), "mode": "rw"}
    if passwd:
        volumes |= {p: {"bind": p, "mode": "ro"} for p in ("/etc/passwd", "/etc/group")}
    container = client.containers.run(
        IMAGES[flavour], args, detach=True, volumes=volumes, network_mode="none",
        user=user or f"{os.getuid()}:{os.getgid()}", working_dir=str(cwd or workdir))
    try:
        code = container.wait()["StatusCode"]
        return code, container.logs().decode("utf-8", "replace")
    finally:
        container.remove(force=True)


def last_line(log: str) -> str:
    return log.rstrip("\n").split("\n")[-1]


def _picture(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)


@pytest.fixture
def labelled(tmp_path: Path) -> Path:
    """24x24 images listed by relative path, with labels spelled every which way.

    Targets t0 (` MISSING`) and t2 (`missing`) are near copies of A, t1 (`pass`) of B, t3 (`Pass `)
    is noise. The pool holds two near copies of A (`missing `, `PASS`), two of B (`pass`,
    `MISSING`) and noise (`Pass`, ` missing`): with topn=2 and the label filter, each of t0, t1, t2
    loses one pair to a label mismatch, t0 and t2 share a neighbour (a duplicate), and t3's
    neighbours lie far away (a floor drops them)."""
    rng = np.random.default_rng(7)
    base = {"A": rng.integers(0, 255, (24, 24, 3)), "B": rng.integers(0, 255, (24, 24, 3))}

    def near(name: str, seed: int) -> np.ndarray:
        return base[name] + np.random.default_rng(seed).normal(0, 6, (24, 24, 3))

    for name, pixels in {"t0": near("A", 1), "t1": near("B", 2), "t2": near("A", 3), "p0": near("A", 4),
                         "p1": near("A", 5), "p2": near("B", 6), "p3": near("B", 7)}.items():
        _picture(tmp_path / "imgs" / f"{name}.png", pixels)
    for seed, name in ((11, "t3"), (12, "p4"), (13, "p5")):
        write_image(tmp_path / "imgs" / f"{name}.png", seed=seed, size=(24, 24))
    pq.write_table(pa.table({"filepath": [f"imgs/t{i}.png" for i in range(4)],
                             "label": [" MISSING", "pass", "missing", "Pass "]}), tmp_path / "targets.parquet")
    pq.write_table(pa.table({"filepath": [f"imgs/p{i}.png" for i in range(6)],
                             "label": ["missing ", "PASS", "pass", "MISSING", "Pass", " missing"]}),
                   tmp_path / "pool.parquet")
    return tmp_path


def mined(run_dir: Path) -> list[str]:
    return pq.read_table(run_dir / "mined.parquet").column("filepath").to_pylist()


def manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text(encoding="utf-8"))


COUNTS = ("queries", "pairs", "kept_pairs", "dropped_pairs", "duplicates_removed", "mined")


# ------------------------------------------------------------------ the double keeps the contract

def _embedding_job(folder: Path, **spec) -> Path:
    write_image(folder / "imgs" / "0.png", seed=0, size=(24, 24))
    pq.write_table(pa.table({"filepath": ["imgs/0.png"], "label": ["a"]}), folder / "in.parquet")
    values = {"input_parquet": str(folder / "in.parquet"), "output_parquet": str(folder / "out" / "e.parquet"),
              "model": "thumbnail", "model_path": "none", **spec}
    (folder / "spec.yaml").write_text(yaml.safe_dump(values), encoding="utf-8")
    return folder / "spec.yaml"


@pytest.mark.e2e
def test_fake_needs_experiment_specs_in_its_working_directory(fake_tao, tmp_path):
    spec = _embedding_job(tmp_path)
    code, log = fake("main", ["embedding", "image_embeddings", "-e", str(spec)], tmp_path)
    assert code == 1 and "Primary config directory not found" in log
    assert last_line(log) == "Execution status: FAIL" and not (tmp_path / "out").exists()
    (tmp_path / "experiment_specs").mkdir()
    code, log = fake("main", ["embedding", "image_embeddings", "-e", str(spec)], tmp_path)
    assert (code, last_line(log)) == (0, "Execution status: PASS"), log
    table = pq.read_table(tmp_path / "out" / "e.parquet")
    assert table.schema.names == ["filepath", "embedding", "label"]  # input columns carried
    assert b"deft_mine.encoder" not in (table.schema.metadata or {})  # no encoder identity
    # the relay's quirk: logging lines (they hold "[__main__]") come back '\r'-joined
    assert "\r" in log and "Total images to process: 1" in log


@pytest.mark.e2e
@pytest.mark.parametrize("flavour", NVIDIA)
def test_fake_refuses_unknown_keys_naming_them(fake_tao, tmp_path, flavour):
    (tmp_path / "experiment_specs").mkdir()
    spec = _embedding_job(tmp_path)
    code, log = fake(flavour, ["embedding", "image_embeddings", "-e", str(spec), "bogus_key=1"], tmp_path)
    assert code == 1 and "Could not override 'bogus_key'" in log and last_line(log) == "Execution status: FAIL"
    spec = _embedding_job(tmp_path, image_root=str(tmp_path))  # a key of ours, in the spec file
    code, log = fake(flavour, ["embedding", "image_embeddings", "-e", str(spec)], tmp_path)
    assert code == 1 and "Key 'image_root' not in 'ImageEmbeddingsConfig'" in log
    mining = tmp_path / "mining.yaml"
    mining.write_text("source_parquet: s\ntarget_parquet: t\noutput_parquet: o\n", encoding="utf-8")
    code, log = fake(flavour, ["tmm", "nearest_neighbors", "-e", str(mining), "distance_threshold=0.5",
                               "--cfg=job"], tmp_path)
    if flavour == "7.1.0":  # 7.1.0 has no distance_threshold
        assert code == 1 and "Could not override 'distance_threshold'" in log
    else:
        assert code == 0 and "distance_threshold: 0.5" in log


@pytest.mark.e2e
def test_fake_dies_in_getpwuid_for_a_uid_without_passwd_entry(fake_tao, tmp_path):
    (tmp_path / "experiment_specs").mkdir()
    tmp_path.chmod(0o777)  # the stranger may enter
    spec = _embedding_job(tmp_path)
    spec.chmod(0o644)
    code, log = fake("main", ["embedding", "image_embeddings", "-e", str(spec)], tmp_path, user=STRANGER,
                     passwd=False)
    assert code == 1 and "KeyError: 'getpwuid(): uid not found: 4242'" in log
    assert last_line(log) == "Execution status: FAIL"
    # the caller, with the host's account files: it works, and what it writes is the caller's
    code, log = fake("main", ["embedding", "image_embeddings", "-e", str(spec)], tmp_path)
    assert code == 0, log
    assert os.stat(tmp_path / "out" / "e.parquet").st_uid == os.getuid()


@pytest.mark.e2e
@pytest.mark.parametrize("flavour", NVIDIA)
def test_fake_prints_exactly_its_flavours_keys(fake_tao, tmp_path, flavour):
    (tmp_path / "experiment_specs").mkdir()
    mining = tmp_path / "mining.yaml"
    mining.write_text("source_parquet: s.parquet\n", encoding="utf-8")
    code, log = fake(flavour, ["tmm", "nearest_neighbors", "-e", str(mining), "--cfg=job"], tmp_path)
    assert code == 0 and last_line(log) == "Execution status: PASS", log
    cfg_text = log[:log.index("Telemetry")]
    printed = yaml.safe_load(cfg_text.replace("???", "'???'"))
    assert list(printed) == MINING_KEYS + (["distance_threshold"] if flavour == "main" else [])
    assert printed["knn_metric"] == "euclidean" and printed["topn"] == 5 and printed["filter_by_label"] == "false"
    assert printed["source_parquet"] == "s.parquet" and printed["output_parquet"] == "???"
    if flavour == "main":
        assert printed["distance_threshold"] == -1.0
    spec = _embedding_job(tmp_path)
    code, log = fake(flavour, ["embedding", "image_embeddings", "-e", str(spec), "--cfg=job"], tmp_path)
    printed = yaml.safe_load(log[:log.index("Telemetry")])
    assert code == 0 and list(printed) == EMBEDDING_KEYS
    assert printed["batch_size"] == 64 and printed["model_config_path"] == ""


def _mining_job(folder: Path, **spec) -> Path:
    """Six 2-d source rows and two targets: exact distances, labels with nulls and odd spellings."""
    write_embeddings(folder / "s.parquet", np.array([[0, 0], [1, 0], [2, 0], [3, 0], [0, 5], [0, 6]]),
                     labels=[" a", "B", None, "a ", None, "b"], filepaths=[f"s{i}.png" for i in range(6)])
    write_embeddings(folder / "t.parquet", np.array([[0.4, 0], [0, 5.4]]), labels=["A", None],
                     filepaths=["t0.png", "t1.png"])
    values = {"source_parquet": str(folder / "s.parquet"), "target_parquet": str(folder / "t.parquet"),
              "output_parquet": str(folder / "out" / "mined.parquet"), "topn": 3, "filter_by_label": "yes", **spec}
    (folder / "mining.yaml").write_text(yaml.safe_dump(values), encoding="utf-8")
    return folder / "mining.yaml"


@pytest.mark.e2e
@pytest.mark.parametrize("flavour", NVIDIA)
def test_fake_mines_as_each_release_does(fake_tao, tmp_path, flavour):
    """t0 (A) at x=0.4: s0 ' a', s1 'B', s2 null → keeps s0; t1 (null) at y=5.4: s4 null, s5 'b',
    s0 ' a' → keeps s4 (two nulls agree as NONE). main's distance_threshold=0.5 then keeps the
    pairs at 0.4 and drops those at 0.6."""
    (tmp_path / "experiment_specs").mkdir()
    out = tmp_path / "out"
    code, log = fake(flavour, ["tmm", "nearest_neighbors", "-e", str(_mining_job(tmp_path))], tmp_path)
    assert code == 0, log
    assert pq.read_table(out / "mined.parquet").schema.names == ["filepath"]
    assert pq.read_table(out / "mined.parquet").column("filepath").to_pylist() == ["s0.png", "s4.png"]
    summary = (out / "mining_summary.txt").read_text(encoding="utf-8")
    saved = f"Results saved to: {out / 'mined.parquet'}"
    if flavour == "7.1.0":
        assert summary == ("Summary:\n  Target queries: 2\n  Similar items per query: 3\n  Total candidates: 2\n"
                           f"  Duplicates removed: 0\n  Unique items saved: 2\n  {saved}\n"
                           "Label filtering: kept 2/6 pairs, dropped 4 mismatches\n\n")
        return
    assert summary == ("Summary:\n  Target queries: 2\n  Similar items per query: 3\n  Total pairs: 6\n"
                       "  After label mismatch filtering: kept 2/6 pairs, dropped 4 mismatches\n"
                       "  Total candidates: 2\n  Duplicates removed: 0\n  Unique items saved: 2\n"
                       f"  {saved}\n")
    code, log = fake(flavour, ["tmm", "nearest_neighbors", "-e", str(_mining_job(tmp_path)), "filter_by_label=false",
                               "distance_threshold=0.5", "topn=2"], tmp_path)
    assert code == 0, log
    # t0: s0 (0.4) s1 (0.6); t1: s4 (0.4) s5 (0.6)
    text = (out / "mining_summary.txt").read_text()
    assert "After distance filtering: kept 2/4 pairs, dropped 2 exceeding threshold 0.5000" in text
    assert "mismatch" not in text
    assert pq.read_table(out / "mined.parquet").column("filepath").to_pylist() == ["s0.png", "s4.png"]
    code, log = fake(flavour, ["tmm", "nearest_neighbors", "-e", str(_mining_job(tmp_path)), "topn=2",
                               "distance_threshold=0.5", "knn_metric=manhattan"], tmp_path)
    text = (out / "mining_summary.txt").read_text()
    assert "After label mismatch filtering: kept 2/4 pairs, dropped 2 mismatches" in text
    assert "After distance filtering: kept 2/2 pairs, dropped 0 exceeding threshold 0.5000" in text
    pq.write_table(pq.read_table(tmp_path / "s.parquet").drop(["label"]), tmp_path / "s.parquet")
    code, log = fake(flavour, ["tmm", "nearest_neighbors", "-e", str(tmp_path / "mining.yaml")], tmp_path)
    assert code == 0 and "filter_by_label is enabled but the 'label' column is missing from: source" in log


@pytest.mark.e2e
def test_fake_liar_says_fail_and_exits_zero(fake_tao, tmp_path):
    (tmp_path / "experiment_specs").mkdir()
    spec = _embedding_job(tmp_path)
    code, log = fake("main-lies", ["embedding", "image_embeddings", "-e", str(spec)], tmp_path)
    assert code == 0 and last_line(log) == "Execution status: FAIL"
    assert (tmp_path / "out" / "e.parquet").exists()  # its outputs look finished


# ------------------------------------------------------------------ deft-mine's backend against it

@pytest.mark.e2e
@pytest.mark.parametrize("flavour", NVIDIA)
def test_run_through_nvidias_image_matches_the_local_backend(fake_tao, labelled, flavour):
    local = run(labelled / "targets.parquet", labelled / "pool.parquet", run_dir=labelled / "local",
                overrides=OVERRIDES)
    counts = {key: local.mine.summary.get(key) for key in COUNTS}
    assert counts["dropped_pairs"] and counts["duplicates_removed"]  # the data exercises both
    boxed = run(labelled / "targets.parquet", labelled / "pool.parquet", run_dir=labelled / "docker",
                overrides=OVERRIDES, **docker_args(flavour))
    docker_dir = labelled / "docker"
    assert pq.read_table(docker_dir / "mined.parquet").schema.names[0] == "filepath"
    assert mined(docker_dir) == mined(labelled / "local")
    assert {key: manifest(docker_dir)["mining"]["summary"].get(key) for key in COUNTS} == counts
    for step in ("target_embeddings", "source_embeddings", "nearest_neighbors"):
        log = (docker_dir / f"{step}.log").read_text(encoding="utf-8")
        assert last_line(log) == "Execution status: PASS", step
        assert "Telemetry" in log  # the whole log, not a tail
    assert "Total images to process: 4" in (docker_dir / "target_embeddings.log").read_text(encoding="utf-8")
    assert "provenance_unknown" in [w.code for w in boxed.warnings]
    assert "provenance_unknown" in [w["code"] for w in manifest(docker_dir)["warnings"]]
    for picture in ("contact_sheet.png", "score_histogram.png"):  # pairs recomputed on the host
        assert (docker_dir / picture).exists(), picture


@pytest.mark.e2e
@pytest.mark.parametrize("flavour", NVIDIA)
def test_a_distance_threshold_gives_the_local_floor_on_either_release(fake_tao, labelled, flavour):
    """main applies distance_threshold itself; 7.1.0 does not know the key, so the backend must
    apply it on the host — never hand it over (a Hydra failure)."""
    overrides = {"model": "thumbnail", "topn": 2, "knn_metric": "cosine", "distance_threshold": 0.5}
    local = run(labelled / "targets.parquet", labelled / "pool.parquet", run_dir=labelled / "local",
                overrides=overrides)
    assert local.mine.summary.get("below_floor") and local.mined  # the floor drops some, keeps some
    boxed = run(labelled / "targets.parquet", labelled / "pool.parquet", run_dir=labelled / "docker",
                overrides=overrides, **docker_args(flavour))
    assert mined(labelled / "docker") == mined(labelled / "local")
    assert boxed.mine.summary.get("below_floor") == local.mine.summary["below_floor"]
    assert boxed.mined == local.mined


@pytest.mark.e2e
def test_exit_zero_with_execution_status_fail_is_a_failure(fake_tao, labelled):
    with pytest.raises(DeftError) as exc:
        run(labelled / "targets.parquet", labelled / "pool.parquet", run_dir=labelled / "docker",
            overrides=OVERRIDES, **docker_args("main-lies"))
    assert exc.value.code == "container_failed"
    assert "Execution status: FAIL" in exc.value.message and exc.value.details.get("exit_code") == 0
    assert manifest(labelled / "docker")["status"] == "failed"


@pytest.mark.e2e
def test_keys_the_image_does_not_know_are_applied_on_the_host(fake_tao, labelled):
    pool = pq.read_table(labelled / "pool.parquet")
    pq.write_table(pa.concat_tables([pool, pa.table({"filepath": ["imgs/t1.png"], "label": ["pass"]})]),
                   labelled / "pool.parquet")
    overrides = {**OVERRIDES, "exclude_targets": True}
    run(labelled / "targets.parquet", labelled / "pool.parquet", run_dir=labelled / "local", overrides=overrides)
    run(labelled / "targets.parquet", labelled / "pool.parquet", run_dir=labelled / "docker", overrides=overrides,
        **docker_args("7.1.0"))
    assert "imgs/t1.png" not in mined(labelled / "docker")
    assert mined(labelled / "docker") == mined(labelled / "local")


@pytest.mark.e2e
@pytest.mark.parametrize("flavour", NVIDIA)
def test_per_label_search_is_refused_before_any_container_runs(fake_tao, labelled, flavour):
    """Only the schema question (`--cfg=job`) reaches the image; no step runs."""
    with pytest.raises(DeftError) as exc:
        run(labelled / "targets.parquet", labelled / "pool.parquet", run_dir=labelled / "docker",
            overrides={**OVERRIDES, "label_mode": "per_label"}, **docker_args(flavour))
    assert exc.value.code == "backend_unsupported" and "label_mode" in exc.value.message
    folder = labelled / "docker"
    assert not [p.name for p in folder.iterdir() if p.suffix == ".log"]  # no step's log: none ran
    assert not (folder / "target_embeddings.parquet").exists()


@pytest.mark.e2e
def test_what_the_container_writes_belongs_to_the_caller(fake_tao, labelled):
    run(labelled / "targets.parquet", labelled / "pool.parquet", run_dir=labelled / "docker",
        overrides=OVERRIDES, **docker_args("main"))
    written = [p for p in (labelled / "docker").rglob("*")]
    assert {"target_embeddings.parquet", "source_embeddings.parquet", "mining_summary.txt"} <= {p.name for p in written}
    assert not [str(p) for p in written if os.stat(p).st_uid != os.getuid()]
