"""Albumentations pipelines built from the config, so sweeps can change any augmentation.

Both pipelines end in a uint8 CHW tensor: normalisation belongs to the model (it knows its
backbone's mean and std and carries them into checkpoints and exports).
"""

from __future__ import annotations

from collections.abc import Mapping

import albumentations as A
from albumentations.pytorch import ToTensorV2


def train_transform(augment: Mapping[str, A.BasicTransform | None] | None, image_size: int) -> A.Compose:
    """The configured augmentations in order (Hydra builds them from ``conf/data/augment``; a null
    entry is switched off), then a resize to ``image_size``."""
    steps = [t for t in (augment or {}).values() if t is not None]
    return A.Compose([*steps, A.Resize(image_size, image_size), ToTensorV2()])


def eval_transform(image_size: int) -> A.Compose:
    """Deterministic: resize the whole cell image to ``image_size``."""
    return A.Compose([A.Resize(image_size, image_size), ToTensorV2()])
