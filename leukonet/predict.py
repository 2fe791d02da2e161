"""Predict: ``python -m leukonet.predict ckpt_path=RUN/checkpoints/last.ckpt input=FILE_OR_DIR``.

A lab engineer's path: run a trained model over today's images, get one row per cell (class, the
five probabilities, confidence, whether a person should look at it) and the differential count with
95 % confidence intervals, as hematology reports a 100- or 200-cell count. Single-cell crops are
classified as they are; whole fields go through the cell finder (``leukonet.data.cells``) and each
leukocyte found is cropped at the training scale. Unreadable files are listed, never fatal.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from rich.console import Console
from rich.progress import track
from rich.table import Table
from scipy.stats import beta

from leukonet.data.cells import TRAINING_FRACTION, crop_cell, find_cells
from leukonet.data.folder import IMAGE_EXTENSIONS, load_rgb
from leukonet.data.transforms import eval_transform
from leukonet.errors import DataError, RunExistsError, exit_on_user_error
from leukonet.model import CellClassifier
from leukonet.train import CONF


@dataclass
class Cell:
    """One image the model classifies: a whole crop, or a leukocyte cut out of a field."""

    file: str
    index: int | None  # the cell's number within a field; None for a single-cell image
    x: float | None
    y: float | None
    pixels: np.ndarray


def input_files(path: str | Path) -> list[Path]:
    """The image files of ``path`` (a file, or a folder searched recursively), in a stable order."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"input={path} does not exist")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise DataError(f"input={path} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return files


def is_field(image: np.ndarray, found: list) -> bool:
    """A whole field rather than a single-cell crop: several leukocytes, or one that is much smaller than
    in a training crop or far from the centre (crops are centred on their cell)."""
    if len(found) != 1:
        return len(found) > 1
    (c,) = found
    h, w = image.shape[:2]
    off_centre = np.hypot(c.x - w / 2, c.y - h / 2) > 0.25 * min(h, w)
    return 2 * c.radius / min(h, w) < 0.6 * TRAINING_FRACTION or off_centre


def cells_of(image: np.ndarray, file: str, fields: str) -> list[Cell]:
    """A single-cell image as it is; a field (``fields=true``, or ``auto`` and ``is_field``) as one crop
    per leukocyte found."""
    if fields == "false":
        return [Cell(file, None, None, None, image)]
    found = find_cells(image)
    if not found or (fields == "auto" and not is_field(image, found)):
        return [Cell(file, None, None, None, image)]
    return [Cell(file, i, round(c.x, 1), round(c.y, 1), crop_cell(image, c, TRAINING_FRACTION))
            for i, c in enumerate(found)]


def differential(labels: list[str], class_names: list[str], confidence: float = 0.95) -> list[dict]:
    """Cells and per cent per class with a Clopper-Pearson (exact binomial) interval, as in Rümke's tables."""
    n, alpha = len(labels), 1 - confidence
    rows = []
    for name in class_names:
        k = labels.count(name)
        low = float(beta.ppf(alpha / 2, k, n - k + 1)) if k > 0 else 0.0
        high = float(beta.ppf(1 - alpha / 2, k + 1, n - k)) if k < n else 1.0
        rows.append({"class": name, "cells": k, "percent": 100 * k / n if n else None,
                     "ci95_low": 100 * low if n else None, "ci95_high": 100 * high if n else None})
    return rows


class Predictor:
    """A checkpoint's model with its preprocessing: uint8 RGB images in, class probabilities out."""

    def __init__(self, ckpt_path: str | Path, precision: str = "32-true") -> None:
        ckpt_path = Path(ckpt_path)
        if not ckpt_path.is_file():
            raise DataError(f"ckpt_path={ckpt_path} does not exist")
        self.model = CellClassifier.from_checkpoint(ckpt_path)
        self.class_names = list(self.model.hparams.class_names)
        self.transform = eval_transform(self.model.hparams.image_size)
        self.bf16 = precision.startswith("bf16")

    def probabilities(self, images: list[np.ndarray]) -> np.ndarray:
        x = torch.stack([self.transform(image=im)["image"] for im in images])
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            return self.model(x).float().softmax(1).numpy()


def _batches(files: list[Path], fields: str, batch_size: int, unreadable: list[dict], progress: bool) -> Iterator[list[Cell]]:
    batch: list[Cell] = []
    for path in track(files, description="predicting", disable=not progress or len(files) < 20, transient=True):
        try:
            image = load_rgb(path)
        except ValueError as err:
            unreadable.append({"file": str(path), "reason": str(err)})
            continue
        batch += cells_of(image, str(path), fields)
        while len(batch) >= batch_size:
            yield batch[:batch_size]
            batch = batch[batch_size:]
    if batch:
        yield batch


def predict(cfg: DictConfig) -> dict:
    """Classify every cell of ``cfg.input``; write the per-cell CSV and the differential count."""
    if cfg.fields not in ("auto", "true", "false"):
        raise DataError(f"fields must be auto, true or false, got {cfg.fields!r}")
    out_dir = Path(cfg.paths.output_dir)
    csv_path = Path(cfg.output) if cfg.output else out_dir / "predictions.csv"
    if csv_path.exists():
        raise RunExistsError(f"{csv_path} exists; choose another output=... or hydra.run.dir=...")
    predictor = Predictor(cfg.ckpt_path, cfg.precision)
    names = predictor.class_names
    files = input_files(cfg.input)
    unreadable: list[dict] = []
    rows = []
    for batch in _batches(files, str(cfg.fields).lower(), cfg.batch_size, unreadable, cfg.progress):
        for cell, p in zip(batch, predictor.probabilities([c.pixels for c in batch])):
            k = int(p.argmax())
            rows.append({"file": cell.file, "cell": "" if cell.index is None else cell.index,
                         "x": "" if cell.x is None else cell.x, "y": "" if cell.y is None else cell.y,
                         "predicted": names[k], **{f"p_{n}": round(float(q), 6) for n, q in zip(names, p)},
                         "confidence": round(float(p[k]), 6), "needs_review": bool(p[k] < cfg.review_threshold)})
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file", "cell", "x", "y", "predicted", *(f"p_{n}" for n in names),
                                               "confidence", "needs_review"])
        writer.writeheader()
        writer.writerows(rows)
    count = differential([r["predicted"] for r in rows], names)
    summary = {"input": str(cfg.input), "checkpoint": str(cfg.ckpt_path), "files": len(files), "cells": len(rows),
               "needs_review": sum(r["needs_review"] for r in rows), "review_threshold": cfg.review_threshold,
               "differential": count, "unreadable": unreadable, "predictions": str(csv_path)}
    (csv_path.parent / "differential.json").write_text(json.dumps(summary, indent=2) + "\n")
    _print(summary)
    return summary


def _print(summary: dict) -> None:
    table = Table(title=f"Differential count: {summary['cells']} cells from {summary['files']} files "
                        f"({summary['needs_review']} flagged for review)")
    for col in ("class", "cells", "%", "95 % CI"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for r in summary["differential"]:
        pct = "—" if r["percent"] is None else f"{r['percent']:.1f}"
        ci = "—" if r["percent"] is None else f"{r['ci95_low']:.1f}–{r['ci95_high']:.1f}"
        table.add_row(r["class"], str(r["cells"]), pct, ci)
    console = Console()
    console.print(table)
    for u in summary["unreadable"]:
        console.print(f"[yellow]skipped[/yellow] {u['reason']}")
    console.print(f"per-cell predictions: {summary['predictions']}")


@hydra.main(version_base="1.3", config_path=CONF, config_name="predict")
def main(cfg: DictConfig) -> None:
    exit_on_user_error(lambda: predict(cfg))


if __name__ == "__main__":
    main()
