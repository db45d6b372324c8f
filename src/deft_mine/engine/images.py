"""Image files to RGB Pillow images: path resolution, EXIF orientation, and why a file failed."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError


def resolve_image_path(filepath: str, image_root: Path) -> Path:
    """Absolute `filepath`s stand as they are; relative ones resolve against `image_root`."""
    path = Path(os.path.expanduser(filepath))
    return path if path.is_absolute() else image_root / path


@dataclass
class LoadFailure:
    filepath: str
    reason: str


def load_rgb(filepath: str, image_root: Path) -> Image.Image | LoadFailure:
    """The decoded, upright RGB image, or why it could not be had (never raises for bad files)."""
    path = resolve_image_path(filepath, image_root)
    try:
        with Image.open(path) as img:
            img.load()  # decode now: a truncated file fails here, not in a worker later
            upright = ImageOps.exif_transpose(img)
            return upright.convert("RGB")
    except FileNotFoundError:
        return LoadFailure(filepath, "missing")
    except UnidentifiedImageError:
        return LoadFailure(filepath, "not an image")
    except IsADirectoryError:
        return LoadFailure(filepath, "is a directory")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        return LoadFailure(filepath, f"unreadable ({exc.__class__.__name__}: {exc})")
