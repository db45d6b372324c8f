"""The ChangeNet layout: the CSV's columns, its label case, the object/light file form, where a row's
image and golden lie for each light (found as the DEFT loop's resolver finds them), and the lights
and extension a ChangeNet spec names."""

from __future__ import annotations

import csv as pycsv
import functools
import os
import stat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterable

import pyarrow as pa
import yaml

from deft_mine.engine import tables
from deft_mine.errors import DeftError
from deft_mine.schemas.inputs import ChangeNetOptions

COLUMNS = ("input_path", "golden_path", "label", "object_name")
ADDED = ("light", "golden_filepath", "csv_row")  # what the listing adds after the CSV's columns
PASS = "PASS"  # ChangeNet's dataloader compares it byte for byte: class 0
DEFAULT_LIGHTS = ("SolderLight",)
DEFAULT_IMAGE_EXT = ".jpg"
_MISSING, _FILE, _DIR = 0, 1, 2
_SHOWN = 20  # failures a refusal or a skip keeps as examples


@dataclass(frozen=True)
class Layout:
    """Where a ChangeNet CSV's paths resolve: the images root, the CSV's folder (None: a listing's,
    whose paths are resolved already), the lights in order and the image extension (with its dot)."""

    images_dir: Path
    csv_dir: Path | None
    lights: tuple[str, ...]
    image_ext: str

    def filename(self, object_name: str, light: str) -> str | None:
        """The object/light form's file name, {object_name}_{light}{image_ext} (None: no object_name)."""
        return f"{object_name}{self.suffix(light)}" if object_name else None

    def suffix(self, light: str) -> str:
        return f"_{light}{self.image_ext}"

    def image(self, directory: str, object_name: str, light: str) -> Path:
        """How ChangeNet rebuilds a file: {images_dir}/{dir}/{object_name}_{light}{image_ext}."""
        return self.images_dir / directory / f"{object_name}{self.suffix(light)}"


@dataclass(frozen=True)
class Resolution:
    """One row's image (or golden) for one light: `path` the one file found, as its candidate
    names it (None: zero or several), `tried` every candidate in order, `found` the distinct files."""

    path: str | None
    tried: tuple[str, ...]
    found: tuple[str, ...]


@dataclass
class Rows:
    """A ChangeNet CSV resolved: for each listing row (CSV row × light, row-major) its CSV row,
    light, image and golden (None: no golden_path); the row-lights left out (skip_unresolved)."""

    csv_rows: list[int] = field(default_factory=list)
    lights: list[str] = field(default_factory=list)
    filepaths: list[str] = field(default_factory=list)
    goldens: list[str | None] = field(default_factory=list)
    unresolved: int = 0
    examples: list[str] = field(default_factory=list)


def is_changenet(schema_or_columns: pa.Schema | Iterable[str], listing: bool = False) -> bool:
    """Has all four ChangeNet columns (and, as a ChangeNet pool's standard `listing`, its `light`)."""
    names = set(schema_or_columns.names if isinstance(schema_or_columns, pa.Schema) else schema_or_columns)
    return all(column in names for column in COLUMNS) and (not listing or "light" in names)


def canonical_label(label: Any) -> str:
    """ChangeNet's case: a label whose container key is PASS is exactly `PASS`; any other lower-case, stripped."""
    text = "" if label is None else str(label)
    return PASS if text.strip().upper() == PASS else text.lower().strip()


def header(path: Path) -> list[str]:
    """A CSV's column names, from its header line (the separator chosen as for any CSV listing)."""
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as fh:
        return next(pycsv.reader(fh, delimiter=tables.csv_delimiter(path)), [])


def read_csv(path: Path) -> pa.Table:
    """A ChangeNet CSV, every column read as text (verbatim: a board named 0510 stays 0510)."""
    return tables.read_text_csv(path)


def spec_lights(spec_path: Path) -> tuple[tuple[str, ...], str | None]:
    """The lights (`dataset.classify.input_map` keys, in their channel order) and the image
    extension (`dataset.classify.image_ext`, None when unset) of a ChangeNet spec YAML."""
    try:
        classify = ((yaml.safe_load(spec_path.read_text()) or {}).get("dataset") or {}).get("classify") or {}
        input_map = classify.get("input_map")
    except (OSError, yaml.YAMLError, AttributeError) as exc:
        raise DeftError("changenet_spec_invalid", f"changenet_spec {spec_path}: not a readable ChangeNet spec "
                        f"({exc})", fix="name the ChangeNet train/eval spec YAML", field="changenet_spec") from exc
    if not isinstance(input_map, dict) or not input_map:
        raise DeftError("changenet_spec_invalid", f"changenet_spec {spec_path} has no dataset.classify.input_map "
                        "naming the lights", fix="name the ChangeNet spec the model trains with, or pass the "
                        "lights yourself (--light)", field="changenet_spec", path=str(spec_path))
    # the map's values are channel numbers: its lights in that order (a stable sort keeps the written order)
    order = sorted(input_map, key=lambda k: input_map[k] if isinstance(input_map[k], int) else 0)
    ext = classify.get("image_ext")
    return tuple(str(light) for light in order), None if ext is None else str(ext)


def check_images_dir(options: ChangeNetOptions, image_root: str | None) -> None:
    """images_dir and the embedding spec's image_root name one root: two different ones are refused."""
    if options.images_dir and image_root:
        given, spec = (Path(p).expanduser().absolute() for p in (options.images_dir, image_root))
        if os.path.realpath(given) != os.path.realpath(spec):
            raise DeftError("images_dir_conflict", f"images_dir {given} and the embedding spec's image_root {spec} "
                            "name two different images roots", fix="give one of them (or the same folder to both)",
                            field="images_dir", images_dir=str(given), image_root=str(spec))


def layout_of(options: ChangeNetOptions, csv_path: Path, images_root: Path) -> Layout:
    """The layout a ChangeNet CSV resolves in: images_dir (else `images_root`), lights and extension
    as given, else from the ChangeNet spec, else SolderLight and .jpg."""
    images_dir = Path(options.images_dir).expanduser().absolute() if options.images_dir else images_root
    if not images_dir.is_dir():
        raise DeftError("images_dir_invalid", f"images_dir {images_dir} is not a folder", field="images_dir",
                        fix="name the images root the CSV's input_path and golden_path are relative to",
                        path=str(images_dir))
    spec = spec_lights(Path(options.changenet_spec).expanduser()) if options.changenet_spec else ((), None)
    lights = tuple(options.lights or spec[0] or DEFAULT_LIGHTS)
    if any(not light.strip() for light in lights) or len(set(lights)) != len(lights):
        raise DeftError("changenet_light_invalid", f"lights {list(lights)}: each must be named, and once",
                        fix="pass each light once (--light SolderLight --light UniformLight)", field="lights")
    ext = options.image_ext or spec[1] or DEFAULT_IMAGE_EXT
    return Layout(Path(os.path.realpath(images_dir)), Path(os.path.realpath(csv_path.parent)), lights,
                  ext if ext.startswith(".") else f".{ext}")


def listing_layout(listing: pa.Table, images_root: Path) -> Layout:
    """A ChangeNet listing's layout: its lights (in order of first appearance) and image extension
    (the commonest of its resolved files': ChangeNet's spec has one)."""
    lights = tuple(dict.fromkeys(str(x) for x in listing.column("light").to_pylist() if x is not None))
    suffixes = Counter(PurePosixPath(str(p)).suffix for p in listing.column("filepath").to_pylist() if p)
    return Layout(images_root, None, lights, suffixes.most_common(1)[0][0] if suffixes else DEFAULT_IMAGE_EXT)


def bases(value: str, layout: Layout) -> list[str]:
    """The direct candidates of an input_path/golden_path value: absolute as it is; else beside the
    CSV, then under the images root with and without a leading `images/`."""
    value = os.path.expanduser(value) if value.startswith("~") else value
    if os.path.isabs(value):
        return [str(PurePosixPath(value))]
    relative = str(PurePosixPath(value))
    found = [_join(str(layout.csv_dir or layout.images_dir), relative), _join(str(layout.images_dir), relative)]
    if relative.startswith("images/"):
        found.append(_join(str(layout.images_dir), relative[len("images/"):]))
    return list(dict.fromkeys(found))


def _folder_of(value: str, object_name: str, layout: Layout) -> str:
    """A value naming one light's file (`…/C1_SolderLight.jpg`) stands for its folder, so each light
    finds its own file there: taken as it is (as the loop's one-light resolver takes it), it would
    give every light that one image."""
    path = PurePosixPath(value.strip())
    named = {layout.filename(object_name, light) for light in layout.lights} - {None}
    return str(path.parent) if path.name in named else value


def _join(base: str, relative: str) -> str:
    return base if relative == "." else f"{base}/{relative}"


def candidates(value: str, object_name: str, light: str, layout: Layout) -> list[Path]:
    """Every path tried for a row's value and light, in order: the direct ones, then the
    object/light form under each of them."""
    direct = bases(value, layout)
    name = layout.filename(object_name, light)
    return [Path(p) for p in direct + ([f"{b}/{name}" for b in direct] if name else [])]


class Resolver:
    """Finds a row's file with at most one stat per distinct candidate and no directory walk: a
    folder's stat is remembered (rows and lights share folders), and the object/light form is
    only looked for under a folder that exists."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self._kinds: dict[str, int] = {}

    def _kind(self, path: str) -> int:
        kind = self._kinds.get(path)
        if kind is None:
            kind = self._kinds[path] = _stat_kind(path)
        return kind

    def resolve(self, direct: list[str], name: str | None, remember: bool = False) -> Resolution:
        """The one file among `direct` and `direct/name`; `remember` the files' stats too (goldens,
        which many rows share)."""
        kinds = [self._kind(b) for b in direct]
        found = [b for b, k in zip(direct, kinds) if k == _FILE]
        if name:
            for base, kind in zip(direct, kinds):
                path = f"{base}/{name}"
                if kind == _DIR and (self._kind(path) if remember else _stat_kind(path)) == _FILE:
                    found.append(path)
        if len(found) > 1:  # several names: one file only if they resolve to the same one
            real = dict.fromkeys(os.path.realpath(p) for p in found)
            found = found[:1] if len(real) == 1 else list(real)
        tried = tuple(direct + ([f"{b}/{name}" for b in direct] if name else []))
        return Resolution(found[0] if len(found) == 1 else None, tried, tuple(found))


def _stat_kind(path: str) -> int:
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):  # missing, unreadable folder, a NUL in the name
        return _MISSING
    return _FILE if stat.S_ISREG(mode) else _DIR if stat.S_ISDIR(mode) else _MISSING


def resolve_rows(table: pa.Table, layout: Layout, path: Path, skip_unresolved: bool) -> Rows:
    """Every row × light of a ChangeNet CSV resolved, image and golden, before any embedding: an
    empty label, a light that resolves nowhere, or (unless skipped) a row that resolves zero or
    several files is refused, naming the row (its CSV line), the light and the paths tried."""
    resolver, out, failures = Resolver(layout), Rows(), []
    per_light = dict.fromkeys(layout.lights, 0)
    columns = [table.column(c).to_pylist() for c in COLUMNS]
    for row, (value, golden, label, object_name) in enumerate(zip(*columns)):
        if not label.strip():
            raise DeftError("label_empty", f"{path}: row {row} (line {row + 2}) has an empty label", field="label",
                            fix="give every row its label (PASS, or the defect class)", row=row, line=row + 2)
        value, golden = _folder_of(value, object_name, layout), _folder_of(golden, object_name, layout)
        image_bases, golden_bases = bases(value, layout), bases(golden, layout) if golden.strip() else None
        for light in layout.lights:
            name = layout.filename(object_name, light)
            image = resolver.resolve(image_bases, name)
            per_light[light] += bool(image.found)  # several files: a bad row, not a wrong light
            gold = None if golden_bases is None else resolver.resolve(golden_bases, name, remember=True)
            bad = next(((column, r) for column, r in (("input_path", image), ("golden_path", gold))
                        if r is not None and r.path is None), None)
            if bad is not None:
                failures.append((row, light, *bad))
                continue
            out.csv_rows.append(row)
            out.lights.append(light)
            out.filepaths.append(_relative(image.path, layout))
            out.goldens.append(None if gold is None else _relative(gold.path, layout))
    if table.num_rows:
        _refuse_dark_lights(per_light, failures, path, layout)
    if failures and not skip_unresolved:
        raise _unresolved(failures, path, layout)
    out.unresolved = len(failures)
    out.examples = [_describe(f, layout) for f in failures[:_SHOWN]]
    return out


def _relative(found: str, layout: Layout) -> str:
    """As the loop's resolver writes it: the real path (`..` and linked folders resolved), relative
    to the real images root when inside it, else absolute. Folders are resolved once each: rows
    and lights share them."""
    root, real = _real(str(layout.images_dir)), f"{_real(os.path.dirname(found))}/{os.path.basename(found)}"
    return real[len(root) + 1:] if real.startswith(root + "/") else real


@functools.lru_cache(maxsize=4096)
def _real(folder: str) -> str:
    return os.path.realpath(folder)


def _describe(failure: tuple[int, str, str, Resolution], layout: Layout) -> str:
    row, light, column, res = failure
    what = "no file" if not res.found else f"{len(res.found)} files ({', '.join(res.found)})"
    return f"row {row} (line {row + 2}), light {light}: {column} resolves to {what}"


def _refuse_dark_lights(per_light: dict[str, int], failures: list[Any], path: Path, layout: Layout) -> None:
    """A light no row's image resolves for is a wrong light or extension, not a bad row."""
    dark = [light for light, n in per_light.items() if n == 0]
    if dark:
        example = next(f for f in failures if f[1] == dark[0] and f[2] == "input_path")
        raise DeftError("changenet_light_unresolved", f"{path}: light {dark[0]!r} resolves no image in any row "
                        f"(image extension {layout.image_ext!r}); e.g. row {example[0]} (line {example[0] + 2}) "
                        f"tried {', '.join(example[3].tried)}", field="lights", light=dark[0], lights=dark,
                        tried=list(example[3].tried),
                        fix="name the lights the files carry (--light, or --changenet-spec), the right "
                            "--image-ext, and the images root (--images-dir)")


def _unresolved(failures: list[tuple[int, str, str, Resolution]], path: Path, layout: Layout) -> DeftError:
    row, light, column, res = failures[0]
    return DeftError(
        "changenet_unresolved", f"{path}: {len(failures)} row-light(s) do not resolve to exactly one file; first: "
        f"{_describe(failures[0], layout)}; tried {', '.join(res.tried)}", field=column, row=row, line=row + 2,
        light=light, tried=list(res.tried), found=list(res.found), count=len(failures),
        examples=[_describe(f, layout) for f in failures[:_SHOWN]],
        fix=f"fix the row's {column} (or object_name), or the images root (--images-dir {layout.images_dir}); "
            "or pass --skip-unresolved (skip_unresolved=true) to leave such rows out, counted as 'unresolved'")


def resolve(value: str, object_name: str, light: str, layout: Layout) -> Resolution:
    """One value (input_path or golden_path) of a row, for one light: the one file, or why not."""
    return Resolver(layout).resolve(bases(value, layout), layout.filename(object_name, light))
