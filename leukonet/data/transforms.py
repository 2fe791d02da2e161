"""Albumentations pipelines built from the config, so sweeps can change any augmentation.

Both pipelines end in a uint8 CHW tensor: normalisation belongs to the model (it knows its
backbone's mean and std and carries them into checkpoints and exports).
"""

from __future__ import annotations

from collections.abc import Mapping

import albumentations as A
import numpy as np
from albumentations.pytorch import ToTensorV2


def train_transform(augment: Mapping[str, A.BasicTransform | None] | None, image_size: int) -> A.Compose:
    """The configured augmentations in order (Hydra builds them from ``conf/data/augment``; a null
    entry is switched off), then a resize to ``image_size``."""
    steps = [t for t in (augment or {}).values() if t is not None]
    return A.Compose([*steps, A.Resize(image_size, image_size), ToTensorV2()])


def eval_transform(image_size: int) -> A.Compose:
    """Deterministic: resize the whole cell image to ``image_size``."""
    return A.Compose([A.Resize(image_size, image_size), ToTensorV2()])


# Optical-density unit vectors (R, G, B) of the two stains of a May-Grünwald-Giemsa / Wright smear,
# medians over PBC-2500 pixels: violet (azure/methylene-blue eosinate: nuclei, basophil granules),
# pixels with OD_green - OD_blue > 1 (leukonet.data.cells' nuclear channel), and pink (eosin: red
# cells, eosinophil granules), stained pixels with OD_green ~ OD_blue.
ROMANOWSKY_STAINS = ((0.468, 0.849, 0.244), (0.335, 0.666, 0.666))


def stain_basis(stains: tuple[tuple[float, float, float], tuple[float, float, float]] = ROMANOWSKY_STAINS) -> np.ndarray:
    """Rows: the two stains' unit OD vectors and their cross product (a residual), so that od = conc @ basis."""
    v = np.array(stains, dtype=np.float64)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    residual = np.cross(v[0], v[1])
    return np.vstack([v, residual / np.linalg.norm(residual)])


def stain_concentrations(image: np.ndarray, inverse: np.ndarray) -> np.ndarray:
    """Per pixel (N, 3): the stains' concentrations and the residual, in ``inverse``'s dtype (``inverse``: the
    inverse of a :func:`stain_basis`; OD = -ln((I + 1) / 256) = concentrations @ basis)."""
    od = -np.log((image.reshape(-1, 3).astype(inverse.dtype) + 1.0) / 256.0)
    return od @ inverse


def stained_image(concentrations: np.ndarray, basis: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The uint8 RGB image of ``shape`` whose pixels hold ``concentrations``: :func:`stain_concentrations` undone."""
    rgb = 256.0 * np.exp(-np.maximum(concentrations @ basis, 0.0)) - 1.0
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8).reshape(shape)


class RomanowskyStainJitter(A.ImageOnlyTransform):
    """Colour-deconvolution stain jitter for Romanowsky-stained blood smears.

    The image is turned into optical density (OD = -ln((I + 1) / 256)) and split into the
    concentrations of the violet (nuclear) and pink (eosin-type) stains plus a residual along their
    cross product (``stains``: their OD vectors). Each stain's concentration is scaled by a factor
    from ``scale_range`` and shifted by an amount from ``shift_range`` (in OD units; a shift tints the
    background too), each stain drawn on its own; the residual is kept, so with no jitter the image
    comes back unchanged (up to rounding). This simulates staining time, stain batch and smear
    thickness, which move violet and pink separately, unlike a hue rotation.
    """

    def __init__(
        self,
        scale_range: tuple[float, float] = (0.75, 1.25),
        shift_range: tuple[float, float] = (-0.05, 0.05),
        stains: tuple[tuple[float, float, float], tuple[float, float, float]] = ROMANOWSKY_STAINS,
        p: float = 0.5,
    ) -> None:
        super().__init__(p=p)
        self.scale_range = tuple(scale_range)
        self.shift_range = tuple(shift_range)
        self.stains = tuple(tuple(float(v) for v in s) for s in stains)
        basis = stain_basis(self.stains)  # rows: stain OD vectors; float32 below, as the images are converted
        self._matrix, self._inverse = basis.astype(np.float32), np.linalg.inv(basis).astype(np.float32)

    def get_params(self) -> dict[str, np.ndarray]:
        return {
            "scale": self.random_generator.uniform(*self.scale_range, size=2),
            "shift": self.random_generator.uniform(*self.shift_range, size=2),
        }

    def apply(self, img: np.ndarray, scale: np.ndarray, shift: np.ndarray, **params) -> np.ndarray:
        conc = stain_concentrations(img, self._inverse)
        conc[:, :2] = conc[:, :2] * scale.astype(np.float32) + shift.astype(np.float32)
        return stained_image(conc, self._matrix, img.shape)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("scale_range", "shift_range", "stains")
