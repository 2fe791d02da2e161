"""Predict: ``python -m leukonet.predict ckpt_path=RUN/checkpoints/last.ckpt input=FILE_OR_DIR_OR_CSV``.

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
from PIL import Image
from rich.console import Console
from rich.progress import track
from rich.table import Table
from scipy.stats import beta

from leukonet.data.cells import TRAINING_FRACTION, crop_cell, find_cells, single_cell
from leukonet.data.folder import IMAGE_EXTENSIONS, load_rgb
from leukonet.data.transforms import eval_transform
from leukonet.errors import DataError, RunExistsError, exit_on_user_error
from leukonet.inference import ood
from leukonet.inference.cell_kind import LAB_MIN_CELLS, PROFILE_KEY, CellKind
from leukonet.inference.explain import heatmaps, overlay
from leukonet.inference.tta import check_mode, tta_probabilities, views
from leukonet.train import CONF
from leukonet.training.model import CellClassifier


@dataclass
class Cell:
    """One image the model classifies: a whole crop, or a leukocyte cut out of a field."""

    file: str
    index: int | None  # the cell's number within a field; None for a single-cell image
    x: float | None
    y: float | None
    pixels: np.ndarray
    nucleus: bool | None = None  # the cell finder saw a leukocyte's nucleus in it (None: not looked yet)


def input_files(path: str | Path) -> list[Path]:
    """The image files of ``path`` (a file, or a folder searched recursively), in a stable order; or those
    listed in the ``path`` column of a CSV (a manifest, or a run's ``predictions.csv``: its test cells)."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".csv":
        return listed_files(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"input={path} does not exist")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise DataError(f"input={path} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return files


def listed_files(csv_path: Path) -> list[Path]:
    """The files a CSV names in its ``path`` column, in its order, each once. A relative path is taken from the
    CSV's folder (as in a manifest), else from the working directory (a run's ``predictions.csv`` holds the
    paths as training was given them). Files that are not there are reported by ``load_rgb``, as unreadable."""
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if "path" not in (reader.fieldnames or []):
            raise DataError(f"input={csv_path}: a CSV input needs a 'path' column (a manifest or a run's "
                            f"predictions.csv); its columns are {reader.fieldnames}")
        listed = [row["path"] for row in reader if row["path"]]
    if not listed:
        raise DataError(f"input={csv_path} lists no files")

    def resolve(p: str) -> Path:
        beside = csv_path.parent / p  # an absolute p stays itself
        return Path(p) if not beside.exists() and Path(p).exists() else beside

    return list(dict.fromkeys(resolve(p) for p in listed))


def cells_of(image: np.ndarray, file: str, fields: str) -> list[Cell]:
    """A single-cell image as it is; a field (``fields=true``, or ``auto`` and not ``single_cell``) as one crop
    per leukocyte found, those cut by the field's edge included."""
    if fields == "false":
        return [Cell(file, None, None, None, image)]
    found = find_cells(image)
    if not found or (fields == "auto" and single_cell(image, found) is not None):
        return [Cell(file, None, None, None, image, bool(found))]
    return [Cell(file, i, round(c.x, 1), round(c.y, 1), crop_cell(image, c, TRAINING_FRACTION), True)
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

    def __init__(self, ckpt_path: str | Path, precision: str = "32-true", tta: str = "none") -> None:
        ckpt_path = Path(ckpt_path)
        try:
            self.tta = check_mode(tta)  # test-time augmentation (leukonet.inference.tta): probabilities averaged over views
        except ValueError as err:
            raise DataError(str(err)) from err
        if not ckpt_path.is_file():
            raise DataError(f"ckpt_path={ckpt_path} does not exist")
        self.model = CellClassifier.from_checkpoint(ckpt_path)
        self.class_names = list(self.model.hparams.class_names)
        self.transform = eval_transform(self.model.hparams.image_size)
        self.bf16 = precision.startswith("bf16")
        self.temperature = float(self.model.temperature)  # fitted on validation after training; 1 in old checkpoints
        self.review_threshold = self.model.chosen_review_threshold()  # None in checkpoints from before calibration
        self.ood = ood.load(ckpt_path)  # feature statistics for the not-a-leukocyte check; None in older checkpoints

    def classify(self, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        """Probabilities and ``ood_score`` (``leukonet.inference.ood``; None without the checkpoint's statistics), from one
        forward pass."""
        x = torch.stack([self.transform(image=im)["image"] for im in images])
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            feats = ood.pooled(self.model, x)
            logits = self.model.head(feats).float()
            if self.tta != "none":  # the unchanged view's logits reused; the feature check reads that view only
                logits = torch.stack([logits, *(self.model(v.contiguous()).float() for v in views(x, self.tta)[1:])])
                probs = self.model.calibrated(logits).softmax(-1).mean(0).numpy()
            else:
                probs = self.model.calibrated(logits).softmax(1).numpy()
        return probs, ood.score(feats.float(), self.ood)

    def probabilities(self, images: list[np.ndarray]) -> np.ndarray:
        x = torch.stack([self.transform(image=im)["image"] for im in images])
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            return tta_probabilities(self.model, x, self.tta).numpy()


def assess(predictor, cells: list[Cell], kind_features: np.ndarray | None = None,
           lab: np.ndarray | None = None) -> tuple[np.ndarray, list[dict]]:
    """Probabilities of ``cells`` and, per cell, ``{"ood_score", "not_a_leukocyte", "ood_reason", "unfamiliar"}``
    (``leukonet.inference.ood``): flagged when the cell finder sees no nucleus or the cell-kind check
    (``predictor.cell_kind``, ``leukonet.inference.cell_kind``; skipped when None) sees something other than a leukocyte
    of the five classes, with the lab's profile ``lab`` (default: the one stored in the checkpoint by
    ``leukonet.adapt``, if any). ``unfamiliar``: the classifier's features are far from its training cells
    (another lab: a reason to adapt, not to leave the cell out); ``ood_score`` is None where that part is
    skipped (old checkpoints, ONNX models)."""
    images = [c.pixels for c in cells]
    if hasattr(predictor, "classify"):
        probs, scores = predictor.classify(images)
    else:
        probs, scores = predictor.probabilities(images), None
    nuclei = [cell.nucleus if cell.nucleus is not None else ood.has_leukocyte(cell.pixels) for cell in cells]
    kinds, check = [None] * len(cells), getattr(predictor, "cell_kind", None)  # set by load_predictor
    if check is not None:
        feats = check.features(images) if kind_features is None else kind_features
        kinds = check.kinds(feats, getattr(predictor, "lab_profile", None) if lab is None else lab)
    out = []
    for i, (nucleus, kind) in enumerate(zip(nuclei, kinds)):
        s = None if scores is None else round(float(scores[i]), 4)
        flagged, reason = ood.verdict(nucleus, kind)
        out.append({"ood_score": s, "not_a_leukocyte": flagged, "ood_reason": reason, "unfamiliar": ood.unfamiliar(s),
                    "nucleus": nucleus})
    return probs, out


def load_predictor(ckpt_path: str | Path, runtime: str = "torch", precision: str = "32-true", tta: str = "none",
                   kind_check: bool | str = "auto"):
    """``Predictor`` for a checkpoint (``runtime=torch``), ``leukonet.inference.onnx_runtime.OnnxPredictor`` for a model
    exported with ``python -m leukonet.export`` (``runtime=onnx``, ONNX Runtime on the CPU, fp32); with
    ``kind_check`` the cell-kind check (``leukonet.inference.cell_kind``) rides along as ``predictor.cell_kind`` (``auto``:
    unless the checkpoint's run was trained on synthetic drawings, which that check, knowing real cells only,
    takes for anything but leukocytes)."""
    predictor = _load_predictor(ckpt_path, runtime, precision, tta)
    predictor.cell_kind = CellKind() if wants_kind_check(kind_check, ckpt_path) else None
    predictor.lab_profile = lab_profile(ckpt_path) if runtime == "torch" else None
    return predictor


def wants_kind_check(kind_check: bool | str, ckpt_path: str | Path) -> bool:
    """The ``kind_check`` setting of predict, serve and evaluate: true, false, or auto (true unless the checkpoint's
    run trained on synthetic drawings, which the check, knowing real cells only, takes for anything but leukocytes)."""
    if str(kind_check).lower() not in ("auto", "true", "false"):
        raise DataError(f"kind_check must be auto, true or false, got {kind_check!r}")
    return trained_on_real_cells(ckpt_path) if str(kind_check).lower() == "auto" else str(kind_check).lower() == "true"


def trained_on_real_cells(ckpt_path: str | Path) -> bool:
    """False when the run the checkpoint sits in (``RUN/checkpoints/*.ckpt``, ``RUN/model.onnx``) says in its
    ``data_summary.json`` that it trained on synthetic cells; True otherwise (a checkpoint on its own included)."""
    for run in (Path(ckpt_path).parent, Path(ckpt_path).parent.parent):
        summary = run / "data_summary.json"
        if summary.is_file():
            try:
                return not json.loads(summary.read_text()).get("synthetic", False)
            except (ValueError, AttributeError):
                return True
    return True


def lab_profile(ckpt_path: str | Path) -> np.ndarray | None:
    """The lab profile ``leukonet.adapt`` stored in a checkpoint (``cell_kind.PROFILE_KEY``), or None."""
    stored = torch.load(ckpt_path, map_location="cpu", weights_only=True).get(PROFILE_KEY)
    return None if stored is None else stored.double().numpy()


def _load_predictor(ckpt_path: str | Path, runtime: str, precision: str, tta: str):
    runtime, is_onnx = str(runtime).lower(), str(ckpt_path).lower().endswith(".onnx")
    if runtime == "onnx":
        if not is_onnx:
            raise DataError(f"runtime=onnx runs an exported model: export it first (python -m leukonet.export "
                            f"ckpt_path={ckpt_path}) and give ckpt_path=RUN/model.onnx")
        if str(tta).lower() != "none":
            raise DataError(f"tta={tta} needs runtime=torch (a checkpoint); the ONNX runtime scores each image once")
        from leukonet.inference.onnx_runtime import OnnxPredictor

        return OnnxPredictor(ckpt_path)
    if runtime != "torch":
        raise DataError(f"runtime must be torch or onnx, got {runtime!r}")
    if is_onnx:
        raise DataError(f"ckpt_path={ckpt_path} is an ONNX model: add runtime=onnx")
    return Predictor(ckpt_path, precision, tta)


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


def _save_heatmaps(model: CellClassifier, batch: list[Cell], classes: list[int], folder: Path, used: set[str]) -> list[str]:
    """Grad-CAM overlay of each cell's predicted class as ``folder/<file stem>[_cell<k>].png`` (``-2``, ``-3``, ...
    appended when files in different folders share a stem); returns the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for cell, heat in zip(batch, heatmaps(model, [c.pixels for c in batch], classes)):
        base = Path(cell.file).stem + ("" if cell.index is None else f"_cell{cell.index}")
        name, n = base, 1
        while name in used:
            n += 1
            name = f"{base}-{n}"
        used.add(name)
        Image.fromarray(overlay(cell.pixels, heat)).save(folder / f"{name}.png")
        paths.append(str(folder / f"{name}.png"))
    return paths


FALLBACK_REVIEW_THRESHOLD = 0.9  # for checkpoints from before calibration, which hold no threshold


def _review_threshold(configured: float | None, predictor: Predictor) -> tuple[float, str]:
    """The threshold below which a cell is flagged, and where it comes from: a number given on the command
    line, else the checkpoint's (chosen on validation), else 0.9 for checkpoints that hold none."""
    if configured is not None:
        return float(configured), "config"
    if predictor.review_threshold is not None:
        return predictor.review_threshold, "checkpoint"
    return FALLBACK_REVIEW_THRESHOLD, "default (the checkpoint holds none)"


def predict(cfg: DictConfig) -> dict:
    """Classify every cell of ``cfg.input``; write the per-cell CSV and the differential count."""
    if str(cfg.fields).lower() not in ("auto", "true", "false"):  # fields=false on the command line is a bool
        raise DataError(f"fields must be auto, true or false, got {cfg.fields!r}")
    out_dir = Path(cfg.paths.output_dir)
    csv_path = Path(cfg.output) if cfg.output else out_dir / "predictions.csv"
    if csv_path.exists():
        raise RunExistsError(f"{csv_path} exists; choose another output=... or hydra.run.dir=...")
    runtime = str(cfg.get("runtime", "torch")).lower()
    if runtime == "onnx" and cfg.get("explain", False):
        raise DataError("explain=true needs runtime=torch: Grad-CAM takes gradients of the PyTorch model")
    predictor = load_predictor(cfg.ckpt_path, runtime, cfg.precision, cfg.get("tta", "none"),
                               cfg.get("kind_check", "auto"))
    threshold, threshold_from = _review_threshold(cfg.get("review_threshold"), predictor)
    names = predictor.class_names
    files = input_files(cfg.input)
    unreadable: list[dict] = []
    rows = []
    explain, used = bool(cfg.get("explain", False)), set()
    assessed = []  # per batch: where each cell is, probabilities, checks, cell-kind features, heat maps
    for batch in _batches(files, str(cfg.fields).lower(), cfg.batch_size, unreadable, cfg.progress):
        feats = predictor.cell_kind.features([c.pixels for c in batch]) if predictor.cell_kind is not None else None
        probs, checks = assess(predictor, batch, feats)
        heat = (_save_heatmaps(predictor.model, batch, probs.argmax(1).tolist(), csv_path.parent / "heatmaps", used)
                if explain else [None] * len(batch))
        where = [(c.file, c.index, c.x, c.y) for c in batch]  # not the pixels: a run can hold thousands of cells
        assessed.append((where, probs, checks, feats, heat))
    profile_from = _lab_profile_of_run(predictor, assessed)
    for where, probs, checks, _, heat in assessed:
        for (file, index, x, y), p, heat_png, check in zip(where, probs, heat, checks):
            k, flagged = int(p.argmax()), check["not_a_leukocyte"]
            # a flagged input gets no class and is not counted; needs_review is for the leukocytes
            rows.append({"file": file, "cell": "" if index is None else index,
                         "x": "" if x is None else x, "y": "" if y is None else y,
                         "predicted": "" if flagged else names[k], **{f"p_{n}": round(float(q), 6) for n, q in zip(names, p)},
                         "confidence": round(float(p[k]), 6), "needs_review": bool(not flagged and p[k] < threshold),
                         "not_a_leukocyte": flagged, "ood_score": "" if check["ood_score"] is None else check["ood_score"],
                         "ood_reason": check["ood_reason"], "unfamiliar": check["unfamiliar"]})
            if explain:
                rows[-1]["heatmap"] = heat_png
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file", "cell", "x", "y", "predicted", *(f"p_{n}" for n in names),
                                               "confidence", "needs_review", "not_a_leukocyte", "ood_score", "ood_reason",
                                               "unfamiliar"] + (["heatmap"] if explain else []))
        writer.writeheader()
        writer.writerows(rows)
    count = differential([r["predicted"] for r in rows if not r["not_a_leukocyte"]], names)
    summary = {"input": str(cfg.input), "checkpoint": str(cfg.ckpt_path), "runtime": runtime,
               "tta": getattr(predictor, "tta", "none"), "files": len(files), "cells": len(rows),
               "needs_review": sum(r["needs_review"] for r in rows), "review_threshold": threshold,
               "not_a_leukocyte": sum(r["not_a_leukocyte"] for r in rows),
               "unfamiliar": sum(r["unfamiliar"] and not r["not_a_leukocyte"] for r in rows),
               "ood_check": "cell finder" + (" and cell-kind check" if predictor.cell_kind is not None else "")
                            + ("; feature distance (unfamiliar)" if getattr(predictor, "ood", None) is not None else ""),
               "review_threshold_from": threshold_from, "temperature": predictor.temperature,
               "lab_profile": profile_from,
               "differential": count, "unreadable": unreadable, "predictions": str(csv_path)}
    (csv_path.parent / "differential.json").write_text(json.dumps(summary, indent=2) + "\n")
    _print(summary)
    return summary


def _lab_profile_of_run(predictor, assessed: list) -> str:
    """Re-check the cells' kinds against this run's own lab profile (the median cell-kind features of the cells
    with a nucleus) when it has at least ``LAB_MIN_CELLS`` of them: a run is one lab's slides, and its own
    profile is closer than any stored one. Updates the checks in place; returns where the profile came from."""
    if predictor.cell_kind is None:
        return "none (kind_check=false)"
    feats = [f[i] for _, _, checks, f, _ in assessed for i, c in enumerate(checks) if c["nucleus"]]
    if len(feats) < LAB_MIN_CELLS:
        return ("checkpoint (leukonet.adapt)" if predictor.lab_profile is not None else "none") + \
            f" (fewer than {LAB_MIN_CELLS} cells with a nucleus in this run)"
    lab = predictor.cell_kind.profile(np.stack(feats))
    for _, _, checks, f, _ in assessed:
        kinds = predictor.cell_kind.kinds(f, lab)
        for check, kind in zip(checks, kinds):
            check["not_a_leukocyte"], check["ood_reason"] = ood.verdict(check["nucleus"], kind)
    return f"this run's {len(feats)} cells with a nucleus"


def _print(summary: dict) -> None:
    table = Table(title=f"Differential count: {summary['cells'] - summary['not_a_leukocyte']} cells from "
                        f"{summary['files']} files ({summary['needs_review']} flagged for review; "
                        f"{summary['not_a_leukocyte']} inputs not leukocytes, not counted)")
    for col in ("class", "cells", "%", "95 % CI"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for r in summary["differential"]:
        pct = "—" if r["percent"] is None else f"{r['percent']:.1f}"
        ci = "—" if r["percent"] is None else f"{r['ci95_low']:.1f}–{r['ci95_high']:.1f}"
        table.add_row(r["class"], str(r["cells"]), pct, ci)
    console = Console()
    console.print(table)
    console.print(f"needs_review: confidence below {summary['review_threshold']:.4g} "
                  f"({summary['review_threshold_from']}); temperature {summary['temperature']:.4g}")
    console.print(f"not_a_leukocyte: {summary['not_a_leukocyte']} of {summary['cells']} inputs "
                  f"({summary['ood_check']})")
    if summary["unfamiliar"]:
        console.print(f"[yellow]unfamiliar[/yellow]: {summary['unfamiliar']} counted cells look unlike the training lab's "
                      "(another stain or camera): label a few dozen and adapt (python -m leukonet.adapt)")
    for u in summary["unreadable"]:
        console.print(f"[yellow]skipped[/yellow] {u['reason']}")
    console.print(f"per-cell predictions: {summary['predictions']}")


@hydra.main(version_base="1.3", config_path=CONF, config_name="predict")
def main(cfg: DictConfig) -> None:
    exit_on_user_error(lambda: predict(cfg))


if __name__ == "__main__":
    main()
