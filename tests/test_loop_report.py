"""The DEFT loop's loose ends: what the report says of a ChangeNet input and of a history ledger
(its format, identity rule and budget), `run` refusing a ledger's options without a ledger, and
`embed` handing a parquet-only backend a parquet whatever the listing's format."""

from __future__ import annotations

import dataclasses

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_image

from deft_mine.backends.local import LocalBackend
from deft_mine.engine import tables
from deft_mine.errors import DeftError
from deft_mine.schemas.inputs import ChangeNetOptions
from deft_mine.schemas.specs import EmbeddingSpec, load_spec
from deft_mine.tools.embed import embed_spec
from deft_mine.tools.registry import ToolContext
from deft_mine.tools.report import report
from deft_mine.tools.run import run

LIGHTS = ("SolderLight", "UniformLight")
BOARD = "images/B1/PerComponent"


def changenet_pool(root: Path, n: int = 4) -> Path:
    """A ChangeNet CSV of `n` components with two lights each, every image and golden on disk."""
    lines = ["input_path,golden_path,label,object_name,boardname"]
    for i in range(n):
        for j, light in enumerate(LIGHTS):
            write_image(root / BOARD / f"C{i}_{light}.jpg", seed=10 * i + j, size=(8, 6))
            write_image(root / "golden" / BOARD / f"C{i}_{light}.jpg", seed=500 + 10 * i + j, size=(8, 6))
        lines.append(f"{BOARD},golden/{BOARD},{'PASS' if i % 2 else 'short'},C{i},B1")
    (root / "pool.csv").write_text("\n".join(lines) + "\n")
    return root / "pool.csv"


def targets(root: Path) -> Path:
    pq.write_table(pa.table({"filepath": [f"{BOARD}/C0_SolderLight.jpg", f"{BOARD}/C1_UniformLight.jpg"]}),
                   root / "targets.parquet")
    return root / "targets.parquet"


RUN = {"overrides": {"model": "thumbnail", "topn": 2}, "lights": list(LIGHTS), "no_store": True}


# ----------------------------------------------------------------------------- the report's Inputs

def test_the_report_says_a_changenet_pool_was_resolved_to_images_over_its_lights(tmp_path):
    pool = changenet_pool(tmp_path, n=4)
    run(targets(tmp_path), pool, run_dir=tmp_path / "r", images_dir=str(tmp_path), **RUN)
    text = (tmp_path / "r" / "Mining_Report.md").read_text()
    assert "| Targets | `" in text and "| no |" in text  # the parquet side: not converted
    assert "| yes, ChangeNet CSV |" in text
    assert ("Pool is a ChangeNet CSV, resolved to 8 images over its 2 lights (`SolderLight`, `UniformLight`) "
            "from 4 CSV rows, listed in `source_listing.parquet` as every step read them.") in text
    # without its listing the report still says what the input was, and what it cannot say
    (tmp_path / "r" / "source_listing.parquet").unlink()
    report(tmp_path / "r")
    text = (tmp_path / "r" / "Mining_Report.md").read_text()
    assert "Pool is a ChangeNet CSV, resolved to 8 images (its lights are not recorded" in text


def test_a_changenet_pools_mined_paths_are_checked_under_its_images_dir(tmp_path):
    """The CSV lies away from the images (as the loop keeps it, under augmentation/): the report
    checks the mined paths where they resolve, under images_dir, not beside the CSV."""
    (tmp_path / "augmentation").mkdir()
    pool = changenet_pool(tmp_path, n=4).rename(tmp_path / "augmentation" / "pool.csv")
    result = run(targets(tmp_path), pool, run_dir=tmp_path / "r", images_dir=str(tmp_path), **RUN)
    text = (tmp_path / "r" / "Mining_Report.md").read_text()
    assert f"On disk: {result.mined} of {result.mined} mined paths exist (relative paths resolved against " \
           f"`{tmp_path}`)" in text
    assert f"pool images from `{tmp_path}`." in text


def test_a_plain_csv_pool_still_reads_converted_yes(image_set):
    table = pq.read_table(image_set / "pool.parquet")
    (image_set / "pool.csv").write_text("filepath,label\n" + "".join(
        f"{p},{lab}\n" for p, lab in zip(table.column("filepath").to_pylist(), table.column("label").to_pylist())))
    run(image_set / "targets.parquet", image_set / "pool.csv", run_dir=image_set / "r",
        overrides={"model": "thumbnail", "topn": 2}, no_store=True)
    text = (image_set / "r" / "Mining_Report.md").read_text()
    assert "| yes |" in text and "ChangeNet" not in text


# ----------------------------------------------------------------------------- the report's History

def history_run(image_set: Path, name: str, **kw) -> str:
    run(image_set / "targets.parquet", image_set / "pool.parquet", run_dir=image_set / name,
        history=str(image_set / f"{name}-ledger.json"), overrides={"model": "thumbnail", "topn": 2},
        no_store=True, **kw)
    return (image_set / name / "Mining_Report.md").read_text()


def test_history_names_a_skill_ledgers_format_identity_and_budget(image_set):
    text = history_run(image_set, "skill", ledger_format="tao-skill", max_cumulative_fraction=0.5)
    summary = json.loads((image_set / "skill" / "mining_history_summary.json").read_text())
    assert summary["budget_cap"] == 2 and summary["budget_excluded_count"] >= 1  # 4 pool rows × 0.5
    excluded = summary["budget_excluded_count"]
    section = text.split("## History", 1)[1].split("\n## ", 1)[0]
    assert "(the DEFT loop's `mining_history.json`, format `tao-skill`)" in section
    assert ("Budget: `max_cumulative_fraction` = 0.5 of 4 pool rows caps all iterations together at 2 images; "
            f"{excluded} new candidate{'s were' if excluded != 1 else ' was'} left out by it "
            "(`budget_excluded_count`, warning `budget_exhausted`).") in section
    assert "`mining_history_summary.json` records the iteration's counts" in section
    assert "absolute, normalised" not in section
    assert "as written: stripped, backslashes made slashes, POSIX-normalised" in section


def test_history_of_our_ledger_without_a_budget_reads_as_before(image_set):
    section = history_run(image_set, "ours").split("## History", 1)[1].split("\n## ", 1)[0]
    assert "Budget" not in section and "tao-skill" not in section
    assert "the selected paths (absolute, normalised)" in section


def test_a_budget_that_left_nothing_out_is_still_stated(image_set):
    section = history_run(image_set, "roomy", max_cumulative_fraction=1.0).split("## History", 1)[1]
    assert "caps all iterations together at 4 images; 0 new candidates were left out by it " \
           "(`budget_excluded_count`)." in section


# ----------------------------------------------------------------------------- run's door

@pytest.mark.parametrize("option", [{"max_cumulative_fraction": 0.5}, {"ledger_format": "tao-skill"}])
def test_a_ledgers_option_without_history_is_refused_before_any_work(image_set, option):
    with pytest.raises(DeftError) as exc:
        run(image_set / "targets.parquet", image_set / "pool.parquet", run_dir=image_set / "r",
            overrides={"model": "thumbnail"}, **option)
    field = next(iter(option))
    assert exc.value.code == "spec_invalid" and exc.value.details["field"] == field
    assert field in exc.value.message and "--history" in (exc.value.fix or "")
    assert not (image_set / "r").exists()


# ----------------------------------------------------------------------------- small things

def test_sniff_delimiter_is_public(tmp_path):
    (tmp_path / "a.csv").write_text("filepath;label\nx;y\n")
    assert tables.sniff_delimiter(str(tmp_path / "a.csv")) == ";"


class ParquetOnly(LocalBackend):
    """The docker backend's side of the contract, without Docker: the program it starts reads the
    listing's file, and reads parquet only (so a CSV given as is would fail there)."""

    capabilities = dataclasses.replace(LocalBackend.capabilities, reads_parquet_only=True)

    def __init__(self) -> None:
        super().__init__()
        self.read: list[Path] = []

    def embed(self, spec, listing, output_path, events, store):
        pq.read_table(listing.path)  # what the container does first: a CSV raises here
        assert listing.path.parent == output_path.parent and listing.path.name.startswith(".")
        self.read.append(listing.path)
        return super().embed(spec, listing, output_path, events, store)


@pytest.mark.parametrize("kind", ["changenet", "csv"])
def test_embed_hands_a_parquet_only_backend_a_hidden_parquet_and_removes_it(tmp_path, kind):
    pool = changenet_pool(tmp_path, n=3)
    if kind == "csv":
        pool = tmp_path / "plain.csv"
        pool.write_text("filepath\n" + "".join(f"{BOARD}/C{i}_SolderLight.jpg\n" for i in range(3)))
    out = tmp_path / "out" / "emb.parquet"
    spec = load_spec(EmbeddingSpec, None, {"model": "thumbnail", "input_parquet": str(pool),
                                           "output_parquet": str(out), "image_root": str(tmp_path)})
    backend = ParquetOnly()
    done = embed_spec(spec, backend, None, ToolContext(), changenet=ChangeNetOptions(lights=list(LIGHTS)))
    assert len(backend.read) == 1 and not backend.read[0].exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["emb.parquet"]
    local = tmp_path / "local.parquet"
    embed_spec(spec.model_copy(update={"output_parquet": str(local)}), LocalBackend(), None, ToolContext(),
               changenet=ChangeNetOptions(lights=list(LIGHTS)))
    assert done.rows == (6 if kind == "changenet" else 3)
    assert pq.read_table(out).equals(pq.read_table(local))  # the same rows and columns as read from the CSV
