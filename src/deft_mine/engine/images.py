"""Image files to RGB Pillow images: path resolution, content digests (one file, or many files' sizes and digests side by side), EXIF orientation, and why a file failed."""

from __future__ import annotations

import hashlib
import io
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

_FILE_THREADS = 8  # stat and hash side by side: the time is the disk's


def resolve_image_path(filepath: str, image_root: Path) -> Path:
    """Absolute `filepath`s stand as they are; relative ones resolve against `image_root`."""
    path = Path(os.path.expanduser(filepath))
    return path if path.is_absolute() else image_root / path


@dataclass
class LoadFailure:
    filepath: str
    reason: str


def read_bytes(filepath: object, image_root: Path) -> bytes | LoadFailure:
    """The file's bytes, or why they could not be read (never raises for bad files)."""
    if filepath is None or filepath == "":
        return LoadFailure("<null>" if filepath is None else "<empty>", "null filepath")
    path = resolve_image_path(str(filepath), image_root)
    try:
        mode = path.stat().st_mode
        if stat.S_ISDIR(mode):
            return LoadFailure(str(filepath), "is a directory")
        if not stat.S_ISREG(mode):  # a pipe or a device would block the run, or never end
            return LoadFailure(str(filepath), "not a regular file")
        return path.read_bytes()
    except FileNotFoundError:
        return LoadFailure(str(filepath), "missing")
    except (OSError, ValueError) as exc:
        return LoadFailure(str(filepath), f"unreadable ({exc.__class__.__name__}: {exc})")


def digest(data: bytes) -> bytes:
    """SHA-256 of an image file's bytes: what the embedding store keys vectors by."""
    return hashlib.sha256(data).digest()


def file_sizes(paths: list[Path]) -> np.ndarray:
    """Each regular file's size in bytes, -1 where none can be read (missing, a folder, a pipe). Each
    thread takes one contiguous slice (one stat a file): a task per file would cost more than the stat."""
    def sizes(part: list[Path]) -> list[int]:
        out = []
        for path in part:
            try:
                info = os.stat(path)
                out.append(info.st_size if stat.S_ISREG(info.st_mode) else -1)
            except (OSError, ValueError):
                out.append(-1)
        return out
    step = max(1, -(-len(paths) // _FILE_THREADS))
    with ThreadPoolExecutor(_FILE_THREADS) as pool:
        parts = pool.map(sizes, [paths[i:i + step] for i in range(0, len(paths), step)])
        return np.fromiter((n for part in parts for n in part), np.int64, len(paths))


def file_digests(paths: list[Path]) -> list[bytes | None]:
    """SHA-256 of each file's bytes (the embedding store's digest), None where it cannot be read."""
    def one(path: Path) -> bytes | None:
        data = read_bytes(str(path), path.parent)
        return None if not isinstance(data, bytes) else digest(data)
    with ThreadPoolExecutor(_FILE_THREADS) as pool:
        return list(pool.map(one, paths, chunksize=16))


def decode_rgb(data: bytes, filepath: str) -> Image.Image | LoadFailure:
    """The decoded RGB image, upright (EXIF orientation applied, as PIL's exif_transpose does),
    or why it could not be had (never raises for bad files)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > (Image.MAX_IMAGE_PIXELS or float("inf")):
                return LoadFailure(filepath, f"too_large ({img.width}x{img.height} pixels)")
            img.load()  # decode now: a truncated file fails here, not in a worker later
            return _eight_bit(ImageOps.exif_transpose(img)).convert("RGB")
    except UnidentifiedImageError:
        return LoadFailure(filepath, "not an image")
    except Image.DecompressionBombError as exc:
        return LoadFailure(filepath, f"too_large ({exc})")
    except (OSError, ValueError) as exc:
        return LoadFailure(filepath, f"unreadable ({exc.__class__.__name__}: {exc})")


def _eight_bit(img: Image.Image) -> Image.Image:
    """16-bit (and 32-bit integer) grey images scaled to 8 bits: PIL's own conversion clips them."""
    if img.mode not in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        return img
    values = np.asarray(img, dtype=np.float64)
    return Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), mode="L")


def load_rgb(filepath: str, image_root: Path) -> Image.Image | LoadFailure:
    data = read_bytes(filepath, image_root)
    return data if isinstance(data, LoadFailure) else decode_rgb(data, filepath)
