"""The report's pictures: what each shows of a run folder, drawn with Pillow alone (deterministic PNGs)."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont, ImageOps

from deft_mine.engine import tables
from deft_mine.engine.images import LoadFailure, load_rgb, resolve_image_path
from deft_mine.events import Events
from deft_mine.report.facts import ReportFacts
from deft_mine.report.render import labels_shown
from deft_mine.schemas import artifacts
from deft_mine.schemas.specs import LabelFilter, Side, recorded_floor
from deft_mine.schemas.warnings import ToolWarning, picture_failed

CONTACT_TARGETS = 8  # targets drawn on the contact sheet
CONTACT_NEIGHBOURS = 8  # neighbours drawn per target at most

WHITE, INK, GRID, PLACEHOLDER = (255, 255, 255), (33, 33, 33), (220, 220, 220), (160, 160, 160)
TARGET_FRAME, KEPT, DROPPED = (40, 90, 200), (46, 139, 87), (200, 50, 50)
NEUTRAL, MINED = (90, 120, 170), (230, 140, 40)
FLOOR = (20, 20, 20)
SENTENCE_BACK = (232, 238, 250)  # a target sentence's tile
SENTENCE_PAD = 6

TILE = 112  # thumbnail side in pixels
GAP = 10
LINE = 14  # caption line height
CAPTION_LINES = 3
Colour = tuple[int, int, int]
Face = ImageFont.ImageFont | ImageFont.FreeTypeFont


@dataclass
class Tile:
    """One image on the contact sheet: where it is, its caption and label lines, its frame colour."""

    filepath: str
    root: Path
    caption: str
    label: str
    frame: Colour
    allowed: bool = True  # False: outside the server's roots, so never opened
    sentence: bool = False  # a target given as a sentence: `filepath` holds its words, drawn as text


def draw(facts: ReportFacts, events: Events) -> list[ToolWarning]:
    """Every picture the facts allow, into the run folder (named in `facts.pictures`); one that
    cannot be drawn is a warning, never a lost report."""
    failures: list[ToolWarning] = []
    for kind, drawer in (("contact_sheet", _contact_sheet), ("score_histogram", _histogram),
                         ("labels", _label_chart)) + _LEAK_PICTURES + _NEAR_PICTURES:
        name = f"{kind}.png"
        try:
            if drawer(facts, Path(facts.folder) / name):
                facts.pictures[kind] = name
        except Exception as exc:  # noqa: BLE001 - a picture is never worth losing the report
            events.log("warning", f"report: could not draw {name} ({exc.__class__.__name__}: {exc})")
            failures.append(picture_failed(name, exc))
    return failures


# ----------------------------------------------------------------------------- what to draw

def _score_text(score: float | None) -> str:
    return "n/a" if score is None or not np.isfinite(score) else f"{score:.4g}"


def _label_text(label: Any) -> str:
    return "" if label is None else str(label)


def _contact_sheet(facts: ReportFacts, path: Path) -> bool:
    t_root, s_root = (Path(facts.image_roots.get(side.input) or facts.folder) for side in (Side.target, Side.source))
    rows: list[list[Tile]] = []
    pairs_path, mined = facts.path("pairs"), facts.path("mined")
    sentences = facts.target_texts is not None  # mining keyed each target by its sentence
    if pairs_path is not None:
        names = tables.schema_of(pairs_path).names
        columns = ["target_filepath", "target_row", "rank", "filepath", "score", "kept"] + \
            [c for c in ("target_label", "source_label") if c in names]
        table = pq.read_table(pairs_path, columns=columns, filters=[("target_row", "<", CONTACT_TARGETS)])
        pairs = sorted(table.to_pylist(), key=lambda p: (p["target_row"], p["rank"]))
        for target_row, group in groupby(pairs, key=lambda p: p["target_row"]):
            found = list(group)
            row = [Tile(found[0]["target_filepath"], t_root, f"target {target_row}",
                        _label_text(found[0].get("target_label")), TARGET_FRAME, sentence=sentences)]
            for pair in found[:CONTACT_NEIGHBOURS]:
                label = _label_text(pair.get("source_label")) + ("" if pair["kept"] else " (dropped)")
                row.append(Tile(pair["filepath"], s_root, f"#{pair['rank']}  {_score_text(pair['score'])}",
                                label.strip(), KEPT if pair["kept"] else DROPPED))
            rows.append(row)
    else:
        names = [] if mined is None else tables.schema_of(mined).names
        if not {"best_target", "filepath"} <= set(names):
            return False
        table = tables.read_columns(mined, [c for c in ("filepath", "best_target", "score") if c in names])
        groups: dict[str, list[dict[str, Any]]] = {}
        for item in table.to_pylist():
            if item["best_target"] in groups or len(groups) < CONTACT_TARGETS:
                groups.setdefault(item["best_target"], []).append(item)
        for i, (target, items) in enumerate(groups.items()):
            rows.append([Tile(str(target), t_root, f"target {i}", "", TARGET_FRAME, sentence=sentences)]
                        + [Tile(str(it["filepath"]), s_root, f"best {_score_text(it.get('score'))}", "", KEPT)
                           for it in items[:CONTACT_NEIGHBOURS]])
    facts.contact_from = "pairs" if pairs_path is not None else "best_target"
    facts.contact_targets = len(rows)
    facts.contact_neighbours = max([len(r) - 1 for r in rows] + [0])
    for tile in (tile for row in rows for tile in row if not tile.sentence):
        tile.allowed = facts.image_allowed(resolve_image_path(tile.filepath, tile.root))
    queries = facts.manifest.mining.summary.get("queries")
    _draw_contact_sheet(rows, path, f"First {len(rows)} of {queries if queries is not None else 'the'} "
                                    f"{'target sentences' if sentences else 'targets'} "
                                    "(blue) and their nearest pool images: green kept, red dropped")
    return True


def _histogram(facts: ReportFacts, path: Path) -> bool:
    mining, spec = facts.manifest.mining, facts.manifest.mining_spec or {}
    metric = mining.knn_metric or spec.get("knn_metric")
    axis = ("cosine similarity (higher is nearer)" if metric == "cosine" else
            f"{metric} distance (lower is nearer)" if metric else "score")
    pairs_path, mined, kept = facts.path("pairs"), facts.path("mined"), None
    floor = (recorded_floor(spec, metric) or (None, None))[1]
    if pairs_path is not None:
        table = tables.read_columns(pairs_path, ["score", "kept"])
        scores = table.column("score").to_numpy()
        if mining.label_filter is LabelFilter.applied or floor is not None:
            kept = table.column("kept").to_numpy(zero_copy_only=False).astype(bool)
        title = f"Neighbour scores of all {len(scores)} pairs found"
    else:
        if mined is None or "score" not in tables.schema_of(mined).names:
            return False
        scores = tables.read_columns(mined, ["score"]).column("score").to_numpy(zero_copy_only=False)
        title = f"Best neighbour score of each of the {len(scores)} mined images"
    facts.histogram_from = "pairs" if pairs_path is not None else "mined"
    scores = np.asarray(scores, dtype=np.float64)
    finite = np.isfinite(scores)
    _draw_histogram(scores[finite], None if kept is None else kept[finite], path, title, f"score: {axis}",
                    floor=None if floor is None else float(floor))
    return True


# ----------------------------------------------------------------------------- drawing

def font(size: int = 12) -> Face:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, width: float, face: Face) -> str:
    """`text`, shortened with an ellipsis to fit `width` pixels."""
    if draw.textlength(text, font=face) <= width:
        return text
    while text and draw.textlength(text + "…", font=face) > width:
        text = text[:-1]
    return text + "…"


def _canvas(width: int, height: int, title: str, at: tuple[int, int],
            room: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    """A white picture with its title written at `at`, shortened to `room` pixels."""
    image = Image.new("RGB", (width, height), WHITE)
    pen = ImageDraw.Draw(image)
    pen.text(at, _fit(pen, title, room, font(15)), fill=INK, font=font(15))
    return image, pen


def _legend(pen: ImageDraw.ImageDraw, x: float, entries: Sequence[tuple[Colour, str]], face: Face,
            step: float | None = None) -> None:
    """Colour swatches with their names, `step` pixels apart (default: each name's width plus 30)."""
    for colour, name in entries:
        pen.rectangle([x, 40, x + 12, 52], fill=colour)
        pen.text((x + 18, 39), name, fill=INK, font=face)
        x += 30 + pen.textlength(name, font=face) if step is None else step


def _save(image: Image.Image, path: Path) -> None:
    with tables.atomic_output(path) as tmp:
        image.save(tmp, format="PNG")


def _sentence_tile(sentence: str) -> Image.Image:
    """A sentence drawn in a tile, wrapped word by word; what does not fit ends in an ellipsis."""
    canvas = Image.new("RGB", (TILE, TILE), SENTENCE_BACK)
    pen, face = ImageDraw.Draw(canvas), font(12)
    lines: list[str] = []
    for word in sentence.split():
        if lines and pen.textlength(f"{lines[-1]} {word}", font=face) <= TILE - 2 * SENTENCE_PAD:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    room = (TILE - 2 * SENTENCE_PAD) // LINE
    if len(lines) > room:
        lines = lines[:room - 1] + [lines[room - 1] + " …"]
    for i, line in enumerate(lines):
        pen.text((SENTENCE_PAD, SENTENCE_PAD + i * LINE), _fit(pen, line, TILE - 2 * SENTENCE_PAD, face),
                 fill=INK, font=face)
    return canvas


def _tile_image(tile: Tile) -> Image.Image:
    if tile.sentence:
        return _sentence_tile(tile.filepath)
    loaded = load_rgb(tile.filepath, tile.root) if tile.allowed else LoadFailure(tile.filepath, "outside roots")
    if isinstance(loaded, LoadFailure):
        canvas = Image.new("RGB", (TILE, TILE), PLACEHOLDER)
        pen = ImageDraw.Draw(canvas)
        face = font(13)
        text = _fit(pen, loaded.reason.split(" (")[0], TILE - 8, face)  # "missing", "not an image" …
        pen.text(((TILE - pen.textlength(text, font=face)) / 2, TILE / 2 - 8), text, fill=WHITE, font=face)
        pen.line([(0, 0), (TILE - 1, TILE - 1)], fill=(180, 180, 180))
        pen.line([(0, TILE - 1), (TILE - 1, 0)], fill=(180, 180, 180))
        return canvas
    return ImageOps.contain(loaded, (TILE, TILE), method=Image.Resampling.BICUBIC)


def _draw_contact_sheet(rows: Sequence[Sequence[Tile]], path: Path, title: str) -> None:
    """Each row: the target tile, then its neighbours; at least 1 column, rows as given."""
    columns = max([len(r) for r in rows] + [1])
    cell_w, cell_h = TILE + GAP, TILE + 6 + CAPTION_LINES * LINE + GAP
    width = max(GAP + columns * cell_w, 360)
    sheet, pen = _canvas(width, 36 + max(len(rows), 1) * cell_h + GAP, title, (GAP, 10), width - 2 * GAP)
    small = font(11)
    if not rows:
        pen.text((GAP, 50), "no pairs to show", fill=INK, font=font(13))
    for r, row in enumerate(rows):
        y = 36 + r * cell_h
        for c, tile in enumerate(row):
            x = GAP + c * cell_w
            thumb = _tile_image(tile)
            sheet.paste(thumb, (x + (TILE - thumb.width) // 2, y + (TILE - thumb.height) // 2))
            pen.rectangle([x - 3, y - 3, x + TILE + 2, y + TILE + 2], outline=tile.frame, width=3)
            name = "sentence" if tile.sentence else Path(tile.filepath).name
            for i, text in enumerate((tile.caption, tile.label, name)):
                pen.text((x, y + TILE + 6 + i * LINE), _fit(pen, text, TILE, small), fill=INK, font=small)
        if r:
            pen.line([(0, y - GAP // 2 - 3), (width, y - GAP // 2 - 3)], fill=GRID)
    _save(sheet, path)


def contact_sheet(rows: Sequence[Sequence[Tile]], path: Path, title: str) -> None:
    """A contact sheet of `rows` (each a leading tile, then its images), saved atomically at `path`:
    for pictures other than the report's (a missing or unreadable image is a placeholder tile)."""
    _draw_contact_sheet(rows, path, title)


def _draw_histogram(scores: np.ndarray, kept: np.ndarray | None, path: Path, title: str,
                    axis_label: str, bins: int = 20, floor: float | None = None,
                    edges: np.ndarray | None = None, what: str = "pairs", line_name: str = "floor") -> None:
    """Counts of `scores` in `bins` equal bins (or in the `edges` given); with `kept`, kept (green)
    and dropped (red) stacked, else `what` they count; with a `floor`, a vertical line where it lies
    (the range widened to show it), named `line_name`."""
    width, height = 720, 400
    left, right, top, bottom = 64, 24, 64, 56
    image, pen = _canvas(width, height, title, (left, 12), width - left - right)
    plot_w, plot_h = width - left - right, height - top - bottom
    pen.rectangle([left, top, left + plot_w, top + plot_h], outline=INK)
    face = font(11)
    if scores.size == 0:
        pen.text((left + 20, top + plot_h / 2), "no scores to show (no pairs were found)", fill=INK, font=font(13))
        _save(image, path)
        return
    bounds = [float(scores.min()), float(scores.max())] + ([] if floor is None else [floor])  # the floor shown too
    lo, hi = min(bounds), max(bounds)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    if edges is not None:  # bins counted already (the leakage guard's): drawn as they are
        lo, hi, bins = float(edges[0]), float(edges[-1]), len(edges) - 1
    edges = np.linspace(lo, hi, bins + 1) if edges is None else np.asarray(edges, np.float64)
    layers: list[tuple[np.ndarray, Colour, str]] = [
        (np.histogram(scores[kept], edges)[0], KEPT, f"kept ({int(kept.sum())})"),
        (np.histogram(scores[~kept], edges)[0], DROPPED, f"dropped ({int((~kept).sum())})"),
    ] if kept is not None else [(np.histogram(scores, edges)[0], NEUTRAL, f"{what} ({scores.size})")]
    total = sum(layer[0] for layer in layers)
    step = max(1, -(-int(total.max()) // 4))  # whole-number count ticks, about four of them
    peak = step * max(1, -(-int(total.max()) // step))
    for tick in range(0, peak + 1, step):
        y = top + plot_h - tick / peak * plot_h
        if tick:
            pen.line([(left + 1, y), (left + plot_w - 1, y)], fill=GRID)
        pen.text((left - 6 - pen.textlength(str(tick), font=face), y - 7), str(tick), fill=INK, font=face)
    bar_w = plot_w / bins
    base = np.zeros(bins)
    for counts, colour, _ in layers:
        for i, n in enumerate(counts):
            if n:
                x0 = left + i * bar_w + 1
                y1 = top + plot_h - base[i] / peak * plot_h
                pen.rectangle([x0, y1 - n / peak * plot_h, x0 + bar_w - 2, y1 - 1], fill=colour)
        base += counts
    for frac in (0.0, 0.5, 1.0):
        label = f"{lo + frac * (hi - lo):.4g}"
        x = left + frac * plot_w
        pen.line([(x, top + plot_h), (x, top + plot_h + 4)], fill=INK)
        pen.text((x - pen.textlength(label, font=face) / 2, top + plot_h + 6), label, fill=INK, font=face)
    pen.text((left, height - 22), _fit(pen, axis_label, plot_w, face), fill=INK, font=face)
    entries = [(colour, name) for _, colour, name in layers]
    if floor is not None:
        x = left + (floor - lo) / (hi - lo) * plot_w
        for y in range(top, top + plot_h, 8):  # dashed, so the bars behind it stay readable
            pen.line([(x, y), (x, min(y + 4, top + plot_h))], fill=FLOOR, width=2)
        entries.append((FLOOR, f"{line_name} {floor:.4g}"))
    _legend(pen, left, entries, face)
    _save(image, path)


def _label_chart(facts: ReportFacts, path: Path) -> bool:
    """Two horizontal bars per label shown: targets (blue) and mined images (orange), values written."""
    if facts.target_labels is None or facts.mined_labels is None:
        return False
    labels, _ = labels_shown(facts.target_labels, facts.mined_labels)
    targets, mined = ([counts.get(x, 0) for x in labels] for counts in (facts.target_labels, facts.mined_labels))
    width, left, right, top, row_h = 720, 170, 60, 64, 30
    image, pen = _canvas(width, max(200, top + row_h * max(len(labels), 1) + 24),
                         "Targets vs mined images per label (mined counted by pool label)", (12, 12), width - 24)
    face = font(11)
    _legend(pen, left, [(TARGET_FRAME, "targets"), (MINED, "mined")], face, 90)
    peak = max(targets + mined + [1])
    plot_w = width - left - right
    for i, (label, t, m) in enumerate(zip(labels, targets, mined)):
        y = top + i * row_h
        pen.text((12, y + 7), _fit(pen, str(label), left - 20, face), fill=INK, font=face)
        for j, (value, colour) in enumerate(((t, TARGET_FRAME), (m, MINED))):
            y0 = y + 3 + j * 12
            x1 = left + value / peak * plot_w
            if value:
                pen.rectangle([left, y0, x1, y0 + 10], fill=colour)
            pen.text((x1 + 4, y0 - 2), str(value), fill=INK, font=face)
    pen.line([(left, top - 4), (left, top + row_h * max(len(labels), 1))], fill=INK)
    _save(image, path)
    return True


# ----------------------------------------------------------------------------- the leakage guard's

LEAK_SHEET_ROWS = 6  # protected images drawn on the leak sheet at most
LEAK_SHEET_COPIES = 6  # pool copies drawn beside each at most
LEAK_ROWS_READ = 5000  # leaks.parquet's first rows the sheet groups (a huge guard's sheet needs no more)


def _leak_pairs(facts: ReportFacts, path: Path) -> bool:
    """Each protected image (blue) beside the pool rows it kept out of the search (red), with the
    leak's kind and score; the protect listings' images as the run resolved them."""
    leaks_path, guard = Path(facts.folder) / artifacts.LEAKS, facts.manifest.leaks
    if guard is None or not guard.leaks_excluded or not leaks_path.is_file():
        return False
    table = pq.ParquetFile(leaks_path).iter_batches(LEAK_ROWS_READ)
    found = next(table).to_pylist()
    score = "similarity" if guard.knn_metric == "cosine" else "distance"
    where = _protected_paths(facts)
    t_root, s_root = (Path(facts.image_roots.get(side.input) or facts.folder) for side in (Side.target, Side.source))
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for leak in found:
        key = (leak["protected_filepath"], leak["protected_listing"])
        if key in groups or len(groups) < LEAK_SHEET_ROWS:
            groups.setdefault(key, []).append(leak)
    rows = []
    for (protected, listing), copies in groups.items():
        target = listing == "targets"
        lead = Tile(where.get((protected, listing), protected), t_root if target else Path(listing).parent,
                    "target" if target else "protected", "" if target else Path(listing).name, TARGET_FRAME)
        rows.append([lead] + [Tile(c["filepath"], s_root, "same bytes" if c.get(score) is None else
                                   f"{score} {_score_text(c[score])}", c["kind"], DROPPED)
                              for c in copies[:LEAK_SHEET_COPIES]])
    for tile in (tile for row in rows for tile in row):
        tile.allowed = facts.image_allowed(resolve_image_path(tile.filepath, tile.root))
    shown = sum(len(r) - 1 for r in rows)
    contact_sheet(rows, path, f"{shown} of {guard.leaks_excluded} leaks (red), each beside what it copies (blue)")
    return True


def _protected_paths(facts: ReportFacts) -> dict[tuple[str, str], str]:
    """(path as its listing wrote it, listing) -> where the run found it (protected_listing.parquet)."""
    path = Path(facts.folder) / artifacts.PROTECTED_LISTING
    if not path.is_file():
        return {}
    table = tables.read_columns(path, ["filepath", "protected_filepath", "protected_listing"])
    return {(w, o): a for a, w, o in zip(*(table.column(c).to_pylist() for c in table.column_names))}


def _leak_nearest(facts: ReportFacts, path: Path) -> bool:
    """The guard's histogram of each pool row's nearest protected score, its threshold marked."""
    guard = facts.manifest.leaks
    if guard is None or not guard.nearest or not sum(guard.nearest["counts"]):
        return False
    edges, counts = np.asarray(guard.nearest["edges"]), np.asarray(guard.nearest["counts"], np.int64)
    cosine = guard.knn_metric == "cosine"
    axis = ("cosine similarity to the nearest protected image (higher is nearer)" if cosine else
            f"{guard.knn_metric} distance to the nearest protected image (lower is nearer)")
    _draw_histogram(np.repeat((edges[:-1] + edges[1:]) / 2, counts), None, path,
                    f"Nearest protected image of each of the {int(counts.sum())} pool rows", axis,
                    floor=guard.threshold, edges=edges, what="pool rows", line_name=guard.threshold_key or "")
    return True


_LEAK_PICTURES = ((artifacts.LEAK_PAIRS_PICTURE.removesuffix(".png"), _leak_pairs),
                  (artifacts.LEAK_NEAREST_PICTURE.removesuffix(".png"), _leak_nearest))


# ----------------------------------------------------------------------------- the near-duplicate collapse's

NEAR_SHEET_ROWS = 6  # kept images drawn on the near-duplicate sheet at most
NEAR_SHEET_COPIES = 6  # images collapsed into each drawn beside it at most
NEAR_ROWS_READ = 5000  # near_duplicates.parquet's first rows the sheet groups


def _near_duplicate_groups(facts: ReportFacts, path: Path) -> bool:
    """The first kept images that others were collapsed into (green), each beside those images
    (red) with their similarity or distance to it and their kind; pool images as the run resolved them."""
    near = facts.near_duplicates
    if near is None or not near.rows:
        return False
    parquet = pq.ParquetFile(Path(facts.folder) / near.name)
    score = "similarity" if "similarity" in parquet.schema_arrow.names else "distance"
    groups: dict[str, list[dict[str, Any]]] = {}
    for dropped in next(parquet.iter_batches(NEAR_ROWS_READ)).to_pylist():
        if dropped["duplicate_of"] in groups or len(groups) < NEAR_SHEET_ROWS:
            groups.setdefault(dropped["duplicate_of"], []).append(dropped)
    root = Path(facts.image_roots.get(Side.source.input) or facts.folder)
    rows = [[Tile(kept, root, "kept", "", KEPT)]
            + [Tile(d["filepath"], root, "same bytes" if d.get(score) is None else f"{score} {_score_text(d[score])}",
                    d["kind"], DROPPED) for d in dropped[:NEAR_SHEET_COPIES]]
            for kept, dropped in groups.items()]
    for tile in (tile for row in rows for tile in row):
        tile.allowed = facts.image_allowed(resolve_image_path(tile.filepath, tile.root))
    shown = sum(len(r) - 1 for r in rows)
    contact_sheet(rows, path, f"Kept (green), collapsed (red): {shown} of {near.rows}")  # fits a one-pair sheet
    return True


_NEAR_PICTURES = ((artifacts.NEAR_DUPLICATES_PICTURE.removesuffix(".png"), _near_duplicate_groups),)
