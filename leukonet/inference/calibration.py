"""Calibrated confidence: temperature scaling and the ``needs_review`` threshold, both chosen on validation.

- ``fit_temperature``: one scalar ``T`` that divides the logits, fitted by minimising the negative
  log-likelihood of the validation logits (LBFGS on ``log T``, fp32). It changes no prediction, only
  how sure the model says it is (Guo et al., 2017, "On calibration of modern neural networks").
- ``review_threshold``: the lowest confidence threshold such that the validation cells kept (confidence
  at or above it) are classified with at least the target accuracy; cells below it are flagged.
- ``expected_calibration_error``: torchmetrics' ``MulticlassCalibrationError`` (15 equal-width bins, L1).

The fitted values live in the model as the persistent buffers ``temperature`` and ``review_threshold``
(``leukonet.training.model.CellClassifier``); training writes them into the run's checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassCalibrationError

N_BINS = 15


def fit_temperature(logits: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray, max_iter: int = 100) -> float:
    """The temperature ``T > 0`` minimising the NLL of ``softmax(logits / T)`` on ``labels``."""
    z = torch.as_tensor(logits, dtype=torch.float32).detach().cpu()
    y = torch.as_tensor(labels, dtype=torch.long).cpu()
    if z.ndim != 2 or len(z) != len(y) or len(y) == 0:
        raise ValueError(f"need (N, C) logits and N labels, got {tuple(z.shape)} and {tuple(y.shape)}")
    log_t = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    t = float(log_t.detach().exp())
    if not math.isfinite(t):  # e.g. every logit identical: no information, keep the model as it is
        return 1.0
    return min(max(t, 1e-2), 1e2)


def logits_from_probs(probs: np.ndarray | torch.Tensor) -> np.ndarray:
    """Logits up to a per-row constant (all softmax sees): ``log p``, zeros clipped to float32's smallest."""
    p = np.asarray(probs, dtype=np.float64)
    return np.log(np.clip(p, np.finfo(np.float32).tiny, None))


def apply_temperature(probs: np.ndarray | torch.Tensor, temperature: float) -> np.ndarray:
    """``softmax(z / T)`` from ``softmax(z)``: the probabilities a temperature-scaled model gives."""
    z = logits_from_probs(probs) / float(temperature)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = N_BINS) -> float:
    """ECE with ``n_bins`` equal-width confidence bins (torchmetrics' ``MulticlassCalibrationError``)."""
    p = torch.as_tensor(np.asarray(probs, dtype=np.float32))
    metric = MulticlassCalibrationError(num_classes=p.shape[1], n_bins=n_bins, norm="l1")
    return float(metric(p, torch.as_tensor(np.asarray(labels), dtype=torch.long)))


def reliability_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int = N_BINS) -> dict[str, np.ndarray]:
    """Per equal-width confidence bin: mean confidence, accuracy (NaN where empty) and count."""
    p = np.asarray(probs, dtype=np.float64)
    conf, correct = p.max(axis=1), p.argmax(axis=1) == np.asarray(labels)
    edges = np.linspace(0, 1, n_bins + 1)
    which = np.clip(np.searchsorted(edges, conf, side="right") - 1, 0, n_bins - 1)  # bins [lo, hi), as torchmetrics
    count = np.bincount(which, minlength=n_bins)
    with np.errstate(invalid="ignore"):
        acc = np.bincount(which, weights=correct, minlength=n_bins) / count
        mean_conf = np.bincount(which, weights=conf, minlength=n_bins) / count
    return {"edges": edges, "accuracy": acc, "confidence": mean_conf, "count": count}


def review_threshold(confidence: np.ndarray, correct: np.ndarray, target_accuracy: float) -> float:
    """The lowest threshold ``t`` such that the cells with confidence >= ``t`` (those not flagged) are at
    least ``target_accuracy`` correct: the confidence of the least confident cell kept. When nothing can be
    kept at that accuracy (the most confident cell is wrong), a threshold above every confidence: all flagged."""
    conf = np.asarray(confidence, dtype=np.float64)
    ok = np.asarray(correct, dtype=bool)
    if conf.size == 0:
        raise ValueError("no cells to choose a review threshold on")
    order = np.argsort(-conf, kind="stable")
    conf, ok = conf[order], ok[order]
    acc = np.cumsum(ok) / np.arange(1, len(ok) + 1)  # accuracy of the k most confident cells
    last = np.r_[conf[1:] != conf[:-1], True]  # cut only between distinct confidences: ties go together
    good = np.flatnonzero(last & (acc >= target_accuracy - 1e-12))
    # float32 values (the checkpoint's buffer holds one exactly): at or below the least confident cell kept,
    # or strictly above the most confident cell when none is kept
    if not len(good):
        return float(np.nextafter(np.float32(conf[0]), np.float32(np.inf)))
    t = np.float32(conf[good[-1]])
    return float(np.nextafter(t, np.float32(-np.inf)) if t > conf[good[-1]] else t)


def retained(probs: np.ndarray, labels: np.ndarray | None, threshold: float) -> dict[str, float | None]:
    """Share of cells not flagged at ``threshold`` (coverage) and their accuracy (None if none kept)."""
    p = np.asarray(probs, dtype=np.float64)
    keep = p.max(axis=1) >= threshold
    out: dict[str, float | None] = {"coverage": float(keep.mean())}
    if labels is not None:
        correct = p.argmax(axis=1) == np.asarray(labels)
        out["accuracy"] = float(correct[keep].mean()) if keep.any() else None
    return out


def risk_coverage(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coverage (share kept, most confident first) and the error rate of the kept cells, per cut."""
    p = np.asarray(probs, dtype=np.float64)
    order = np.argsort(-p.max(axis=1), kind="stable")
    wrong = (p.argmax(axis=1) != np.asarray(labels))[order]
    k = np.arange(1, len(wrong) + 1)
    return k / len(wrong), np.cumsum(wrong) / k


def calibrate(logits: torch.Tensor, labels: Sequence[int], target_accuracy: float) -> dict[str, float]:
    """Fit the temperature, then choose the review threshold on the calibrated probabilities."""
    y = np.asarray(labels)
    t = fit_temperature(logits, y)
    probs = torch.softmax(torch.as_tensor(logits, dtype=torch.float32) / t, 1).numpy()
    threshold = review_threshold(probs.max(1), probs.argmax(1) == y, target_accuracy)
    kept = retained(probs, y, threshold)
    before = torch.softmax(torch.as_tensor(logits, dtype=torch.float32), 1).numpy()
    return {"temperature": t, "review_threshold": threshold, "target_accuracy": float(target_accuracy),
            "n": int(len(y)), "coverage_at_threshold": kept["coverage"], "accuracy_of_retained": kept["accuracy"],
            "ece_before": expected_calibration_error(before, y), "ece_after": expected_calibration_error(probs, y)}
