"""Turn predictions on one dataset into the files a hematology researcher reads.

The same report is written at the end of training and by ``evaluate`` on any
folder (e.g. an external dataset), so results from different runs and datasets
can be compared file by file: ``metrics.json`` for machines, ``report.md`` and
the PNG figures for people, ``predictions.csv`` for re-analysis.

Metrics come from torchmetrics' functional API so they match what is logged
during training. Where a per-class metric is undefined (recall of a class absent
from the dataset, precision of a class never predicted) it is ``null`` in JSON
and ``—`` in the tables, never NaN. Averages follow sklearn's
``classification_report`` conventions: macro averages skip only classes that
appear neither in the labels nor in the predictions; balanced accuracy is the
mean recall over classes present in the labels.
"""

from __future__ import annotations

import csv
import json
import math
import textwrap
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
)

from leukonet.inference.calibration import (
    N_BINS,
    apply_temperature,
    expected_calibration_error,
    reliability_bins,
    retained,
    risk_coverage,
)

DPI = 120
THUMB_PX = 150  # gallery images are shrunk to about their on-figure size, which keeps the PNG small
GALLERY_COLS = 8
TOP_CONFUSIONS = 10
_HISTORY_COLUMNS = {"train_loss": "train/loss", "val_loss": "val/loss", "val_acc": "val/acc"}
_PHASE_COLORS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52")
RELIABILITY_PNG, RISK_COVERAGE_PNG = "reliability_diagram.png", "risk_coverage.png"


# --------------------------------------------------------------------------- metrics


def compute_metrics(y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str]) -> dict:
    """Accuracy, balanced accuracy, macro/weighted F1, per-class table and confusion matrix.

    ``y_true`` holds class indices (N,), ``probs`` class probabilities (N, C); the
    prediction is the argmax. The result is JSON-able (plain floats, None for undefined).
    """
    target, preds, num_classes = _validated(y_true, probs, class_names)
    kw: dict[str, Any] = {"num_classes": num_classes, "validate_args": False}
    precision = multiclass_precision(preds, target, average=None, **kw)
    recall = multiclass_recall(preds, target, average=None, **kw)
    f1 = multiclass_f1_score(preds, target, average=None, **kw)
    cm = multiclass_confusion_matrix(preds, target, **kw)

    support = cm.sum(dim=1)
    predicted = cm.sum(dim=0)
    tp = cm.diagonal()
    present = support > 0
    per_class = {
        name: {
            "precision": _float(precision[i]) if predicted[i] > 0 else None,
            "recall": _float(recall[i]) if present[i] else None,
            "f1": _float(f1[i]) if support[i] + predicted[i] - tp[i] > 0 else None,
            "support": int(support[i]),
        }
        for i, name in enumerate(class_names)
    }
    return {
        "n": int(target.numel()),
        "accuracy": _float(multiclass_accuracy(preds, target, average="micro", **kw)),
        "balanced_accuracy": _float(recall[present].mean()),
        "macro_precision": _float(multiclass_precision(preds, target, average="macro", **kw)),
        "macro_recall": _float(multiclass_recall(preds, target, average="macro", **kw)),
        "macro_f1": _float(multiclass_f1_score(preds, target, average="macro", **kw)),
        "weighted_precision": _float(multiclass_precision(preds, target, average="weighted", **kw)),
        "weighted_recall": _float(multiclass_recall(preds, target, average="weighted", **kw)),
        "weighted_f1": _float(multiclass_f1_score(preds, target, average="weighted", **kw)),
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
        "class_names": list(class_names),
    }


def _validated(
    y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Check shapes and label range; return (target, argmax preds, number of classes)."""
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    num_classes = len(class_names)
    if y.ndim != 1 or y.size == 0:
        raise ValueError(f"y_true must be a non-empty 1-D array, got shape {y.shape}")
    if p.shape != (y.size, num_classes):
        raise ValueError(f"probs must have shape ({y.size}, {num_classes}), got {p.shape}")
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"y_true holds labels outside 0..{num_classes - 1}")
    return torch.as_tensor(y, dtype=torch.long), torch.as_tensor(p.argmax(axis=1)), num_classes


def _float(x: torch.Tensor | float) -> float | None:
    """Plain Python float rounded to 6 decimals (torchmetrics returns float32), or None for NaN/inf."""
    value = float(x)
    return round(value, 6) if math.isfinite(value) else None


# --------------------------------------------------------------------------- history


def read_history(metrics_csv: str | Path) -> list[dict]:
    """Per-epoch rows {epoch, phase, train_loss, val_loss, val_acc} from a CSVLogger metrics.csv.

    Rows are merged by epoch (values logged several times in an epoch, e.g. per step,
    are averaged; the phase is the last one logged). Missing values are None.
    """
    groups: dict[int, dict[str, list[float]]] = {}
    with open(metrics_csv, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            if not row.get("epoch"):
                continue
            group = groups.setdefault(int(float(row["epoch"])), defaultdict(list))
            for key, column in {"phase": "phase", **_HISTORY_COLUMNS}.items():
                # with on_step and on_epoch both set, Lightning suffixes the epoch value
                cell = row.get(column) or row.get(f"{column}_epoch")
                if cell:
                    group[key].append(float(cell))

    history = []
    for epoch, group in sorted(groups.items()):
        entry: dict[str, Any] = {"epoch": epoch, "phase": int(group["phase"][-1]) if group["phase"] else None}
        for key in _HISTORY_COLUMNS:
            entry[key] = float(np.mean(group[key])) if group[key] else None
        history.append(entry)
    return history


# --------------------------------------------------------------------------- report


def write_report(
    out_dir: str | Path,
    *,
    title: str,
    y_true: np.ndarray,
    probs: np.ndarray,
    paths: Sequence[str],
    class_names: Sequence[str],
    history: list[dict] | None = None,
    extra: dict | None = None,
    gallery_size: int = 48,
    explain: Callable[[np.ndarray, int], np.ndarray] | None = None,
    calibration: dict | None = None,
) -> dict:
    """Write metrics.json, predictions.csv, figures and report.md into ``out_dir``; return the metrics.

    ``explain(image, class_index) -> RGB overlay`` (e.g. ``leukonet.inference.explain.explainer(model)``): the gallery
    shows each misclassified cell beside its heat map for the predicted class.

    ``calibration`` (``temperature``, ``review_threshold`` or None, optionally ``validation``: what
    ``leukonet.inference.calibration.calibrate`` found there): ``probs`` are the model's uncalibrated probabilities; the
    report's probabilities and confidences are the temperature-scaled ones, and it adds the expected calibration
    error before and after, the coverage at the review threshold, a reliability diagram and a risk-coverage curve.
    ``calibration["probs"]``, when given, are the calibrated probabilities to use instead of tempering ``probs``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    y = np.asarray(y_true).astype(int)
    p = np.asarray(probs, dtype=np.float64)
    if len(paths) != len(y):
        raise ValueError(f"got {len(paths)} paths for {len(y)} predictions")
    extra = dict(extra or {})
    p_before = p
    if calibration is not None:
        # "probs": the calibrated probabilities when they are not softmax(z / T) of one set of logits z (e.g. the
        # mean over test-time augmentations of each view's calibrated probabilities, leukonet.inference.tta)
        given = calibration.get("probs")
        p = np.asarray(given, dtype=np.float64) if given is not None else apply_temperature(p, calibration.get("temperature") or 1.0)
    metrics = compute_metrics(y, p, class_names)
    if calibration is not None:
        metrics.update(calibration_metrics(y, p_before, p, calibration))
    if clash := sorted(set(extra) & {"title", *metrics}):
        raise ValueError(f"extra would overwrite computed entries: {clash}")
    metrics = {"title": title, **metrics, **_jsonable(extra)}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=False, ensure_ascii=False) + "\n",
                                      encoding="utf-8")

    pred = p.argmax(axis=1)
    conf = p.max(axis=1)
    _write_predictions(out / "predictions.csv", paths, y, pred, conf, p, class_names)
    plot_confusion(out / "confusion_matrix.png", np.array(metrics["confusion_matrix"]), class_names)
    plot_per_class(out / "per_class_metrics.png", metrics["per_class"])

    # Remove figures a previous report in the same folder may have left, so none contradicts this one.
    loss_png, gallery_png = out / "loss_curves.png", out / "misclassified.png"
    loss_png.unlink(missing_ok=True)
    gallery_png.unlink(missing_ok=True)
    for png in (RELIABILITY_PNG, RISK_COVERAGE_PNG):
        (out / png).unlink(missing_ok=True)
    if calibration is not None:
        plot_reliability(out / RELIABILITY_PNG, p_before, p, y, metrics["temperature"])
        plot_risk_coverage(out / RISK_COVERAGE_PNG, p, y, metrics["review_threshold"],
                           (calibration.get("validation") or {}).get("target_accuracy"))
    if history:
        plot_history(loss_png, history)

    wrong = np.flatnonzero(pred != y)
    wrong = wrong[np.argsort(-conf[wrong], kind="stable")]
    shown = wrong[:gallery_size]
    overlays = None
    if len(shown):
        tiles = [(paths[i], f"{class_names[y[i]]} →\n{class_names[pred[i]]} ({conf[i]:.0%})") for i in shown]
        overlays = _overlays(explain, [paths[i] for i in shown], [int(pred[i]) for i in shown]) if explain else None
        plot_gallery(gallery_png, tiles, overlays)

    md = _markdown(metrics, extra, has_history=bool(history), n_wrong=len(wrong), n_shown=len(shown),
                   explained=overlays is not None, calibrated=calibration is not None)
    (out / "report.md").write_text(md, encoding="utf-8")
    return metrics


def calibration_metrics(y: np.ndarray, before: np.ndarray, after: np.ndarray, calibration: dict) -> dict:
    """ECE (15 bins) before and after temperature scaling, and the cells kept at the review threshold."""
    threshold = calibration.get("review_threshold")
    kept = retained(after, y, threshold) if threshold is not None else {"coverage": None, "accuracy": None}
    out = {
        "ece_before": _float(expected_calibration_error(before, y)),
        "ece_after": _float(expected_calibration_error(after, y)),
        "temperature": _float(calibration.get("temperature") or 1.0),
        "review_threshold": None if threshold is None else _float(threshold),
        "coverage_at_threshold": None if kept["coverage"] is None else _float(kept["coverage"]),
        "accuracy_of_retained": None if kept["accuracy"] is None else _float(kept["accuracy"]),
    }
    if calibration.get("validation"):
        out["calibration_fit"] = {"split": "val", **{k: _float(v) if isinstance(v, float) else v
                                                     for k, v in calibration["validation"].items()}}
    return out


def _jsonable(value: Any) -> Any:
    """Recursively convert numpy/Path/NaN values into what ``json.dumps(allow_nan=False)`` accepts."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)


def _write_predictions(
    path: Path,
    paths: Sequence[str],
    y: np.ndarray,
    pred: np.ndarray,
    conf: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
) -> None:
    """One row per image: path, true and predicted class, confidence, correct (1/0), probabilities."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        header = ["path", "true", "predicted", "confidence", "correct", *(f"prob_{c}" for c in class_names)]
        writer.writerow(header)
        for i, image_path in enumerate(paths):
            writer.writerow(
                [
                    str(image_path),
                    class_names[y[i]],
                    class_names[pred[i]],
                    f"{conf[i]:.6f}",
                    int(pred[i] == y[i]),
                    *(f"{v:.6f}" for v in probs[i]),
                ]
            )


# --------------------------------------------------------------------------- figures


def _save(fig: Figure, path: Path) -> None:
    """Save a figure at the report DPI, then clear it (a bare Figure is not tracked by pyplot, so no close)."""
    fig.savefig(path, dpi=DPI)
    fig.clear()


def plot_confusion(path: Path, cm: np.ndarray, class_names: Sequence[str]) -> None:
    """Two panels: raw counts and row-normalised (recall per true class)."""
    n = len(class_names)
    side = 1.6 + 0.75 * n
    fig = Figure(figsize=(2 * side + 1.6, side), layout="constrained")
    ax_counts, ax_norm = fig.subplots(1, 2)
    support = cm.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = np.where(support > 0, cm / support, np.nan)

    panels = (
        (ax_counts, cm.astype(float), "Counts", lambda v: f"{int(v)}", max(cm.max(), 1)),
        (ax_norm, norm, "Row-normalised (recall)", lambda v: f"{v:.2f}", 1.0),
    )
    for ax, values, heading, fmt, vmax in panels:
        image = ax.imshow(np.ma.masked_invalid(values), cmap="Blues", vmin=0, vmax=vmax)
        fig.colorbar(image, ax=ax, shrink=0.75)
        ax.set_title(heading)
        ax.set_xticks(range(n), class_names, rotation=35, ha="right", rotation_mode="anchor")
        ax.set_yticks(range(n), class_names)
        ax.set_xlabel("Predicted")
        ax.set_ylabel("True")
        for r in range(n):
            for c in range(n):
                v = values[r, c]
                label = "—" if np.isnan(v) else fmt(v)
                dark = not np.isnan(v) and v > 0.55 * vmax
                ax.text(c, r, label, ha="center", va="center", fontsize=9, color="white" if dark else "black")
    _save(fig, path)


def plot_per_class(path: Path, per_class: dict[str, dict]) -> None:
    """Grouped precision/recall/F1 bars per class with value labels; undefined values marked n/a."""
    names = list(per_class)
    x = np.arange(len(names))
    width = 0.27
    fig = Figure(figsize=(max(6.0, 1.5 * len(names) + 1.5), 4.2), layout="constrained")
    ax = fig.subplots()
    for k, (metric, label) in enumerate((("precision", "Precision"), ("recall", "Recall"), ("f1", "F1"))):
        values = [per_class[name][metric] for name in names]
        xs = x + (k - 1) * width
        bars = ax.bar(xs, [v or 0.0 for v in values], width, label=label)
        for xi, bar, v in zip(xs, bars, values):
            ax.text(xi, bar.get_height() + 0.01, "n/a" if v is None else f"{v:.2f}",
                    ha="center", va="bottom", fontsize=7.5)
    ax.set_xticks(x, [f"{name}\n(n={per_class[name]['support']})" for name in names])
    ax.set_ylim(0, 1.08)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel("Score")
    ax.set_title("Per-class metrics", pad=24)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(loc="lower center", ncols=3, frameon=False, bbox_to_anchor=(0.5, 1.0))
    _save(fig, path)


def plot_history(path: Path, history: list[dict]) -> None:
    """Train/val loss and val accuracy per epoch, with training phases shaded and their boundary dashed."""
    epochs = np.array([h["epoch"] + 1 for h in history])  # Lightning counts from 0
    fig = Figure(figsize=(8, 6), layout="constrained")
    ax_loss, ax_acc = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))

    def series(ax: Axes, key: str, label: str, style: str) -> None:
        pts = [(e, h[key]) for e, h in zip(epochs, history) if h.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), style, label=label, markersize=3)

    series(ax_loss, "train_loss", "train loss", "o-")
    series(ax_loss, "val_loss", "val loss", "s-")
    series(ax_acc, "val_acc", "val accuracy", "s-")

    # Runs of consecutive epochs sharing a phase.
    runs: list[tuple[Any, int, int]] = []
    for e, h in zip(epochs, history):
        if runs and runs[-1][0] == h.get("phase"):
            runs[-1] = (runs[-1][0], runs[-1][1], e)
        else:
            runs.append((h.get("phase"), e, e))
    for k, (phase, start, end) in enumerate(runs):
        if phase is None:
            continue
        color = _PHASE_COLORS[k % len(_PHASE_COLORS)]
        for ax in (ax_loss, ax_acc):
            ax.axvspan(start - 0.5, end + 0.5, color=color, alpha=0.08, lw=0)
        ax_loss.text((start + end) / 2, 1.0, f"phase {phase}", transform=ax_loss.get_xaxis_transform(),
                     ha="center", va="bottom", fontsize=9, color=color, fontweight="bold")
        if k > 0:
            for ax in (ax_loss, ax_acc):
                ax.axvline(start - 0.5, color="0.3", ls="--", lw=1)
            ax_loss.text(start - 0.4, 0.97, f"phase {phase} starts\n(epoch {start})",
                         transform=ax_loss.get_xaxis_transform(), ha="left", va="top", fontsize=8, color="0.3")

    for ax, ylabel, legend_loc in ((ax_loss, "Loss", "upper right"), (ax_acc, "Val accuracy", "lower right")):
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc=legend_loc)
    ax_acc.set_xlabel("Epoch")
    ax_acc.set_xlim(epochs.min() - 0.5, epochs.max() + 0.5)
    ax_acc.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax_loss.set_title("Training history", pad=18)
    _save(fig, path)


def plot_reliability(path: Path, before: np.ndarray, after: np.ndarray, y: np.ndarray, temperature: float) -> None:
    """Reliability diagrams before and after temperature scaling: accuracy per confidence bin against the
    diagonal of perfect calibration, the gap shaded, the bin's share of cells below."""
    fig = Figure(figsize=(9.5, 5.2), layout="constrained")
    axes = fig.subplots(2, 2, sharex=True, height_ratios=(3, 1))
    for col, (probs, heading) in enumerate(((before, "before (T = 1)"), (after, f"after (T = {temperature:.3g})"))):
        ax, ax_n = axes[0, col], axes[1, col]
        b = reliability_bins(probs, y)
        centres, width = (b["edges"][:-1] + b["edges"][1:]) / 2, 1 / N_BINS
        has = b["count"] > 0
        ax.bar(centres[has], b["accuracy"][has], width, color="#4c72b0", edgecolor="white", label="accuracy")
        ax.bar(centres[has], b["confidence"][has] - b["accuracy"][has], width, bottom=b["accuracy"][has],
               color="#c44e52", alpha=0.3, edgecolor="#c44e52", label="gap to confidence")
        ax.plot([0, 1], [0, 1], "--", color="0.3", lw=1, label="perfectly calibrated")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_ylabel("Accuracy")
        ax.set_title(f"{heading}: ECE {expected_calibration_error(probs, y):.4f}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
        ax_n.bar(centres, b["count"] / max(1, b["count"].sum()), width, color="0.55", edgecolor="white")
        ax_n.set_xlabel("Confidence (top probability)")
        ax_n.set_ylabel("Share")
        ax_n.grid(alpha=0.3)
    fig.suptitle(f"Reliability diagram ({N_BINS} bins)", fontsize=11)
    _save(fig, path)


def plot_risk_coverage(path: Path, probs: np.ndarray, y: np.ndarray, threshold: float | None,
                       target_accuracy: float | None = None) -> None:
    """Error rate of the cells kept against the share kept, most confident first; the review threshold marked."""
    coverage, risk = risk_coverage(probs, y)
    fig = Figure(figsize=(6.5, 4.5), layout="constrained")
    ax = fig.subplots()
    ax.plot(np.r_[0, coverage], np.r_[risk[0], risk], "-", color="#4c72b0", lw=1.5, drawstyle="steps-pre",
            label="cells kept by calibrated confidence")
    if target_accuracy is not None:
        ax.axhline(1 - target_accuracy, color="#55a868", ls=":", lw=1, label=f"target error {1 - target_accuracy:.2%}")
    if threshold is not None:
        kept = retained(probs, y, threshold)
        err = None if kept["accuracy"] is None else 1 - kept["accuracy"]
        ax.axvline(kept["coverage"], color="#c44e52", ls="--", lw=1.2, label="review threshold")
        if err is not None:
            ax.plot([kept["coverage"]], [err], "o", color="#c44e52")
        ax.text(kept["coverage"], 0.98, f" review threshold {threshold:.3f}\n coverage {kept['coverage']:.1%}"
                + ("" if err is None else f", error {err:.2%}"), transform=ax.get_xaxis_transform(),
                ha="left" if kept["coverage"] < 0.6 else "right", va="top", fontsize=8, color="#c44e52")
    ax.set_xlim(0, 1.01)
    ax.set_ylim(0, max(0.05, float(risk.max()) * 1.1))
    ax.set_xlabel("Coverage (share of cells kept, most confident first)")
    ax.set_ylabel("Error rate of the cells kept")
    ax.set_title("Risk-coverage curve", pad=14)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    _save(fig, path)


def _thumbnail(image_path: str) -> np.ndarray | None:
    """Small RGB array of an image, or None if it cannot be read."""
    try:
        with Image.open(image_path) as img:
            img = img.convert("RGB")
            img.thumbnail((THUMB_PX, THUMB_PX))
            return np.asarray(img)
    except (OSError, ValueError):
        return None


def _overlays(explain: Callable[[np.ndarray, int], np.ndarray], paths: Sequence[str], classes: Sequence[int]) -> list | None:
    """``explain``'s overlay for each image (None where the image cannot be read); None if explaining fails."""
    from leukonet.data.folder import load_rgb

    out: list[np.ndarray | None] = []
    for image_path, k in zip(paths, classes):
        try:
            image = load_rgb(image_path)
        except ValueError:
            out.append(None)
            continue
        try:
            out.append(explain(image, k))
        except Exception as err:  # noqa: BLE001 - a heat map is never worth losing the report
            warnings.warn(f"misclassified.png without heat maps: {type(err).__name__}: {err}", stacklevel=2)
            return None
    return out


def plot_gallery(path: Path, tiles: list[tuple[str, str]], overlays: Sequence[np.ndarray | None] | None = None,
                 title: str = "Misclassified, most confident first:\ntrue → predicted (confidence)") -> None:
    """Grid of images with two-line titles; unreadable images become a grey placeholder. With ``overlays``
    (one per tile, RGB), each image is shown beside its overlay."""
    pair = overlays is not None
    cols = max(4, min(GALLERY_COLS, len(tiles))) // (2 if pair else 1)  # wide enough for the title
    rows = math.ceil(len(tiles) / cols)
    fig = Figure(figsize=(1.35 * cols * (2 if pair else 1), 1.65 * rows + 0.45), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes:
        ax.axis("off")
    for t, (ax, (image_path, label)) in enumerate(zip(axes, tiles)):
        thumb = _thumbnail(image_path)
        if thumb is not None and pair and overlays[t] is not None:
            h, w = thumb.shape[:2]
            heat = np.asarray(Image.fromarray(overlays[t]).resize((w, h), Image.Resampling.BILINEAR))
            thumb = np.concatenate([thumb, np.full((h, max(2, w // 30), 3), 255, np.uint8), heat], axis=1)
        if thumb is None:
            ax.imshow(np.full((8, 8), 0.85), cmap="gray", vmin=0, vmax=1)
            ax.text(3.5, 3.5, "image\nunreadable", ha="center", va="center", fontsize=7, color="0.3")
        else:
            ax.imshow(thumb)
        ax.set_title(label, fontsize=7.5)
    fig.suptitle(title + ("; right: Grad-CAM of the predicted class" if pair else ""), fontsize=9)
    _save(fig, path)


# --------------------------------------------------------------------------- markdown


def _fmt(value: float | None) -> str:
    """Table cell for a score."""
    return "—" if value is None else f"{value:.4f}"


def confusion_table(class_names: Sequence[str], cm: Sequence[Sequence[int]]) -> list[str]:
    """A confusion matrix as markdown table lines: rows true, columns predicted, row totals."""
    lines = ["| true \\ predicted | " + " | ".join(_cell(c) for c in class_names) + " | total |",
             "|---|" + "---:|" * (len(class_names) + 1)]
    return lines + [f"| **{_cell(name)}** | " + " | ".join(str(v) for v in row) + f" | {sum(row)} |"
                    for name, row in zip(class_names, cm)]


def _cell(text: str) -> str:
    """Escape a pipe so text stays inside its markdown table cell."""
    return str(text).replace("|", "\\|")


def _code(value: Any) -> str:
    """Render a Run value verbatim: inline code, or a fenced block when it spans lines."""
    text = value if isinstance(value, str) else json.dumps(_jsonable(value))
    if "\n" in text:  # a fenced block, indented to stay inside the list item
        return "\n\n" + textwrap.indent(f"```\n{text}\n```", "  ")
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def _calibration_markdown(m: dict) -> list[str]:
    """The calibration section: temperature, ECE before and after, the review threshold and its coverage."""
    lines = ["## Calibration and review", "",
             f"Probabilities and confidences in this report and in `predictions.csv` are temperature-scaled: "
             f"softmax(logits / T) with T = {m['temperature']:.4g}"
             + (", fitted on the validation split after training. " if m["review_threshold"] is not None
                else " (the checkpoint was trained before calibration). ") +
             f"Expected calibration error ({N_BINS} bins): **{_fmt(m['ece_before'])}** before, "
             f"**{_fmt(m['ece_after'])}** after.", ""]
    fit = m.get("calibration_fit") or {}
    if m["review_threshold"] is None:
        lines += ["The checkpoint holds no review threshold (trained before calibration): predict flags cells "
                  "below its `review_threshold` setting (0.9 unless given).", ""]
    else:
        chosen = (f" (chosen on the validation split: the lowest confidence at which the {fit['n']} validation "
                  f"cells not flagged were at least {fit['target_accuracy']:.1%} correct; it kept "
                  f"{fit['coverage_at_threshold']:.1%} of them)") if fit.get("n") else ""
        acc = m["accuracy_of_retained"]
        lines += [f"Cells with confidence below **{m['review_threshold']:.4f}** are flagged `needs_review`{chosen}. "
                  f"Here it keeps **{m['coverage_at_threshold']:.1%}** of {m['n']} cells (coverage), with accuracy "
                  f"**{'—' if acc is None else f'{acc:.4f}'}**; the other "
                  f"{1 - m['coverage_at_threshold']:.1%} go to a person.", ""]
    lines += [f"![Reliability diagram]({RELIABILITY_PNG})", "", f"![Risk-coverage curve]({RISK_COVERAGE_PNG})", ""]
    return lines


def _markdown(metrics: dict, extra: dict, *, has_history: bool, n_wrong: int, n_shown: int, explained: bool = False,
              calibrated: bool = False) -> str:
    """Assemble report.md from the metrics and the figures that were written."""
    names = metrics["class_names"]
    n = metrics["n"]
    lines = [
        f"# {metrics['title']}",
        "",
        f"**n = {n}** · accuracy **{metrics['accuracy']:.4f}** · "
        f"balanced accuracy **{_fmt(metrics['balanced_accuracy'])}** · macro-F1 **{metrics['macro_f1']:.4f}**",
        "",
    ]
    if "citation" in extra:
        lines += ["## Data", "", str(extra["citation"]), ""]

    lines += [
        "## Per-class metrics",
        "",
        "| Class | Precision | Recall | F1-score | Support |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, row in metrics["per_class"].items():
        lines.append(f"| {_cell(name)} | {_fmt(row['precision'])} | {_fmt(row['recall'])} | "
                     f"{_fmt(row['f1'])} | {row['support']} |")
    lines += [
        f"| accuracy | | | {metrics['accuracy']:.4f} | {n} |",
        f"| macro avg | {_fmt(metrics['macro_precision'])} | {_fmt(metrics['macro_recall'])} | "
        f"{_fmt(metrics['macro_f1'])} | {n} |",
        f"| weighted avg | {_fmt(metrics['weighted_precision'])} | {_fmt(metrics['weighted_recall'])} | "
        f"{_fmt(metrics['weighted_f1'])} | {n} |",
        "",
        "Balanced accuracy is the mean recall over classes present in the data; — marks an undefined value "
        "(no such images, or never predicted).",
        "",
        "## Confusion matrix",
        "",
        "Rows: true class; columns: predicted class.",
        "",
        *confusion_table(names, metrics["confusion_matrix"]),
    ]
    lines += ["", "## Figures", "", "![Confusion matrix](confusion_matrix.png)", "",
              "![Per-class metrics](per_class_metrics.png)", ""]
    if has_history:
        lines += ["![Loss curves](loss_curves.png)", ""]

    if calibrated:
        lines += _calibration_markdown(metrics)

    lines += ["## Error analysis", ""]
    if n_wrong == 0:
        lines += ["No misclassified images.", ""]
    else:
        lines += [f"{n_wrong} of {n} images misclassified ({n_wrong / n:.1%}).", "", "Most common confusions:", ""]
        cm = np.array(metrics["confusion_matrix"])
        off = [(int(cm[r, c]), r, c) for r in range(len(names)) for c in range(len(names)) if r != c and cm[r, c]]
        for k, r, c in sorted(off, key=lambda t: (-t[0], t[1], t[2]))[:TOP_CONFUSIONS]:
            lines.append(f"- {names[r]} → {names[c]}: {k}")
        if n_shown:
            lines += ["", f"Gallery of {n_shown} of {n_wrong} misclassified images, most confident errors first"
                      + (", each beside its Grad-CAM heat map for the predicted class (red: the evidence the model "
                         "used for it)" if explained else "") + ":",
                      "", "![Misclassified images](misclassified.png)"]
        lines.append("")

    run = {k: v for k, v in extra.items() if k != "citation"}
    if run:
        lines += ["## Run", ""]
        lines += [f"- **{key}**: {_code(value)}" for key, value in run.items()]
        lines.append("")
    return "\n".join(lines)
