"""COCO json / KITTI folder class sources for unique matching: each image's classes, found the container's way."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any, Callable

from deft_mine.errors import DeftError

COCO, KITTI = "coco", "kitti"
KITTI_IGNORED = "dontcare"  # KITTI's "ignore this region" class (any case), never a class of the image


@dataclass(frozen=True)
class ImageClasses:
    """One image's annotations: the class names as written, and one name per box (instances)."""

    names: frozenset[str] = frozenset()
    boxes: tuple[str, ...] = ()


NO_CLASSES = ImageClasses()


@dataclass
class _Index:
    """A detection file read: annotations by full path and by file name (or stem), and every
    image the file names at all (annotated or not: to tell a wrong file from bare images)."""

    by_path: dict[str, ImageClasses] = field(default_factory=dict)
    by_name: dict[str, ImageClasses] = field(default_factory=dict)
    named: set[str] = field(default_factory=set)

    def lookup(self, filepath: str) -> ImageClasses:
        """The container's lookup: the full path, then the file name, then its stem."""
        if filepath in self.by_path:
            return self.by_path[filepath]
        name = PurePath(filepath)
        return self.by_name.get(name.name) or self.by_name.get(name.stem) or NO_CLASSES

    def names_image(self, filepath: str) -> bool:
        name = PurePath(filepath)
        return bool({filepath, name.name, name.stem} & self.named)


@dataclass
class SideClasses:
    """Per filepath (in the order given): its classes, and whether the file names the image at all."""

    classes: list[ImageClasses]
    listed: list[bool]


def coco_classes(path: Path, filepaths: list[str], field_name: str) -> SideClasses:
    """Classes from a COCO json: an image by `file_name` (or `filepath`/`file_path`), matched by
    full path, else by file name (a name two images share matches neither), else by stem."""
    return _classes(_coco_index(path, field_name), path, filepaths, field_name)


def kitti_classes(path: Path, filepaths: list[str], field_name: str) -> SideClasses:
    """Classes from a KITTI label folder: `STEM.txt` per image, matched by the image's stem (or
    file name); a line's first word is its class; lines under 9 words or with non-numeric box
    corners, and `DontCare`, are skipped."""
    return _classes(_kitti_index(path, field_name), path, filepaths, field_name)


READERS: dict[str, Callable[[Path, list[str], str], SideClasses]] = {COCO: coco_classes, KITTI: kitti_classes}


def detection_classes(path: str, fmt: str, filepaths: list[str], field_name: str) -> SideClasses:
    """`path` read as `fmt` (coco | kitti), each filepath's classes; refused, naming `field_name`,
    when the file is missing, does not fit the format, or names none of the images."""
    where = Path(path).expanduser()
    if not where.exists():
        raise DeftError("file_not_found", f"{field_name}: {where} does not exist",
                        fix=f"point {field_name} at a COCO json file or a KITTI label folder", field=field_name,
                        path=str(where))
    wants_folder = fmt == KITTI
    if where.is_dir() != wants_folder:
        raise _invalid(field_name, where, f"is a {'folder' if where.is_dir() else 'file'}, but detection_format="
                       f"{fmt} reads a {'folder of .txt labels' if wants_folder else 'COCO json file'}",
                       f"set detection_format={KITTI if where.is_dir() else COCO}, or point {field_name} at a "
                       f"{'KITTI label folder' if wants_folder else 'COCO json file'}", reason="format_mismatch")
    return READERS[fmt](where, filepaths, field_name)


def _classes(index: _Index, path: Path, filepaths: list[str], field_name: str) -> SideClasses:
    found: dict[str, tuple[ImageClasses, bool]] = {}
    for filepath in filepaths:
        if filepath not in found:
            found[filepath] = (index.lookup(filepath), index.names_image(filepath))
    listed = [found[p][1] for p in filepaths]
    if filepaths and not any(listed):
        raise DeftError("detections_unmatched", f"{field_name} {path} names none of the {len(found)} images of its "
                        f"side (first: {filepaths[0]!r}); every image would have no class",
                        fix="give the detection file of these images: COCO matches an image by its full path, "
                            "its file name or its stem; KITTI by its stem (STEM.txt)",
                        field=field_name, path=str(path), first_image=filepaths[0])
    return SideClasses(classes=[found[p][0] for p in filepaths], listed=listed)


def _invalid(field_name: str, path: Path, what: str, fix: str, **details: Any) -> DeftError:
    return DeftError("detections_invalid", f"{field_name} {path} {what}", fix=fix, field=field_name, path=str(path),
                     **details)


def _coco_index(path: Path, field_name: str) -> _Index:
    try:
        coco = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _invalid(field_name, path, f"is not valid JSON ({exc})", "give a COCO annotation json",
                       reason="not_json") from exc
    if not isinstance(coco, dict) or "images" not in coco or "annotations" not in coco:
        raise _invalid(field_name, path, "is not a COCO annotation file (a JSON object with 'images' and "
                       "'annotations')", "give a COCO annotation json, or detection_format=kitti for a label "
                       "folder", reason="not_coco")
    images = {img.get("id"): str(fp) for img in coco.get("images") or [] if isinstance(img, dict)
              if (fp := img.get("file_name") or img.get("filepath") or img.get("file_path")) and
              img.get("id") is not None}
    try:
        categories = {cat["id"]: str(cat["name"]) for cat in coco.get("categories") or []}
    except (KeyError, TypeError) as exc:
        raise _invalid(field_name, path, "has a category without an 'id' or a 'name'",
                       "give each category an id and a name", reason="bad_category") from exc
    names: dict[str, set[str]] = {}
    boxes: dict[str, list[str]] = {}
    for ann in coco.get("annotations") or []:
        fp, name = images.get(ann.get("image_id")), categories.get(ann.get("category_id"))
        if not fp or not name:
            continue  # an annotation of no listed image, or of no category: the container skips it
        names.setdefault(fp, set()).add(name)
        bbox = ann.get("bbox")
        if bbox and len(bbox) == 4:  # the container counts an instance only with a box
            boxes.setdefault(fp, []).append(name)
    by_path = {fp: ImageClasses(frozenset(n), tuple(boxes.get(fp, ()))) for fp, n in names.items()}
    by_file: dict[str, list[str]] = {}
    for fp in by_path:
        by_file.setdefault(PurePath(fp).name, []).append(fp)
    # A file name two annotated images share would merge them: only their full paths find them.
    by_name = {name: by_path[fps[0]] for name, fps in by_file.items() if len(fps) == 1}
    named = {key for fp in images.values() for key in (fp, PurePath(fp).name, PurePath(fp).stem)}
    return _Index(by_path=by_path, by_name=by_name, named=named)


def _kitti_index(path: Path, field_name: str) -> _Index:
    files = sorted(path.glob("*.txt"))
    if not files:
        raise _invalid(field_name, path, "holds no .txt label files", "point it at the KITTI label folder (one "
                       "STEM.txt per image), or detection_format=coco for a COCO json", reason="no_labels")
    index = _Index()
    for file in files:
        index.named.add(file.stem)
        try:
            lines = file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise _invalid(field_name, path, f"label file {file.name} cannot be read ({exc})",
                           "fix or remove the label file", reason="unreadable", label_file=str(file)) from exc
        found = [parts[0] for parts in map(str.split, lines) if _kitti_box(parts)]
        if found:
            index.by_name[file.stem] = ImageClasses(frozenset(found), tuple(found))
    return index


def _kitti_box(parts: list[str]) -> bool:
    """A KITTI line the container counts: 9 words or more, not DontCare, its box corners numbers."""
    if len(parts) < 9 or parts[0].lower() == KITTI_IGNORED:
        return False
    try:
        for corner in parts[4:8]:
            float(corner)
    except ValueError:
        return False
    return True
