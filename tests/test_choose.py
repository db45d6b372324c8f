"""choose: the encoder that separates the labels is picked, its scores equal a brute-force reference,
the same seed gives the same numbers, bad input is refused by code, and the specs it writes run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from deft_mine.cli import main
from deft_mine.engine import choice, tables
from deft_mine.errors import DeftError
from deft_mine.events import Cancelled, RecordingEvents
from deft_mine.schemas import artifacts
from deft_mine.tools import choose, run

# Classes differ in colour (a tint the thumbnail keeps after removing each image's mean); each image
# also gets a random overall brightness, which the thumbnail removes and a random network does not.
TINTS = {"red": (30, 0, -30), "blue": (-30, 0, 30), "green": (0, 30, -30)}


def colour_set(folder: Path, per_label: int = 12, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    names, labels = [], []
    for label, tint in TINTS.items():
        for i in range(per_label):
            pixels = 128 + rng.uniform(-80, 80) + np.array(tint) + rng.normal(0, 8, (32, 32, 3))
            name = f"imgs/{label}_{i}.png"
            (folder / "imgs").mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / name)
            names.append(name)
            labels.append(label if i % 3 else f" {label.upper()}")  # the container's rule: strip, upper
    pq.write_table(pa.table({"filepath": names, "label": labels}), folder / "listing.parquet")
    return folder / "listing.parquet"


@pytest.fixture
def listing(tmp_path: Path) -> Path:
    return colour_set(tmp_path)


def dino(folder: Path, pooling: str = "cls") -> dict:
    return {"model": "DINOv2", "model_path": str(folder), "pooling": pooling}


def reference(vectors: np.ndarray, labels: list[str], k_max: int) -> list[float]:
    """Leave-one-out macro agreement in plain Python: cosine by sums, ties to the lower row."""
    def cos(a, b):
        dot = sum(float(x) * float(y) for x, y in zip(a, b))
        na, nb = math.sqrt(sum(float(x) ** 2 for x in a)), math.sqrt(sum(float(y) ** 2 for y in b))
        return dot / (na * nb) if na and nb else 0.0
    n = len(vectors)
    shares: dict[str, list[list[float]]] = {}
    for i in range(n):
        others = sorted((j for j in range(n) if j != i), key=lambda j: (-cos(vectors[i], vectors[j]), j))
        same = [labels[j] == labels[i] for j in others[:k_max]]
        shares.setdefault(labels[i], []).append([sum(same[:k]) / k for k in range(1, k_max + 1)])
    scored = [rows for rows in shares.values() if len(rows) >= 2]
    return [sum(sum(r[k] for r in rows) / len(rows) for rows in scored) / len(scored) for k in range(k_max)]


def test_the_encoder_that_separates_the_colours_is_picked(listing: Path, tmp_path: Path, tiny_dinov2: Path):
    out = tmp_path / "choice"
    events = RecordingEvents()
    result = choose(listing=listing, output_dir=out, encoders=[dino(tiny_dinov2), "thumbnail"], sample=36,
                    k_max=10, topn=5, no_store=True, events=events)
    assert result.pick == "thumbnail" and result.clear_winner
    scores = {s.name: s for s in result.encoders}
    assert scores["thumbnail"].at_topn == 1.0
    assert scores[result.runner_up].at_topn < 0.95
    assert result.sample == 36 and result.scored_images == 36 and result.unscored_labels == []
    assert result.sampled_per_label == {"BLUE": 12, "GREEN": 12, "RED": 12}
    assert {stage for stage, _, _ in events.progress_events} >= {"choose", "embed thumbnail"}
    for name in (artifacts.CHOICE, artifacts.CHOICE_REPORT, artifacts.CHOICE_PLOT, artifacts.EMBEDDING_SPEC,
                 artifacts.MINING_SPEC):
        assert (out / name).is_file(), name
    assert json.loads((out / artifacts.CHOICE).read_text())["pick"] == "thumbnail"
    assert len((out / artifacts.CHOICE_REPORT).read_text().split()) <= 500
    # each score equals the brute-force reference on the vectors the encoder wrote
    for score in result.encoders:
        table = pq.read_table(score.embeddings_parquet)
        vectors = np.array(table.column("embedding").to_pylist(), dtype=np.float32)
        labels = [str(v).strip().upper() for v in table.column("label").to_pylist()]
        assert score.agreement == pytest.approx(reference(vectors, labels, 10), abs=1e-12), score.name


def test_same_seed_same_numbers_and_the_store_is_reused(listing: Path, tmp_path: Path):
    big = colour_set(tmp_path / "big", per_label=20)
    first = choose(listing=big, output_dir=tmp_path / "a", encoders=["thumbnail"], sample=30, k_max=5, seed=3,
                   store=str(tmp_path / "store"))
    again = choose(listing=big, output_dir=tmp_path / "b", encoders=["thumbnail"], sample=30, k_max=5, seed=3,
                   store=str(tmp_path / "store"))
    other = choose(listing=big, output_dir=tmp_path / "c", encoders=["thumbnail"], sample=30, k_max=5, seed=4,
                   no_store=True)
    assert first.encoders[0].agreement == again.encoders[0].agreement
    assert first.sampled_per_label == again.sampled_per_label == {"BLUE": 10, "GREEN": 10, "RED": 10}
    assert again.encoders[0].reused == 30 and again.encoders[0].embedded == 0
    rows = lambda r: pq.read_table(Path(r.output_dir) / artifacts.CHOICE_SAMPLE).column("filepath").to_pylist()
    assert rows(first) == rows(again) != rows(other)


def test_stratified_sample_keeps_two_of_each_label_and_is_deterministic():
    keys = ["a"] * 90 + ["b"] * 8 + ["c"] * 1 + [None] * 5
    rows = choice.stratified_sample(keys, 20, seed=1)
    assert len(rows) == 20 and list(rows) == sorted(rows)
    picked = [keys[r] for r in rows]
    assert picked.count("c") == 1 and picked.count("b") >= 2 and None not in picked
    assert list(choice.stratified_sample(keys, 20, seed=1)) == list(rows)
    assert len(choice.stratified_sample(keys, 500, seed=1)) == 99  # every labelled row when fewer


def test_ties_go_to_the_lower_row_and_a_row_is_never_its_own_neighbour():
    vectors = np.array([[1, 0], [1, 0], [1, 0], [0, 1]], dtype=np.float32)
    ids, sims = choice.nearest(vectors, vectors, 2, exclude_self=True)
    assert ids.tolist() == [[1, 2], [0, 2], [0, 1], [0, 1]]
    assert sims[0].tolist() == [1.0, 1.0]


def test_suggestions_follow_their_stated_rules():
    assert choice.suggest_topn(np.array([0.9, 0.88, 0.86, 0.84, 0.7]), 0.05) == 3
    assert choice.suggest_topn(np.array([0.9, 0.9]), 0.05) == 2
    # the cut with the fewest same-label pairs below and cross-label pairs above; equal cuts: the lowest
    floor = choice.suggest_floor(np.array([0.9, 0.8, 0.7, 0.35]), np.array([0.3, 0.2, 0.4, 0.1]))
    assert floor.value == 0.35 and floor.below == 3 and floor.below_cross == 1.0
    assert floor.above == 5 and floor.above_same == pytest.approx(0.8)
    assert choice.suggest_floor(np.array([0.5, 0.6]), np.array([0.7, 0.8])).value is None  # nothing separates
    assert choice.suggest_floor(np.array([0.5, 0.6]), np.array([])).value is None  # nothing to cut


def test_targets_are_scored_by_their_topn_sample_neighbours(listing: Path, tmp_path: Path):
    pq.write_table(pa.table({"filepath": ["imgs/red_0.png", "imgs/blue_1.png"], "label": ["red", "blue"]}),
                   tmp_path / "targets.parquet")
    result = choose(listing=listing, targets=tmp_path / "targets.parquet", output_dir=tmp_path / "out",
                    encoders=["thumbnail"], sample=36, k_max=5, topn=3, no_store=True)
    score = result.encoders[0]
    assert score.targets_scored == 2 and score.target_agreement == 1.0
    assert score.target_per_label == {"BLUE": 1.0, "RED": 1.0}


def test_an_encoder_that_cannot_load_is_listed_and_the_others_scored(listing: Path, tmp_path: Path):
    result = choose(listing=listing, output_dir=tmp_path / "out", sample=36, k_max=5, no_store=True,
                    encoders=["thumbnail", {"model": "hf", "model_path": str(tmp_path / "no_such_model")}])
    missing = next(s for s in result.encoders if s.spec["model"] == "hf")
    assert not missing.available and missing.error.code == "model_load_failed"
    assert result.pick == "thumbnail" and result.runner_up is None


def test_the_default_candidates_skip_what_is_not_cached(listing: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    result = choose(listing=listing, output_dir=tmp_path / "out", sample=36, k_max=5, no_store=True)
    available = [s.name for s in result.encoders if s.available]
    assert available == ["thumbnail"] and len(result.encoders) == 5
    assert {s.error.code for s in result.encoders if not s.available} == {"model_load_failed"}


@pytest.mark.parametrize(("change", "code", "field"), [
    ({"sample": 9}, "sample_too_small", "sample"),
    ({"k_max": 36}, "k_max_too_large", "k_max"),
    ({"sample": 100, "k_max": 36}, "k_max_too_large", "k_max"),  # only 36 labelled images
    ({"topn": 11, "k_max": 10}, "spec_invalid", "topn"),
    ({"k_max": 0}, "spec_invalid", "k_max"),
    ({"backend": "docker"}, "backend_unsupported", "backend"),
    ({"encoders": [{"model": "DINOv2", "poolng": "mean"}]}, "spec_invalid", "encoders[0]"),
])
def test_bad_input_is_refused_naming_the_field(listing: Path, tmp_path: Path, change: dict, code: str, field: str):
    given = {"listing": listing, "output_dir": tmp_path / "out", "encoders": ["thumbnail"], "sample": 36,
             "k_max": 5, "no_store": True, **change}
    with pytest.raises(DeftError) as caught:
        choose(**given)
    assert caught.value.code == code and caught.value.details["field"] == field and caught.value.fix


def test_no_label_column_and_a_single_label_are_refused(tmp_path: Path, listing: Path):
    table = pq.read_table(listing)
    pq.write_table(table.drop_columns(["label"]), tmp_path / "unlabelled.parquet")
    pq.write_table(table.set_column(1, "label", pa.array(["ok"] * table.num_rows)), tmp_path / "one.parquet")
    for name, code in (("unlabelled.parquet", "label_column_missing"), ("one.parquet", "single_label")):
        with pytest.raises(DeftError) as caught:
            choose(listing=tmp_path / name, output_dir=tmp_path / "out", encoders=["thumbnail"], no_store=True)
        assert caught.value.code == code and caught.value.details["field"] == "listing"


def test_a_label_with_one_image_is_reported_not_scored(tmp_path: Path, listing: Path):
    table = pq.read_table(listing)
    Image.new("RGB", (32, 32), (200, 40, 40)).save(tmp_path / "imgs" / "odd.png")
    extra = pa.table({"filepath": ["imgs/odd.png"], "label": ["odd"]})
    pq.write_table(pa.concat_tables([table, extra]), tmp_path / "with_odd.parquet")
    result = choose(listing=tmp_path / "with_odd.parquet", output_dir=tmp_path / "out", encoders=["thumbnail"],
                    sample=100, k_max=5, no_store=True)
    assert result.unscored_labels == ["ODD"] and result.scored_images == 36 and result.sample == 37
    assert "ODD" not in result.encoders[0].per_label


def test_cancelling_stops_the_choice(listing: Path, tmp_path: Path):
    class Cancelling(RecordingEvents):
        def progress(self, stage, done, total, note=""):
            if stage.startswith("embed"):
                raise Cancelled()
    with pytest.raises(Cancelled):
        choose(listing=listing, output_dir=tmp_path / "out", encoders=["thumbnail"], sample=36, k_max=5,
               no_store=True, events=Cancelling())
    assert not (tmp_path / "out" / artifacts.CHOICE).exists()


def test_the_written_specs_run_unchanged(listing: Path, tmp_path: Path):
    result = choose(listing=listing, output_dir=tmp_path / "choice", encoders=["thumbnail"], sample=36, k_max=5,
                    no_store=True)
    pq.write_table(pa.table({"filepath": ["imgs/red_1.png"], "label": ["red"]}), tmp_path / "targets.parquet")
    done = run(targets=tmp_path / "targets.parquet", source=listing, run_dir=tmp_path / "run",
               embedding_spec_path=result.embedding_spec, mining_spec_path=result.mining_spec, no_store=True)
    assert done.mine.topn == result.suggested_topn and done.target_embed.encoder.model == "thumbnail"


def test_the_command_line(listing: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    out = tmp_path / "cli"
    assert main(["choose", "--listing", str(listing), "--output-dir", str(out), "--encoder", "thumbnail",
                 "--encoder", "model=thumbnail", "--sample", "36", "--k-max", "5", "--tolerance", "0.1",
                 "--no-store", "--json", "-q"]) == 2  # the same encoder twice: refused
    assert "spec_invalid" in "".join(capsys.readouterr())
    assert main(["choose", "--listing", str(listing), "--output-dir", str(out), "--encoder", "thumbnail",
                 "--sample", "36", "--k-max", "5", "--tolerance", "0.1", "--no-store", "--json", "-q"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["pick"] == "thumbnail" and printed["tolerance"] == 0.1
    assert tables.num_rows(out / artifacts.CHOICE_SAMPLE) == 36


@pytest.mark.e2e
def test_one_call_through_the_mcp_server(listing: Path, tmp_path: Path, tiny_dinov2: Path):
    """The typed tool over stdio: the same pick and files as the Python call, a refusal coded."""
    from mcp_helpers import SyncClient, ok, refused, stdio_params

    with SyncClient(stdio_params(tmp_path)) as client:
        got = ok(client.call("choose", {"listing": str(listing), "output_dir": str(tmp_path / "chosen"),
                                        "encoders": [{"model": "thumbnail"}], "sample": 36, "k_max": 5,
                                        "no_store": True}))
        assert got["pick"] == "thumbnail" and Path(got["output_dir"], artifacts.CHOICE).is_file()
        # choose compares encoders, so it binds the session to none: a second choice over two
        # encoders, then a run with another encoder, both go through
        two = ok(client.call("choose", {"listing": str(listing), "output_dir": str(tmp_path / "two"),
                                        "encoders": [{"model": "thumbnail"}, dino(tiny_dinov2)], "sample": 36,
                                        "k_max": 5, "no_store": True}))
        assert [s["available"] for s in two["encoders"]] == [True, True]
        ok(client.call("run", {"targets": str(listing), "source": str(listing), "run_dir": str(tmp_path / "r"),
                               "overrides": dino(tiny_dinov2), "no_store": True}))
        refused(client.call("choose", {"listing": str(listing), "output_dir": str(tmp_path / "c2"),
                                       "sample": 5}), "sample_too_small")


def test_two_models_in_folders_of_the_same_name_get_two_names_and_two_files(listing: Path, tmp_path: Path,
                                                                            tiny_dinov2: Path):
    import shutil

    for parent in ("a", "b"):
        shutil.copytree(tiny_dinov2, tmp_path / "m" / parent / "vit")
    given = [dino(tmp_path / "m" / "a" / "vit"), dino(tmp_path / "m" / "b" / "vit"), "thumbnail"]
    result = choose(listing=listing, output_dir=tmp_path / "out", encoders=given, sample=36, k_max=5, no_store=True)
    names = [s.name for s in result.encoders]
    assert names[:2] == ["DINOv2 a/vit (cls)", "DINOv2 b/vit (cls)"]
    files = {s.embeddings_parquet for s in result.encoders}
    assert len(files) == 3 and all(Path(f).is_file() for f in files)
    with pytest.raises(DeftError) as caught:  # the same folder twice is still one candidate named twice
        choose(listing=listing, output_dir=tmp_path / "out2", encoders=[given[0], given[0]], sample=36, k_max=5,
               no_store=True)
    assert caught.value.code == "spec_invalid" and caught.value.details["field"] == "encoders[1]"


def test_the_counts_reported_are_the_images_the_score_rests_on(listing: Path, tmp_path: Path):
    (tmp_path / "imgs" / "red_1.png").write_bytes(b"not a png")  # the sample holds it; embedding skips it
    out = tmp_path / "out"
    result = choose(listing=listing, output_dir=out, encoders=["thumbnail"], sample=36, k_max=5, no_store=True)
    score = result.encoders[0]
    assert result.sampled_per_label == {"BLUE": 12, "GREEN": 12, "RED": 12} and result.sample == 36
    assert score.images == {"BLUE": 12, "GREEN": 12, "RED": 11}
    assert result.scored_images == 35
    assert "35 scored" in (out / artifacts.CHOICE_REPORT).read_text()
