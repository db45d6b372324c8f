"""The DEFT loop's ledger (tao-skill-bank's filter_mined_history.py and its mining_history.json):
select and run --history read, verify and continue it, write it, and the loop's own script
continues what we wrote. The script itself (fetched from the mirror) is the independent check:
imported as a module here, run as a process in the e2e test. Plus the per-iteration
mining_history_summary.json, the selection budget and the after-selection warnings."""

from __future__ import annotations

import importlib.util
import json
import posixpath
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deft_mine import rules
from deft_mine.engine.ledger import skill_identity
from deft_mine.errors import DeftError
from deft_mine.tools.run import run
from deft_mine.tools.select import select

MIRROR = Path("/work/.mirror/NVIDIA-TAO+tao-skill-bank/repo")
SCRIPT = "skills/data/tao-mine-aoi-images/scripts/filter_mined_history.py"
CANDIDATES, MINED, SUMMARY = "mined_candidates.parquet", "mined.parquet", "mining_history_summary.json"
SKILL_KEYS = ["version", "iteration", "identity", "topn", "candidate_parquet", "candidate_sha256",
              "candidate_row_count", "candidate_unique_count", "candidate_duplicate_count", "history_count_before",
              "already_mined_count", "historical_candidate_rate", "selected_count", "cumulative_unique_count",
              "output_parquet", "output_sha256", "recommendation"]


# ---------------------------------------------------------------- the loop's script, and helpers

@pytest.fixture
def skill_script(tmp_path: Path) -> Path:
    try:
        text = subprocess.run(["git", "-C", str(MIRROR), "show", f"HEAD:{SCRIPT}"], check=True,
                              capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("the tao-skill-bank mirror is not on this machine")
    path = tmp_path / "filter_mined_history.py"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def skill(skill_script: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("filter_mined_history", skill_script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def candidates(folder: Path, filepaths: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CANDIDATES
    pq.write_table(pa.table({"filepath": filepaths, "score": [float(i) for i in range(len(filepaths))]}), path)
    return path


def by_skill(skill: ModuleType, folder: Path, ledger: Path, iteration: int, topn: int,
             resume: bool = False) -> dict[str, Any]:
    return skill.select_novel_samples(candidate_parquet=folder / CANDIDATES, output_parquet=folder / MINED,
                                      history_file=ledger, summary_file=folder / SUMMARY, iteration=iteration,
                                      topn=topn, resume=resume)


def by_us(folder: Path, ledger: Path, iteration: int, topn: int | None, **kw: Any):
    return select(folder / CANDIDATES, ledger, iteration, folder / MINED, topn=topn, **kw)


def mined(folder: Path) -> list[str]:
    return pq.read_table(folder / MINED).column("filepath").to_pylist()


def reference(rounds: list[list[str]]) -> list[list[str]]:
    """Brute force: per round, the first spelling of each normalised path no earlier round took."""
    taken: set[str] = set()
    out = []
    for paths in rounds:
        chosen = []
        for p in paths:
            key = posixpath.normpath(p.strip().replace("\\", "/"))
            if key not in taken:
                taken.add(key)
                chosen.append(p)
        out.append(chosen)
    return out


ROUNDS = [["a.png", "b.png", "./a.png", "c/d.png"],
          ["b.png", "e.png", "c//d.png", "f.png", "e.png"],
          ["f.png", "g.png", "a.png", "h.png"],
          ["i.png", "g.png"]]


# ---------------------------------------------------------------- continuing each other's ledger

@pytest.mark.e2e  # the skill's own script is read with `git show` (a process)
def test_skill_and_deft_mine_take_turns_on_one_ledger(tmp_path: Path, skill: ModuleType) -> None:
    ledger = tmp_path / "results" / "mining_history.json"
    folders = [tmp_path / f"iter{n}" for n in range(1, 5)]
    for folder, paths in zip(folders, ROUNDS):
        candidates(folder, paths)
    by_skill(skill, folders[0], ledger, 1, topn=4)
    ours = by_us(folders[1], ledger, 2, topn=5)  # no ledger_format: the file's own
    assert ours.ledger_format == "tao-skill" and not ours.resumed
    skill._validated_history(ledger, 3)  # the loop's own validation accepts what we appended
    by_skill(skill, folders[2], ledger, 3, topn=4)
    by_us(folders[3], ledger, 4, topn=6)
    state = skill._validated_history(ledger, 5)
    assert [mined(f) for f in folders] == reference(ROUNDS)
    assert [e["selected_filepaths"] for e in state["iterations"]] == [
        [posixpath.normpath(p) for p in r] for r in reference(ROUNDS)]
    assert [e["topn"] for e in state["iterations"]] == [4, 5, 4, 6]
    assert state["cumulative_unique_count"] == sum(map(len, reference(ROUNDS)))
    # our entries carry exactly the loop's keys
    assert [list(e) for e in state["iterations"][1::2]] == [list(state["iterations"][0])] * 2

    # each side resumes the other's committed iteration (the loop's rule: same files, same topn)
    assert by_skill(skill, folders[1], ledger, 2, topn=5, resume=True) == json.loads(
        (folders[1] / SUMMARY).read_text())
    before = ledger.read_bytes()
    again = by_us(folders[2], ledger, 3, topn=4)
    assert again.resumed and again.newly_selected == len(reference(ROUNDS)[2])
    assert (again.iteration, again.cumulative_selected) == (3, sum(map(len, reference(ROUNDS)[:3])))
    assert ledger.read_bytes() == before


@pytest.mark.e2e  # the skill's own script is read with `git show` (a process)
def test_a_new_tao_skill_ledger_is_what_the_skill_writes(tmp_path: Path, skill: ModuleType) -> None:
    """The same rounds through the loop's script (under A/) and through us (under B/): the same
    ledger and summaries, paths and hashes aside; then the script continues ours."""
    for side in "AB":
        for n, paths in enumerate(ROUNDS[:3], start=1):
            candidates(tmp_path / side / f"iter{n}", paths)
    for n in range(1, 4):
        by_skill(skill, tmp_path / "A" / f"iter{n}", tmp_path / "A" / "h.json", n, topn=3)
        by_us(tmp_path / "B" / f"iter{n}", tmp_path / "B" / "h.json", n, topn=3,
              ledger_format="tao-skill" if n == 1 else None)

    def masked(text: str, side: str) -> Any:
        data = json.loads(text.replace(str(tmp_path / side), "ROOT"))
        for entry in data.get("iterations", [data]):
            for key in [k for k in entry if k.endswith("sha256")]:
                entry[key] = "HASH"
        return data

    assert masked((tmp_path / "B" / "h.json").read_text(), "B") == masked((tmp_path / "A" / "h.json").read_text(), "A")
    for n in range(1, 4):
        theirs = masked((tmp_path / "A" / f"iter{n}" / SUMMARY).read_text(), "A")
        ours = masked((tmp_path / "B" / f"iter{n}" / SUMMARY).read_text(), "B")
        assert list(ours)[:len(SKILL_KEYS)] == SKILL_KEYS == list(theirs)
        assert {k: ours[k] for k in SKILL_KEYS if k != "recommendation"} == {
            k: v for k, v in theirs.items() if k != "recommendation"}
        assert (ours["recommendation"] is None) == (theirs["recommendation"] is None)
        assert ours["budget_excluded_count"] == 0
        assert mined(tmp_path / "B" / f"iter{n}") == mined(tmp_path / "A" / f"iter{n}")
    candidates(tmp_path / "B" / "iter4", ROUNDS[3])
    by_skill(skill, tmp_path / "B" / "iter4", tmp_path / "B" / "h.json", 4, topn=3)
    assert mined(tmp_path / "B" / "iter4") == reference(ROUNDS)[3]


@pytest.mark.e2e  # the skill's own script is read with `git show` (a process)
def test_identity_is_the_skills_rule(skill: ModuleType, tmp_path: Path) -> None:
    spellings = ["a/b.png", " a/./b.png ", "a\\b.png", "a//b.png/", "x/../a/b.png", "/abs/a.png", "//two.png",
                 "./c.png", "../up.png", "A/B.PNG"]
    assert [skill_identity(s) for s in spellings] == [skill._normalize_filepath(s) for s in spellings]
    for nothing in ["", "  ", ".", "./"]:
        assert skill_identity(nothing) is None
        with pytest.raises(ValueError):
            skill._normalize_filepath(nothing)
    # relative paths stay relative: "c.png" and its absolute spelling are two images there
    candidates(tmp_path / "it1", ["c.png", str(tmp_path / "it1" / "c.png"), " ./c.png"])
    result = by_us(tmp_path / "it1", tmp_path / "h.json", 1, topn=1, ledger_format="tao-skill")
    assert (result.newly_selected, result.duplicates_in_candidates) == (2, 1)
    assert json.loads((tmp_path / "h.json").read_text())["iterations"][0]["selected_filepaths"] == [
        "c.png", str(tmp_path / "it1" / "c.png")]


# ---------------------------------------------------------------- damaged ledgers

def _edit(change: Callable[[dict], None]) -> Callable[[Path, dict], None]:
    def apply(ledger: Path, _: dict) -> None:
        data = json.loads(ledger.read_text())
        change(data)
        ledger.write_text(json.dumps(data))
    return apply


def _file(action: str, iteration: int, key: str) -> Callable[[Path, dict], None]:
    def apply(ledger: Path, _: dict) -> None:
        path = Path(json.loads(ledger.read_text())["iterations"][iteration - 1][key])
        path.unlink() if action == "remove" else path.write_bytes(path.read_bytes() + b" ")
    return apply


def _set(iteration: int, key: str, value: Any) -> Callable[[dict], None]:
    return lambda d: d["iterations"][iteration - 1].__setitem__(key, value)


DAMAGE = {
    "gap": (_edit(_set(2, "iteration", 3)), "ledger_corrupt", None, "iteration"),
    "repeat": (_edit(lambda d: d["iterations"][1]["selected_filepaths"].append(
        d["iterations"][1]["selected_filepaths"][0])), "ledger_corrupt", 2, "selected_filepaths"),
    "reselected": (_edit(lambda d: d["iterations"][1]["selected_filepaths"].__setitem__(0, "a.png")),
                   "ledger_corrupt", 2, "selected_filepaths"),
    "count": (_edit(_set(1, "selected_count", 99)), "ledger_corrupt", 1, "selected_count"),
    "cumulative": (_edit(lambda d: d.__setitem__("cumulative_unique_count", 99)), "ledger_corrupt", None,
                   "cumulative_unique_count"),
    "relative": (_edit(_set(1, "output_parquet", "mined.parquet")), "ledger_corrupt", 1, "output_parquet"),
    "no hash": (_edit(lambda d: d["iterations"][1].pop("summary_sha256")), "ledger_corrupt", 2, "summary_sha256"),
    "version": (_edit(lambda d: d.__setitem__("version", 2)), "ledger_corrupt", None, "version"),
    "output edited": (_file("edit", 1, "output_parquet"), "ledger_hash_mismatch", 1, "output_parquet"),
    "summary gone": (_file("remove", 2, "summary_file"), "ledger_hash_mismatch", 2, "summary_file"),
    "candidates edited": (_file("edit", 2, "candidate_parquet"), "ledger_hash_mismatch", 2, "candidate_parquet"),
}


@pytest.mark.e2e  # the skill's own script is read with `git show` (a process)
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_skill_ledger_is_refused_naming_iteration_and_field(tmp_path: Path, skill: ModuleType,
                                                                     damage: str) -> None:
    change, code, iteration, field = DAMAGE[damage]
    ledger = tmp_path / "mining_history.json"
    for n, paths in enumerate(ROUNDS[:3], start=1):
        candidates(tmp_path / f"iter{n}", paths)
    by_skill(skill, tmp_path / "iter1", ledger, 1, topn=2)
    by_skill(skill, tmp_path / "iter2", ledger, 2, topn=2)
    change(ledger, {})
    with pytest.raises((ValueError, OSError)):  # the loop refuses it too
        skill._validated_history(ledger, 3)
    before = ledger.read_bytes()
    with pytest.raises(DeftError) as info:
        by_us(tmp_path / "iter3", ledger, 3, topn=2)
    error = info.value
    assert (error.code, error.details.get("field"), error.details.get("iteration")) == (code, field, iteration), error
    assert field in error.message and (iteration is None or f"iteration {iteration}" in error.message)
    assert ledger.read_bytes() == before
    assert not (tmp_path / "iter3" / MINED).exists() and not (tmp_path / "iter3" / SUMMARY).exists()


@pytest.mark.e2e  # the skill's own script is read with `git show` (a process)
def test_the_other_format_is_refused_naming_the_files(tmp_path: Path, skill: ModuleType) -> None:
    candidates(tmp_path / "it1", ["a.png"])
    candidates(tmp_path / "it2", ["b.png"])
    by_skill(skill, tmp_path / "it1", tmp_path / "skill.json", 1, topn=1)
    with pytest.raises(DeftError) as info:
        by_us(tmp_path / "it2", tmp_path / "skill.json", 2, topn=1, ledger_format="deft-mine")
    assert info.value.code == "ledger_format_conflict" and "tao-skill" in info.value.message
    by_us(tmp_path / "it1", tmp_path / "ours.json", 1, topn=1, output=tmp_path / "it1" / "ours.parquet")
    with pytest.raises(DeftError) as info:
        select(tmp_path / "it2" / CANDIDATES, tmp_path / "ours.json", 2, tmp_path / "it2" / "o.parquet", topn=1,
               ledger_format="tao-skill")
    assert info.value.code == "ledger_format_conflict" and "deft-mine" in info.value.message
    assert info.value.details["field"] == "ledger_format"


@pytest.mark.e2e  # the skill's own script is read with `git show` (a process)
def test_the_skills_resume_rule(tmp_path: Path, skill: ModuleType) -> None:
    ledger = tmp_path / "h.json"
    for n, paths in enumerate(ROUNDS[:2], start=1):
        candidates(tmp_path / f"it{n}", paths)
        by_skill(skill, tmp_path / f"it{n}", ledger, n, topn=3)
    first = by_us(tmp_path / "it1", ledger, 1, topn=3)  # any committed iteration, not only the last
    assert first.resumed and (first.newly_selected, first.cumulative_selected) == (3, 3)
    cases = [({"topn": 4}, "ledger_iteration_invalid", "topn"),
             ({"output": tmp_path / "it2" / "other.parquet"}, "ledger_hash_mismatch", "output_parquet")]
    for change, code, field in cases:
        args = {"topn": 3, "output": tmp_path / "it2" / MINED} | change
        with pytest.raises(DeftError) as info:
            select(tmp_path / "it2" / CANDIDATES, ledger, 2, args.pop("output"), **args)
        assert (info.value.code, info.value.details["field"]) == (code, field)
    with pytest.raises(DeftError) as info:  # the skill's ledger needs topn for its resume rule
        select(tmp_path / "it2" / CANDIDATES, ledger, 2, tmp_path / "it2" / MINED)
    assert (info.value.code, info.value.details["field"]) == ("invalid_arguments", "topn")
    with pytest.raises(DeftError) as info:
        by_us(tmp_path / "it2", ledger, 4, topn=3)
    assert info.value.code == "ledger_iteration_invalid"


# ---------------------------------------------------------------- the summary, our format

@pytest.mark.e2e  # the skill's own script is read with `git show` (a process)
def test_our_ledger_writes_the_loops_summary_too(tmp_path: Path, skill: ModuleType) -> None:
    rounds = ROUNDS[:2]
    for n, paths in enumerate(rounds, start=1):
        for side in ("ours", "theirs"):
            candidates(tmp_path / side / f"it{n}", paths)
    for n in (1, 2):
        result = by_us(tmp_path / "ours" / f"it{n}", tmp_path / "ours" / "L.json", n, topn=2,
                       image_root=tmp_path)  # our identity: absolute, so one root for both rounds
        assert result.ledger_format == "deft-mine"
        assert result.history_summary == str(tmp_path / "ours" / f"it{n}" / SUMMARY)
        by_skill(skill, tmp_path / "theirs" / f"it{n}", tmp_path / "theirs" / "h.json", n, topn=2)
        ours = json.loads((tmp_path / "ours" / f"it{n}" / SUMMARY).read_text())
        theirs = json.loads((tmp_path / "theirs" / f"it{n}" / SUMMARY).read_text())
        counts = [k for k in SKILL_KEYS if not k.endswith(("parquet", "sha256")) and k != "recommendation"]
        assert {k: ours[k] for k in counts} == {k: theirs[k] for k in counts}
        assert ours["output_parquet"] == str((tmp_path / "ours" / f"it{n}" / MINED).resolve())
    assert json.loads((tmp_path / "ours" / "L.json").read_text())["format"] == "deft-mine-ledger"


# ---------------------------------------------------------------- budget

@pytest.mark.parametrize("fmt", ["deft-mine", "tao-skill"])
def test_max_cumulative_fraction_caps_all_iterations(tmp_path: Path, fmt: str) -> None:
    ledger = tmp_path / "L.json"
    rounds = [["a", "b", "c", "a"], ["a", "d", "e", "f"], ["g"]]
    results = []
    for n, paths in enumerate(rounds, start=1):
        candidates(tmp_path / f"it{n}", paths)
        results.append(by_us(tmp_path / f"it{n}", ledger, n, topn=2, max_cumulative_fraction=0.5, pool_size=10,
                             ledger_format=fmt if n == 1 else None, image_root=tmp_path))
    # cap = floor(0.5 × 10) = 5: 3, then 2 of d, e, f (in candidate order), then nothing
    assert [mined(tmp_path / f"it{n}") for n in (1, 2, 3)] == [["a", "b", "c"], ["d", "e"], []]
    assert [r.budget_excluded_count for r in results] == [0, 1, 1]
    assert [[w.code for w in r.warnings] for r in results] == [
        [], ["budget_exhausted"], ["selection_empty", "budget_exhausted"]]  # 1 is not below half of 2
    warning = results[1].warnings[0]
    assert {"budget_excluded_count": 1, "budget_cap": 5, "pool_size": 10,
            "cumulative_unique_count": 5}.items() <= warning.details.items()
    summary = json.loads((tmp_path / "it2" / SUMMARY).read_text())
    assert (summary["budget_excluded_count"], summary["budget_cap"], summary["selected_count"],
            summary["cumulative_unique_count"]) == (1, 5, 2, 5)
    # a resume re-states the budget the iteration ran under
    again = by_us(tmp_path / "it2", ledger, 2, topn=2, image_root=tmp_path) if fmt == "tao-skill" else None
    assert again is None or (again.resumed and again.budget_excluded_count == 1
                             and [w.code for w in again.warnings] == [w.code for w in results[1].warnings])


def test_the_cap_is_exact_decimal(tmp_path: Path) -> None:
    candidates(tmp_path, [f"{i}.png" for i in range(40)])
    result = select(tmp_path / CANDIDATES, tmp_path / "L.json", 1, tmp_path / "o.parquet",
                    max_cumulative_fraction=0.29, pool_size=100)
    assert result.newly_selected == 29  # not floor(28.999…)


@pytest.mark.parametrize("fraction, pool, field", [(0, 10, "max_cumulative_fraction"),
                                                   (1.5, 10, "max_cumulative_fraction"),
                                                   (-0.1, 10, "max_cumulative_fraction"),
                                                   (float("nan"), 10, "max_cumulative_fraction"),
                                                   (0.5, None, "pool_size")])
def test_a_bad_budget_is_refused(tmp_path: Path, fraction: float, pool: int | None, field: str) -> None:
    candidates(tmp_path, ["a.png"])
    with pytest.raises(DeftError) as info:
        select(tmp_path / CANDIDATES, tmp_path / "L.json", 1, tmp_path / "o.parquet",
               max_cumulative_fraction=fraction, pool_size=pool)
    assert (info.value.code, info.value.details["field"]) == ("budget_invalid", field)
    assert "max_cumulative_fraction" in info.value.message
    assert sorted(p.name for p in tmp_path.iterdir()) == [CANDIDATES]


# ---------------------------------------------------------------- after-selection warnings

def test_candidates_mostly_mined_and_yield_collapsed(tmp_path: Path) -> None:
    ledger = tmp_path / "L.json"
    rounds = [[f"{i}.png" for i in range(30)], ["0.png", "1.png", "2.png", "30.png", "31.png"]]
    results = []
    for n, paths in enumerate(rounds, start=1):
        candidates(tmp_path / f"it{n}", paths)
        results.append(by_us(tmp_path / f"it{n}", ledger, n, topn=7, image_root=tmp_path))
    assert results[0].warnings == []
    codes = {w.code: w for w in results[1].warnings}
    assert list(codes) == ["candidates_mostly_mined", "yield_collapsed"]
    mostly = codes["candidates_mostly_mined"]
    assert mostly.details == {"iteration": 2, "candidate_unique_count": 5, "already_mined_count": 3,
                              "historical_candidate_rate": 0.6, "topn": 7}
    assert "topn" in mostly.message and "pool" in mostly.message
    collapsed = codes["yield_collapsed"]  # the loop's 30 → 5: an 83% drop
    assert {"previous_selected_count": 30, "candidate_unique_count": 5,
            "drop_percent": 83}.items() <= collapsed.details.items()
    assert "83%" in collapsed.message and "30" in collapsed.message and "5" in collapsed.message
    summary = json.loads((tmp_path / "it2" / SUMMARY).read_text())
    assert summary["historical_candidate_rate"] == 0.6 and summary["recommendation"]
    for code in ("candidates_mostly_mined", "yield_collapsed", "budget_exhausted"):
        assert rules.CONTROL_ACTIONS[code]


def test_no_collapse_at_half(tmp_path: Path) -> None:
    ledger = tmp_path / "L.json"
    for n, paths in enumerate([[f"{i}" for i in range(10)], [f"x{i}" for i in range(5)]], start=1):
        candidates(tmp_path / f"it{n}", paths)
        result = by_us(tmp_path / f"it{n}", ledger, n, topn=1)
    assert result.warnings == []  # 5 is not below half of 10


# ---------------------------------------------------------------- run --history

@pytest.mark.e2e  # the skill's own script is read with `git show` (a process)
def test_run_continues_a_skill_ledger_and_the_skill_continues_the_run(image_set: Path, skill: ModuleType) -> None:
    ledger = image_set / "results" / "mining_history.json"
    # iteration 1 by the loop: twenty images of another pool, so this run's yield looks collapsed
    candidates(image_set / "iter1", [f"old/{i}.png" for i in range(20)])
    by_skill(skill, image_set / "iter1", ledger, 1, topn=5)
    result = run(image_set / "targets.parquet", image_set / "pool.parquet", run_dir=image_set / "r2",
                 overrides={"model": "thumbnail", "topn": 2}, history=ledger)
    folder = image_set / "r2"
    assert (result.select.iteration, result.select.ledger_format) == (2, "tao-skill")
    state = skill._validated_history(ledger, 3)
    assert state["iterations"][1]["summary_file"] == str((folder / SUMMARY).resolve())
    assert state["iterations"][1]["selected_filepaths"] == mined(folder)
    manifest = json.loads((folder / "run.json").read_text())
    assert manifest["history"]["ledger_format"] == "tao-skill"
    assert manifest["history"]["budget_excluded_count"] == 0
    assert [it["newly_selected"] for it in manifest["history"]["iterations"]] == [20, len(mined(folder))]
    assert "yield_collapsed" in [w["code"] for w in manifest["warnings"]]
    report = (folder / "Mining_Report.md").read_text()
    assert rules.CONTROL_ACTIONS["yield_collapsed"] in report.replace("\n", " ")
    # the loop resumes the run's iteration from the run folder's files
    assert by_skill(skill, folder, ledger, 2, topn=2, resume=True)["selected_count"] == len(mined(folder))


@pytest.mark.e2e  # the skill's own script is read with `git show` (a process)
def test_run_refuses_a_damaged_ledger_or_budget_before_any_work(image_set: Path, skill: ModuleType) -> None:
    ledger = image_set / "mining_history.json"
    candidates(image_set / "iter1", ["x.png"])
    by_skill(skill, image_set / "iter1", ledger, 1, topn=1)
    (image_set / "iter1" / MINED).write_bytes(b"edited")
    common = dict(run_dir=image_set / "r", overrides={"model": "thumbnail", "topn": 1})
    with pytest.raises(DeftError) as info:
        run(image_set / "targets.parquet", image_set / "pool.parquet", history=ledger, **common)
    assert (info.value.code, info.value.details["iteration"]) == ("ledger_hash_mismatch", 1)
    with pytest.raises(DeftError) as info:
        run(image_set / "targets.parquet", image_set / "pool.parquet", history=image_set / "new.json",
            max_cumulative_fraction=0.0, **common)
    assert (info.value.code, info.value.details["field"]) == ("budget_invalid", "max_cumulative_fraction")
    assert not (image_set / "r").exists()


# ---------------------------------------------------------------- the loop's script as a process

@pytest.mark.e2e
def test_the_skills_script_continues_our_ledger(tmp_path: Path, skill_script: Path) -> None:
    ledger = tmp_path / "mining_history.json"

    def script(n: int, *extra: str) -> subprocess.CompletedProcess:
        folder = tmp_path / f"iter{n}"
        return subprocess.run([sys.executable, str(skill_script), "--candidate-parquet", str(folder / CANDIDATES),
                               "--output-parquet", str(folder / MINED), "--history-file", str(ledger),
                               "--summary", str(folder / SUMMARY), "--iteration", str(n), "--topn", "3", *extra],
                              capture_output=True, text=True)

    for n, paths in enumerate(ROUNDS, start=1):
        candidates(tmp_path / f"iter{n}", paths)
    by_us(tmp_path / "iter1", ledger, 1, topn=3, ledger_format="tao-skill")
    assert script(1, "--resume").returncode == 0  # the script verifies and reuses our iteration
    done = script(2)
    assert done.returncode == 0, done.stderr
    assert f"selected={len(reference(ROUNDS)[1])}" in done.stdout
    assert by_us(tmp_path / "iter3", ledger, 3, topn=3).newly_selected == len(reference(ROUNDS)[2])
    assert script(4).returncode == 0
    assert [mined(tmp_path / f"iter{n}") for n in range(1, 5)] == reference(ROUNDS)
    # and a ledger we refuse, it refuses too
    (tmp_path / "iter3" / SUMMARY).write_text("{}")
    assert script(5).returncode == 2
