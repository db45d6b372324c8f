"""`visualize` on unique matching: one contact sheet per group (viz_class_<group>.png), each target
then the pool images it claimed; real images written here, the PNGs opened with PIL."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from test_unique_matching import _spec, _write

from deft_mine.backends.local import LocalBackend
from deft_mine.engine.unique_matching import unique_match
from deft_mine.tools.match import match_spec
from deft_mine.tools.registry import ToolContext
from deft_mine.report.match_pictures import SHEET_CLAIMS, SHEET_TARGETS
from deft_mine.report.pictures import CAPTION_LINES, GAP, LINE, PLACEHOLDER, SENTENCE_BACK, TILE
from deft_mine.task import main as task_main

CELL_W, CELL_H = TILE + GAP, TILE + 6 + CAPTION_LINES * LINE + GAP


def _images(folder, n, prefix):
    folder.mkdir(exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"{prefix}{i}.png"
        Image.new("RGB", (40 + i, 30), ((i * 37) % 256, 90, 200 - i % 100)).save(path)
        paths.append(str(path))
    return paths


def _size(rows, columns):
    """The sheet's size for `rows` targets and `columns` tiles in the widest row (pictures' layout)."""
    return max(GAP + columns * CELL_W, 360), 36 + max(rows, 1) * CELL_H + GAP


def _match(spec):
    """The tool's path (the pictures are drawn above the engine), and the engine's outcome to compare."""
    done = match_spec(spec, LocalBackend.shared(), ToolContext())
    outcome = unique_match(spec)
    outcome.warnings = done.warnings
    return outcome


def _pictures(tmp_path):
    return sorted(p.name for p in (tmp_path / "out").glob("viz_class_*.png"))


def test_class_stratified_draws_one_sheet_per_group_with_each_targets_claims(tmp_path):
    rng = np.random.default_rng(3)
    pool = _images(tmp_path / "pool", 12, "p")
    targets = _images(tmp_path / "targets", 3, "t")
    _write(tmp_path / "pool.parquet", pool, rng.normal(size=(12, 4)), ["dent"] * 4 + ["ok"] * 8)
    _write(tmp_path / "targets.parquet", targets, rng.normal(size=(3, 4)), ["dent", "ok", "ok"])
    outcome = _match(_spec(tmp_path, desired_unique_count=9, allocation_policy="class_stratified",
                           rare_class_list="dent", visualize="true"))
    assert _pictures(tmp_path) == ["viz_class_dent.png", "viz_class_non_rare.png"]
    got = outcome.selected.to_pydict()
    for group in ("dent", "non_rare"):
        claims = [t for t, c in zip(got["matched_target"], got["class"]) if c == group]
        widest = max(claims.count(t) for t in set(claims))
        with Image.open(tmp_path / "out" / f"viz_class_{group}.png") as sheet:
            assert sheet.format == "PNG"
            assert sheet.size == _size(len(set(claims)), 1 + min(widest, SHEET_CLAIMS))
    assert not outcome.warnings


def test_global_draws_one_sheet_and_a_missing_image_is_a_placeholder(tmp_path):
    pool = _images(tmp_path / "pool", 3, "p") + [str(tmp_path / "pool" / "gone.png")]
    _write(tmp_path / "pool.parquet", pool, [[1, 0], [0.9, 0.1], [0.8, 0.2], [1, 0.01]])
    _write(tmp_path / "targets.parquet", [str(tmp_path / "nowhere" / "t.png")], [[1, 0]])
    _match(_spec(tmp_path, desired_unique_count=4, visualize="yes"))
    assert _pictures(tmp_path) == ["viz_class_global.png"]
    with Image.open(tmp_path / "out" / "viz_class_global.png") as sheet:
        assert sheet.size == _size(1, 5)
        rgb = sheet.convert("RGB")
        # the target (missing) and the second nearest claim (gone.png) are placeholder tiles
        y = 36 + TILE // 4
        assert rgb.getpixel((GAP + TILE // 2 + 10, y)) == PLACEHOLDER
        assert rgb.getpixel((GAP + CELL_W + TILE // 2, y)) != PLACEHOLDER  # p0, drawn
        assert rgb.getpixel((GAP + 2 * CELL_W + TILE // 2 + 10, y)) == PLACEHOLDER


def test_a_large_group_is_capped_and_the_title_says_so(tmp_path):
    n_targets, per = SHEET_TARGETS + 3, SHEET_CLAIMS + 2
    pool = _images(tmp_path / "pool", n_targets * per, "p")
    rng = np.random.default_rng(1)
    _write(tmp_path / "pool.parquet", pool, rng.normal(size=(len(pool), 3)))
    _write(tmp_path / "targets.parquet", [f"t{i}.png" for i in range(n_targets)], rng.normal(size=(n_targets, 3)))
    _match(_spec(tmp_path, desired_unique_count=n_targets * per, visualize="true"))
    with Image.open(tmp_path / "out" / "viz_class_global.png") as sheet:
        assert sheet.size == _size(SHEET_TARGETS, 1 + SHEET_CLAIMS)


def test_a_text_target_is_drawn_as_its_sentence(tmp_path):
    pool = _images(tmp_path / "pool", 2, "p")
    _write(tmp_path / "pool.parquet", pool, [[1, 0], [0, 1]])
    sentence = "a scratch across the pad"
    pq.write_table(pa.table({"text": [sentence], "embedding": pa.array([[1.0, 0.0]], pa.list_(pa.float32()))}),
                   tmp_path / "targets.parquet")
    _match(_spec(tmp_path, desired_unique_count=2, target_filepath_column="text", visualize="true"))
    with Image.open(tmp_path / "out" / "viz_class_global.png") as sheet:
        assert sheet.convert("RGB").getpixel((GAP + TILE - 3, 36 + TILE - 3)) == SENTENCE_BACK


def test_the_task_draws_and_visualize_off_draws_nothing(tmp_path, capsys):
    pool = _images(tmp_path / "pool", 4, "p")
    _write(tmp_path / "pool.parquet", pool, np.eye(4))
    _write(tmp_path / "targets.parquet", pool[:1], np.eye(4)[:1])
    _match(_spec(tmp_path, desired_unique_count=2))
    assert _pictures(tmp_path) == []
    code = task_main(["tmm", "unique_neighbor_matching", f"source_path={tmp_path}/pool.parquet",
                      f"target_path={tmp_path}/targets.parquet", f"output_dir={tmp_path}/out",
                      "desired_unique_count=3", "visualize=true"])
    assert code == 0 and capsys.readouterr().out.strip().endswith("Execution status: PASS")
    assert _pictures(tmp_path) == ["viz_class_global.png"]


def test_an_image_outside_the_servers_roots_is_a_grey_tile_never_opened(tmp_path):
    """Attack: a pool parquet naming /etc/... images to read them through the sheet; the server's
    roots refuse the file, so the tile is grey (the run itself is the engine's)."""
    pool = _images(tmp_path / "pool", 2, "p")
    _write(tmp_path / "pool.parquet", pool, [[1, 0], [0.9, 0.1]])
    _write(tmp_path / "targets.parquet", [pool[0]], [[1, 0]])
    spec = _spec(tmp_path, desired_unique_count=2, visualize="true")
    asked = []
    match_spec(spec, LocalBackend.shared(), ToolContext(policy=_Refusing(asked)))
    assert sorted(asked) == sorted([pool[0], pool[0], pool[1]])  # the target and both claims, each asked first
    with Image.open(tmp_path / "out" / "viz_class_global.png") as sheet:
        assert sheet.convert("RGB").getpixel((GAP + TILE // 2, 36 + TILE // 4)) == PLACEHOLDER


class _Refusing:
    """A path policy that admits the spec's own paths and no image."""

    def __init__(self, asked: list[str]) -> None:
        self.asked = asked

    def check_model(self, model) -> None:
        return None

    def allows(self, path) -> bool:
        self.asked.append(str(path))
        return False
