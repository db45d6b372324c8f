"""Unique matching's pictures (`visualize`): per group, each target and the pool images it claimed, with distances."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from deft_mine.engine import tables
from deft_mine.engine.images import resolve_image_path
from deft_mine.engine.unique_matching import GLOBAL, parquet_files
from deft_mine.report.pictures import KEPT, MINED, TARGET_FRAME, Tile, contact_sheet
from deft_mine.schemas import artifacts
from deft_mine.schemas.specs import UniqueMatchingSpec
from deft_mine.schemas.warnings import ToolWarning, picture_failed

SHEET_TARGETS = 12  # targets drawn per group at most (the title says how many there were)
SHEET_CLAIMS = 8  # claimed images drawn per target at most (its caption says how many it claimed)


@dataclass
class _Claim:
    filepath: str
    distance: float
    fallback: bool  # taken from the non_rare pool for a rare class


OURS = ("matched_target", "distance", "class", "subset")  # final_unique_files' columns the sheets read


def draw_match_pictures(spec: UniqueMatchingSpec, out: Path, image_allowed: Callable[[Path], bool] | None = None
                        ) -> tuple[list[str], list[ToolWarning]]:
    """One contact sheet per group into `out` (viz_class_<group>.png), from the final_unique_files
    written there (one without our columns came from an image that drew its own): the names
    drawn, and a warning for each that could not be (a picture is never worth losing the
    matching). Images `image_allowed` refuses are grey tiles, never opened."""
    final = out / artifacts.UNIQUE_FINAL
    if not set(OURS) <= set(tables.schema_of(final).names):
        return [], []
    target_paths = _target_paths(spec)
    sentences = _target_sentences(spec, target_paths)
    roots = (parquet_files(spec.target_path, "target_path")[0].parent,
             parquet_files(spec.source_path, "source_path")[0].parent)
    drawn, failed = [], []
    for group, by_target in _claims(spec, final, target_paths).items():
        name = artifacts.unique_class_picture(group)
        try:
            rows = _rows(by_target, target_paths, sentences, roots)
            for tile in (t for row in rows for t in row if not t.sentence and image_allowed is not None):
                tile.allowed = image_allowed(resolve_image_path(tile.filepath, tile.root))
            contact_sheet(rows, out / name, _title(group, by_target, spec.distance_metric.value))
            drawn.append(name)
        except Exception as exc:  # noqa: BLE001 - the matching's files are written; say what was not drawn
            failed.append(picture_failed(name, exc))
    return drawn, failed


def _target_paths(spec: UniqueMatchingSpec) -> list[str]:
    column = spec.target_filepath_column
    return [str(p) for f in parquet_files(spec.target_path, "target_path")
            for p in tables.read_columns(f, [column]).column(column).to_pylist()]


def _claims(spec: UniqueMatchingSpec, final: Path, target_paths: list[str]) -> dict[str, dict[int, list[_Claim]]]:
    """group -> target row -> its claimed files, nearest first; groups by name, targets in row order."""
    first: dict[str, int] = {}
    for row, path in enumerate(target_paths):
        first.setdefault(path, row)
    table = tables.read_columns(final, [spec.source_filepath_column, *OURS])
    groups: dict[str, dict[int, list[_Claim]]] = {}
    for path, target, distance, group, subset in zip(*(table.column(c).to_pylist() for c in (
            spec.source_filepath_column, "matched_target", "distance", "class", "subset"))):
        claims = groups.setdefault(group or GLOBAL, {}).setdefault(first[target], [])
        claims.append(_Claim(path, distance, subset.endswith("_fallback")))
    return {g: {t: sorted(c, key=lambda x: (x.distance, x.filepath)) for t, c in sorted(by_target.items())}
            for g, by_target in sorted(groups.items())}


def _target_sentences(spec: UniqueMatchingSpec, paths: list[str]) -> list[bool]:
    """Which targets are sentences: the targets hold a `text` column and the row is keyed by it
    (a text embedding matched with target_filepath_column=text), so there is no image to draw."""
    texts: list[str | None] = []
    for file in parquet_files(spec.target_path, "target_path"):
        if "text" not in tables.schema_of(file).names:
            return [False] * len(paths)
        texts += tables.read_columns(file, ["text"]).column("text").to_pylist()
    return [text is not None and text == path for text, path in zip(texts, paths)]


def _rows(by_target: dict[int, list[_Claim]], target_paths: list[str], sentences: list[bool],
          roots: tuple[Path, Path]) -> list[list[Tile]]:
    """Each target (blue), then its claims (green; orange from the non_rare fallback); relative
    paths resolve against each side's parquet folder."""
    rows = []
    for row, claims in list(by_target.items())[:SHEET_TARGETS]:
        target = Tile(target_paths[row], roots[0], f"target {row}", f"claimed {len(claims)}", TARGET_FRAME,
                      sentence=sentences[row])
        rows.append([target] + [Tile(c.filepath, roots[1], f"{c.distance:.4g}", "fallback" if c.fallback else "",
                                     MINED if c.fallback else KEPT) for c in claims[:SHEET_CLAIMS]])
    return rows


def _title(group: str, by_target: dict[int, list[_Claim]], metric: str) -> str:
    claimed = sum(len(c) for c in by_target.values())
    shown = f"first {SHEET_TARGETS} of {len(by_target)}" if len(by_target) > SHEET_TARGETS else f"all {len(by_target)}"
    capped = f", up to {SHEET_CLAIMS} each" if any(len(c) > SHEET_CLAIMS for c in by_target.values()) else ""
    return f"{group}: {claimed} images claimed; {shown} targets shown with their claims{capped} ({metric} distance)"
