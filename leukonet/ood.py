"""Not a leukocyte: flag inputs that are not a single white blood cell instead of forcing them into a class.

Two checks, either of which flags an image (``not_a_leukocyte``):

1. **No nucleus** (classical, needs no training): ``leukonet.data.cells.find_cells`` finds no stained
   nucleus of leukocyte size. This carries red-cell-only fields and blank slides (nothing stains
   violet), most photos of other things (hardly anything is dark violet against a light background),
   and most platelet clumps (specks smaller than ``MIN_NUCLEUS`` are dropped; at low resolution a
   dense clump can merge into one nucleus-sized blob and pass).
2. **Unfamiliar features** (model-based): the Mahalanobis distance of the backbone's pooled features
   to the nearest class mean of the training split, with one covariance shared by the classes (Lee et
   al., 2018, "A simple unified framework for detecting out-of-distribution samples"). The means and
   the (shrunk, Ledoit-Wolf) covariance's inverse are computed at the end of training on the training
   split through the evaluation transform; the threshold is the distance below which
   ``ACCEPT`` (95 %) of the validation images fall. They are stored as tensors under the checkpoint's
   ``"ood"`` key (``weights_only=True`` loading keeps working). Checkpoints from before hold none: the
   model-based part is skipped with a warning and the classical part still runs.

``ood_score`` is the distance divided by that threshold (above 1: flagged), empty where the checkpoint has
no statistics; ``ood_reason`` says which check flagged the image.

Measured (``tests/test_ood.py -s`` prints it; the session's tiny 32 px test model, random init, 2 + 2 epochs on
20 synthetic cells a class; ``ood_score > 1`` is the feature check alone, "flagged" both together):

- synthetic leukocyte crops, 48 px: nucleus found in 100 %; 10 % flagged (all by the features: 5 of 50);
- red-cell-only fields and blank slides, 128 px: 100 % flagged, all by the finder (features alone: 90 %, 100 %);
- platelet clumps (8-15 violet specks, 128 px): the finder sees a nucleus in 0-20 % of 20 (depending on the
  seed; at 48 px the specks blur together and it passes about half), features alone flag 45 %; together 100 %
  in the test's 20 (95 % in another 20);
- photos (skimage chelsea, astronaut, coffee), 48 and 360 px: 100 % flagged; features alone 100 % (scores
  2.3-4.5), the finder alone misses the astronaut (dark-blue suit and flag) from 128 px up;
- real leukocytes, classical part only (no real checkpoint was at hand to measure the features): a nucleus is
  found in 200 of 200 PBC crops but only 166 of 200 BCCD crops (83 %; BCCD's lighter stain lies near the
  finder's threshold), so about 1 in 6 BCCD cells would be flagged and left out of the count.

The model part of so small a model says little about real data: measure it again on a real run before relying
on it. Features under bf16 autocast (``precision=bf16-mixed``) move the scores by about 1-2 %.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from leukonet.data.cells import find_cells
from leukonet.data.transforms import eval_transform

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
        warnings.warn(f"{ckpt_path} holds no feature statistics (trained before leukonet.ood): the model-based "
                      "not-a-leukocyte check is skipped, only the cell finder's runs", stacklevel=2)
        return None
    return {k: v.clone() for k, v in stats.items()}


def score(feats: torch.Tensor | None, stats: dict[str, torch.Tensor] | None) -> np.ndarray | None:
    """``ood_score`` of each row of ``feats``: distance over the threshold (above 1: flagged); None without stats."""
    if stats is None or feats is None:
        return None
    return (distance(feats, stats) / float(stats["threshold"])).numpy()


def verdict(nucleus: bool, ood_score: float | None) -> tuple[bool, str]:
    """``(not_a_leukocyte, reason)`` from the two checks."""
    if not nucleus:
        return True, "no nucleus"
    if ood_score is not None and ood_score > 1:
        return True, "unfamiliar features"
    return False, ""
