"""From an uploaded file's bytes to its cells, as ``predict`` does it: type, size and content checks (``load_rgb``,
which refuses decompression bombs before decoding), the cell finder for whole fields (``predict.cells_of``), the
model and the not-a-leukocyte check (``predict.assess``) and a Grad-CAM heat map per cell. Nothing here touches
the database or the disk."""

from __future__ import annotations

import hashlib
import io
import math
import threading
from dataclasses import dataclass
from pathlib import Path, PurePath

import numpy as np
from omegaconf import DictConfig
from PIL import Image

from leukonet.data.folder import IMAGE_EXTENSIONS, load_rgb
from leukonet.errors import DataError
from leukonet.inference.explain import heatmaps, overlay
from leukonet.predict import Predictor, _review_threshold, assess, cells_of, load_predictor


@dataclass
class Limits:
    max_file: int  # bytes
    max_request: int  # bytes
    max_files: int

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> Limits:
        limits = cls(int(float(cfg.max_file_mb) * 1e6), int(float(cfg.max_request_mb) * 1e6), int(cfg.max_files))
        if min(limits.max_file, limits.max_request, limits.max_files) <= 0:
            raise DataError("max_file_mb, max_request_mb and max_files must be positive")
        return limits


def safe_name(filename: str | None) -> str:
    """The file's base name as shown on the page: no folders, no control characters, at most 200 characters.
    Only ever shown; files are stored under their content hash."""
    name = PurePath((filename or "").replace("\\", "/")).name
    name = "".join(ch for ch in name if ch.isprintable())[:200]
    return name or "unnamed"


SHOWN_AS_IS = {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp"}  # browsers display these files themselves


def png(pixels: np.ndarray) -> bytes:
    """Lossless (the cell is training data), fast: zlib level 1 is 4x faster than the default, 20 % larger."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def jpeg(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None  # JSON has no NaN or Infinity


@dataclass
class CellResult:
    """One cell as the model saw it: its pixels as PNG (None: the uploaded file itself is the cell, a single-cell
    image in a format browsers show), and its heat map as JPEG (for the eye only)."""

    index: int | None
    x: float | None
    y: float | None
    image_png: bytes | None
    heatmap_jpeg: bytes | None
    predicted: str | None
    top_class: str
    probabilities: dict[str, float]
    confidence: float
    needs_review: bool
    not_a_leukocyte: bool
    ood_score: float | None
    ood_reason: str | None
    notes: list[str]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class Classifier:
    """The checkpoint's model, one request at a time (one lock), with the review threshold ``predict`` uses."""

    def __init__(self, cfg: DictConfig, predictor: Predictor | None = None) -> None:
        self.limits = Limits.from_cfg(cfg)
        self.fields = str(cfg.fields).lower()
        if self.fields not in ("auto", "true", "false"):
            raise DataError(f"fields must be auto, true or false, got {cfg.fields!r}")
        # as predict loads it: the cell-kind check rides along (kind_check), with the lab profile leukonet.adapt
        # stored in the checkpoint if any (an upload is too few cells to measure a lab's own)
        self.predictor = predictor or load_predictor(cfg.ckpt_path, "torch", cfg.precision,
                                                     kind_check=cfg.get("kind_check", "auto"))
        self.checkpoint = str(Path(str(cfg.ckpt_path)).resolve())
        self.checkpoint_sha256 = file_sha256(Path(self.checkpoint))
        self.class_names = self.predictor.class_names
        # as in predict: the configured threshold, else the checkpoint's (calibration), else 0.9
        self.review_threshold, self.review_threshold_from = _review_threshold(cfg.get("review_threshold"), self.predictor)
        self.explain = bool(cfg.explain)
        self.batch_size = int(cfg.batch_size)
        if self.batch_size <= 0:
            raise DataError(f"batch_size must be positive, got {cfg.batch_size}")
        self.lock = threading.Lock()

    def check(self, name: str, data: bytes) -> None:
        """Extension and size, before anything is decoded; ValueError names the file and what is wrong."""
        suffix = PurePath(name).suffix.lower()
        if suffix not in IMAGE_EXTENSIONS:
            raise ValueError(f"{name}: not an accepted image type ({suffix or 'no extension'}); "
                             f"accepted: {', '.join(sorted(IMAGE_EXTENSIONS))}")
        if len(data) > self.limits.max_file:
            raise ValueError(f"{name}: too large ({len(data) / 1e6:.3g} MB); "
                             f"the limit is {self.limits.max_file / 1e6:g} MB a file")

    def classify(self, files: list[tuple[str, bytes]]) -> list[list[CellResult] | str]:
        """Per file, its cells (one, or one per leukocyte of a field) or why it cannot be used (the reason names
        the file). The cells of all the files go through the model together, ``batch_size`` at a time."""
        out: list[list[CellResult] | str] = [[] for _ in files]
        found = []  # (file number, name, notes, cell)
        for i, (name, data) in enumerate(files):
            try:
                self.check(name, data)
                notes: list[str] = []
                image = load_rgb(name, notes=notes, data=data)  # content check: ValueError names the file and why
                found += [(i, name, notes, cell) for cell in cells_of(image, name, self.fields)]
            except ValueError as err:
                out[i] = str(err)
        for start in range(0, len(found), self.batch_size):
            batch = found[start:start + self.batch_size]
            cells = [cell for *_, cell in batch]
            with self.lock:
                probs, checks = assess(self.predictor, cells)
                classes = probs.argmax(1).tolist()
                heats = heatmaps(self.predictor.model, [c.pixels for c in cells], classes) if self.explain else None
            for j, ((i, name, notes, cell), p, k, check) in enumerate(zip(batch, probs, classes, checks)):
                flagged = bool(check["not_a_leukocyte"])
                shown_as_is = cell.index is None and PurePath(name).suffix.lower() in SHOWN_AS_IS
                # as in predict: a flagged input gets no class and is not counted; needs_review is for leukocytes
                out[i].append(CellResult(
                    index=cell.index, x=cell.x, y=cell.y, image_png=None if shown_as_is else png(cell.pixels),
                    heatmap_jpeg=None if heats is None else jpeg(overlay(cell.pixels, heats[j])),
                    predicted=None if flagged else self.class_names[k], top_class=self.class_names[k],
                    probabilities={n: round(float(q), 6) for n, q in zip(self.class_names, p)},
                    confidence=round(float(p[k]), 6), needs_review=bool(not flagged and p[k] < self.review_threshold),
                    not_a_leukocyte=flagged, ood_score=_finite(check["ood_score"]), ood_reason=check["ood_reason"],
                    notes=notes))
        return out
