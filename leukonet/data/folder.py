"""Read a class-per-folder image tree into (path, label) entries, and decode images safely.

Real folders hold junk (macOS metadata files named ``.jpg``, notes, unknown classes).
Scanning never guesses silently: every file it does not use is reported with a reason.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from leukonet.classes import CLASSES, canonical_class
from leukonet.errors import DataError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp"}


@dataclass
class Entry:
    """One labelled image; `path` is relative to the dataset root (posix), or absolute."""

    path: str
    label: int


@dataclass
class ScanResult:
    entries: list[Entry]
    unknown_folders: list[str] = field(default_factory=list)
    ignored_files: list[str] = field(default_factory=list)


def scan_folder(root: str | Path) -> ScanResult:
    """List the images under ``root/<class>/`` with class folders matched by alias.

    Folders that name no leukocyte class are listed in ``unknown_folders``; files without an
    image extension in ``ignored_files``. Hidden files with an image extension are kept, so a
    junk ``.DS_*.jpg`` is tried, fails to decode and is then reported by name.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data root {root} does not exist or is not a folder")
    result = ScanResult(entries=[])
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        cls = canonical_class(folder.name)
        if cls is None:
            result.unknown_folders.append(folder.name)
            continue
        for f in sorted(folder.rglob("*")):
            if not f.is_file():
                continue
            rel = f.relative_to(root).as_posix()
            if f.suffix.lower() in IMAGE_EXTENSIONS:
                result.entries.append(Entry(rel, CLASSES.index(cls)))
            else:
                result.ignored_files.append(rel)
    if not result.entries:
        raise DataError(
            f"no images found under {root}: expected one folder per class "
            f"({', '.join(CLASSES)}) holding image files; found folders "
            f"{[p.name for p in root.iterdir() if p.is_dir()]}"
        )
    if result.unknown_folders:
        warnings.warn(
            f"{root}: ignoring folders that name no leukocyte class: {result.unknown_folders}",
            stacklevel=2,
        )
    return result


# Decoding refuses images outside these bounds before spending memory or time on them.
MIN_SIDE = 8  # px: anything smaller is a thumbnail, an icon or a broken crop, not a cell
MAX_PIXELS = 50_000_000  # width * height declared in the header; a larger cell image is a decompression bomb
_HIGH_DEPTH_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I", "F"}  # single-channel > 8 bit
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError)  # what PIL raises on a corrupt or truncated file
# PIL's own size limit: an error at 2 x Image.MAX_IMAGE_PIXELS, below that a warning (an error under -W error)
_BOMB = (Image.DecompressionBombError, Image.DecompressionBombWarning)


def load_rgb(
    path: str | Path, size: int | None = None, notes: list[str] | None = None, *, data: bytes | None = None
) -> np.ndarray:
    """Decode an image file to an RGB uint8 array, resized to ``size`` x ``size`` if given.

    Raises ``ValueError("<path>: <what is wrong>")`` for a missing, empty, non-image, truncated,
    too small (< MIN_SIDE) or too large (> MAX_PIXELS, checked before decoding) file. Odd but
    valid images are converted: alpha is composited on white, 16-bit and float greyscale are
    stretched from their own min..max to 0..255, greyscale, palette (first frame) and CMYK become
    RGB; each conversion appends a note to ``notes``. ``data``: the file's bytes if already read.
    """
    notes = [] if notes is None else notes
    try:
        nbytes = len(data) if data is not None else Path(path).stat().st_size
    except FileNotFoundError:
        raise ValueError(f"{path}: file not found") from None
    except OSError as err:
        raise ValueError(f"{path}: cannot read file ({type(err).__name__}: {err.strerror})") from err
    if nbytes == 0:
        raise ValueError(f"{path}: empty file (0 bytes)")
    try:
        im = Image.open(io.BytesIO(data) if data is not None else path)
    except Image.UnidentifiedImageError:
        raise ValueError(f"{path}: not a readable image (no known image format; {nbytes} bytes)") from None
    except _BOMB as err:
        raise ValueError(f"{path}: too large, refused before decoding: {err}") from err
    except _DECODE_ERRORS as err:
        raise ValueError(f"{path}: not a readable image ({type(err).__name__}: {err})") from err
    with im:
        width, height = im.size
        if width * height > MAX_PIXELS:
            raise ValueError(
                f"{path}: too large, refused before decoding: {width}x{height} px declared, more than "
                f"{MAX_PIXELS / 1e6:g} megapixels (decompression bomb?)"
            )
        if min(width, height) < MIN_SIDE:
            raise ValueError(f"{path}: too small: {width}x{height} px, need at least {MIN_SIDE} px a side")
        try:
            if getattr(im, "n_frames", 1) > 1:
                notes.append(f"first of {im.n_frames} frames")
            if size is not None and im.format == "JPEG":
                im.draft("RGB", (size, size))  # DCT-domain downscale: a cheaper decode
            im.load()  # decode now, so a truncated file fails here (LOAD_TRUNCATED_IMAGES stays False)
            rgb = _to_rgb(im, notes)
        except _DECODE_ERRORS as err:
            raise ValueError(f"{path}: corrupt or truncated image data ({type(err).__name__}: {err})") from err
    if size is not None:
        rgb = resize_square(rgb, size)
    return np.asarray(rgb, dtype=np.uint8)


def decode_many(paths: Sequence[str | Path], size: int | None = None) -> list[np.ndarray | str]:
    """``load_rgb`` of every path, in threads (decoding releases the GIL): the pixels, or the reason a file
    could not be used (``load_rgb``'s message, naming it)."""

    def load(path: str | Path) -> np.ndarray | str:
        try:
            return load_rgb(path, size)
        except ValueError as err:
            return str(err)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        return list(pool.map(load, paths))


def resize_square(rgb: Image.Image, size: int) -> Image.Image:
    """``rgb`` resized to ``size`` x ``size`` the way every decoded image is (bilinear, antialiased when shrinking)."""
    return rgb.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)


def _to_rgb(im: Image.Image, notes: list[str]) -> Image.Image:
    """Convert a loaded image of any mode to RGB, noting any conversion that changes the data."""
    if im.mode in _HIGH_DEPTH_MODES:
        pixels = np.asarray(im, dtype=np.float64)
        lo, hi = pixels.min(), pixels.max()
        scaled = (pixels - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(pixels)
        bits = "16-bit" if im.mode.startswith("I;16") else f"mode {im.mode}"
        notes.append(f"{bits} scaled to 8-bit (range {lo:g}..{hi:g})")
        return Image.fromarray(np.rint(scaled).astype(np.uint8)).convert("RGB")
    if im.has_transparency_data:
        notes.append(f"converted from {im.mode} with transparency (composited on white)")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im.convert("RGBA")).convert("RGB")
    if im.mode != "RGB":
        kind = {"P": "palette (P)", "L": "greyscale (L)", "1": "black-and-white (1)"}.get(im.mode, im.mode)
        notes.append(f"converted from {kind}")
    return im.convert("RGB")
