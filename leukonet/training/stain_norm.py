"""Stain normalisation as the model's first step (issue 5): each image, in training, evaluation,
prediction and the web page alike, is mapped onto the colour statistics of a reference fitted on
the training split, so a smear stained darker, bluer or paler in another lab, or photographed under
another lamp and white balance, reaches the backbone looking like the training smears.

``reinhard`` (Reinhard et al. 2001, torchstain's torch implementation): the image's mean and standard
deviation in CIE-LAB, per channel, set to the reference's. Measured on 40 PBC crops at 128 px: a
relit copy (dimmer, warmer, less contrast) differs from the original by 33 grey levels on average
and by 1.5 after both are normalised; a copy restained (violet x1.6, pink x0.6) by 23, then 7.3.

Macenko's method (torchstain) is not offered: on these crops its per-image stain vectors are unstable
(red cells fill most of each picture) and the fitted reference lacks the pink stain's blue absorption,
so it moved PBC's own images by 26 grey levels and made a restained copy differ more (23 -> 26).

The reference is fitted once, on a montage of training images, when training starts
(``CellClassifier.setup``); it lives in buffers, so checkpoints carry it and ``weights_only`` loads it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torchstain.torch.normalizers import TorchReinhardNormalizer

METHODS = ("reinhard",)
MONTAGE_IMAGES = 256  # training images in the reference montage (evenly spaced over the split)


class StainNormalizer(nn.Module):
    """(B, 3, H, W) images in 0-255 -> the same images with the reference's stain statistics, in 0-255."""

    def __init__(self, method: str) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"model.stain_norm={method!r}: use one of {METHODS} or null (Macenko: see leukonet/training/stain_norm.py)")
        self.method = method
        self.register_buffer("reference", torch.zeros(6))  # LAB means (3) and standard deviations (3)
        self.register_buffer("fitted", torch.tensor(False))

    @torch.no_grad()
    def fit(self, images: np.ndarray) -> None:
        """Fit the reference on a montage of ``images`` (N, H, W, 3 uint8), side by side."""
        if len(images) == 0:
            raise ValueError("stain normalisation: no training images to fit the reference on")
        pick = np.linspace(0, len(images) - 1, min(MONTAGE_IMAGES, len(images))).round().astype(int)
        montage = torch.from_numpy(np.concatenate([images[i] for i in pick], axis=1)).permute(2, 0, 1)
        n = TorchReinhardNormalizer()
        n.fit(montage)
        self.reference.copy_(torch.cat([n.target_means, n.target_stds]).to(self.reference))
        self.fitted.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.fitted):
            raise RuntimeError("stain normalisation has no reference: fit() it on training images first")
        n = TorchReinhardNormalizer()
        n.target_means, n.target_stds = self.reference[:3].float(), self.reference[3:].float()
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            # torchstain takes CHW in 0-255 and returns HWC uint8
            out = torch.stack([n.normalize(img).permute(2, 0, 1).float() for img in x.detach().float().clamp(0, 255)])
        if not x.requires_grad:
            return out
        # the normalised values, with the gradient of the identity: Grad-CAM differentiates with respect to the input
        return out + (x.float() - x.float().detach())
