"""Not a leukocyte: leave out of the count what is not one of the five leukocyte classes, and say why.

Two checks decide ``not_a_leukocyte`` (``verdict``; ``ood_reason`` says which):

1. **No nucleus** (classical, needs no training): ``leukonet.data.cells.find_cells`` finds no stained
   nucleus of leukocyte size: red-cell-only fields, blank slides, most platelet clumps and photos.
2. **Cell kind** (``leukonet.inference.cell_kind``): an ImageNet feature extractor and a small head trained to tell a
   leukocyte from an erythroblast, platelets and red cells or background, and an immature granulocyte (a
   leukocyte, but not one of the five) from the five, with each lab's profile subtracted so that another lab's
   leukocytes are not flagged for looking like another lab.

A third measure no longer flags anything: **unfamiliar features**, the Mahalanobis distance of the
classifier's pooled features to the nearest class mean of its training split (one shared, Ledoit-Wolf-shrunk
covariance; Lee et al., 2018). The means, the covariance's inverse and the threshold (the distance below which
``ACCEPT``, 95 %, of the validation images fall) are computed at the end of training and stored as tensors
under the checkpoint's ``"ood"`` key (``weights_only=True`` loading keeps working). ``ood_score`` is the
distance over that threshold; above 1 the cell is ``unfamiliar``. That is what another lab's genuine
leukocytes are (a short-budget stain-robust checkpoint scored 313 of 351 BCCD cells and 86 of 100
cellavision-100 cells above 1): they stay in the count, and the count says how many were unfamiliar, a
reason to adapt the model (``python -m leukonet.adapt``) rather than to drop the cells.

Measured: ``experiments/new_lab`` (real cells of three labs) and ``tests/test_ood.py`` (synthetic red-cell
fields, blank slides, platelet clumps, photos).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from leukonet.data.cells import find_cells
from leukonet.data.transforms import eval_transform
from leukonet.inference.cell_kind import LAB_MIN_CELLS, REASONS

ACCEPT = 0.95  # share of the validation images the feature check accepts: sets its threshold
KEY = "ood"  # where the statistics live in a checkpoint


def has_leukocyte(image: np.ndarray) -> bool:
    """The classical check: does the cell finder see a stained nucleus of leukocyte size in ``image``?"""
    return bool(find_cells(image))


@torch.inference_mode()
def features(model, images: torch.Tensor | Sequence[np.ndarray], batch_size: int = 64) -> torch.Tensor:
    """Pooled backbone features (N, D) in fp32 of uint8 images (a (N, 3, H, W) tensor already through the
    evaluation transform, or a list of RGB arrays, which are put through it); restores the model's mode."""
    if not isinstance(images, torch.Tensor):
        tf = eval_transform(model.hparams.image_size)
        images = torch.stack([tf(image=im)["image"] for im in images]) if len(images) else torch.zeros(0, 3, 1, 1)
    was_training = model.training
    model.eval()
    try:
        out = [pooled(model, images[i : i + batch_size].to(model.device)).cpu()
               for i in range(0, len(images), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 0)


def pooled(model, x: torch.Tensor) -> torch.Tensor:
    """The backbone's pooled features of a batch of 0-255 images, normalised as ``CellClassifier.forward`` does."""
    return model.backbone(model.preprocess(x)).float()


def fit(train_features: torch.Tensor, train_labels: Sequence[int], n_classes: int) -> dict[str, torch.Tensor]:
    """Per-class means (C, D) and the precision matrix (D, D) of the shared, Ledoit-Wolf-shrunk covariance of
    the features about their class means. A class without training images gets a mean of NaN (never nearest)."""
    from sklearn.covariance import LedoitWolf

    f = train_features.double().numpy()
    y = np.asarray(train_labels)
    means = np.full((n_classes, f.shape[1]), np.nan)
    centred = np.zeros_like(f)
    for c in range(n_classes):
        if (y == c).any():
            means[c] = f[y == c].mean(0)
            centred[y == c] = f[y == c] - means[c]
    precision = LedoitWolf(assume_centered=True).fit(centred).precision_
    return {"means": torch.from_numpy(means).float(), "precision": torch.from_numpy(precision).float()}


def distance(f: torch.Tensor, stats: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mahalanobis distance (N,) of features ``f`` (N, D) to the nearest class mean."""
    means, precision = stats["means"].double(), stats["precision"].double()
    d = f.double()[:, None, :] - means[None]  # (N, C, D)
    sq = torch.einsum("ncd,de,nce->nc", d, precision, d)
    sq = torch.where(torch.isnan(sq), torch.full_like(sq, float("inf")), sq)
    return sq.min(1).values.clamp_min(0).sqrt().float()


def compute(model, datamodule, accept: float = ACCEPT) -> dict[str, torch.Tensor] | None:
    """The statistics of a trained model: fitted on the training split, threshold chosen on validation (both
    through the evaluation transform). None without training or validation images."""
    train, val = datamodule._data.get("train"), datamodule._data.get("val")
    if train is None or val is None or not len(train) or not len(val):
        return None
    tf = eval_transform(model.hparams.image_size)
    batch = lambda ds: torch.stack([tf(image=im)["image"] for im in ds.pixels])  # noqa: E731
    stats = fit(features(model, batch(train)), train.labels.tolist(), len(model.hparams.class_names))
    val_d = distance(features(model, batch(val)), stats)
    threshold = float(np.quantile(val_d.numpy(), accept, method="higher"))  # at least `accept` kept
    stats.update(threshold=torch.tensor(threshold), accept=torch.tensor(float((val_d <= threshold).float().mean())),
                 n_train=torch.tensor(len(train)), n_val=torch.tensor(len(val)))
    return stats


def load(ckpt_path: str | Path) -> dict[str, torch.Tensor] | None:
    """A checkpoint's statistics, or None (with a warning) for checkpoints from before they were stored."""
    stats = torch.load(ckpt_path, map_location="cpu", weights_only=True).get(KEY)
    if stats is None:
        warnings.warn(f"{ckpt_path} holds no feature statistics (trained before leukonet.inference.ood): ood_score and "
                      "'unfamiliar' are left empty (the not-a-leukocyte checks do not need them)", stacklevel=2)
        return None
    return {k: v.clone() for k, v in stats.items()}


def score(feats: torch.Tensor | None, stats: dict[str, torch.Tensor] | None) -> np.ndarray | None:
    """``ood_score`` of each row of ``feats``: distance over the threshold (above 1: flagged); None without stats."""
    if stats is None or feats is None:
        return None
    return (distance(feats, stats) / float(stats["threshold"])).numpy()


def verdict(nucleus: bool, kind: str | None = None) -> tuple[bool, str]:
    """``(not_a_leukocyte, reason)`` from the cell finder and the cell-kind check (``leukonet.inference.cell_kind``; None:
    not run). The feature distance does not enter: a leukocyte of another lab is unfamiliar (``unfamiliar``) and
    still a leukocyte, a reason to adapt the model."""
    if not nucleus:
        return True, "no nucleus"
    if kind is not None and kind != "leukocyte":
        return True, REASONS[kind]
    return False, ""


def check_crops(images: Sequence[np.ndarray], cell_kind=None, lab: np.ndarray | str | None = "own") -> list[tuple[bool, str]]:
    """``verdict`` of each single-cell image (no feature distance), with the cell-kind check when given: what
    ``predict`` leaves out of the count among labelled crops (``evaluate``, ``experiments/new_lab``). ``lab``:
    the lab profile, ``"own"`` (as predict does: these images' own, when ``LAB_MIN_CELLS`` have a nucleus) or None."""
    nuclei = [has_leukocyte(im) for im in images]
    kinds = [None] * len(images)
    if cell_kind is not None and len(images):
        feats = cell_kind.features(images)
        if isinstance(lab, str):
            with_nucleus = feats[np.array(nuclei, bool)]
            lab = cell_kind.profile(with_nucleus) if len(with_nucleus) >= LAB_MIN_CELLS else None
        kinds = cell_kind.kinds(feats, lab)
    return [verdict(n, k) for n, k in zip(nuclei, kinds)]


def summary(verdicts: Sequence[tuple[bool, str]]) -> dict:
    """How many images were flagged, their share and the count per reason."""
    reasons = [r for flagged, r in verdicts if flagged]
    return {"checked": len(verdicts), "flagged": len(reasons), "rate": len(reasons) / len(verdicts) if verdicts else None,
            "by_reason": {r: reasons.count(r) for r in sorted(set(reasons))}}


def unfamiliar(ood_score: float | None) -> bool:
    """Features farther from the training cells than ``ACCEPT`` of its validation cells: another lab, stain or
    camera (or an input the other checks missed)."""
    return ood_score is not None and ood_score > 1
