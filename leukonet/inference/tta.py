"""Test-time augmentation: classify flipped and rotated copies of each cell and average the probabilities.

A blood-smear crop has no up, down, left or right, so the model's answer should not depend on how the
slide lay. ``mode``: ``none`` (the image as it is), ``flips`` (identity, horizontal and vertical flip: 3
passes) or ``d4`` (the 8 symmetries of the square: rotations by 0/90/180/270 degrees, each with and without
a horizontal flip). Probabilities are ``softmax`` per view, then the mean over views; with the checkpoint's
temperature (``model.calibrated``) applied to each view's logits before the softmax. The d4 average is the
same for an image and any of its flips or 90-degree rotations (the views are the same set of images).

Used by ``leukonet.evaluate`` (``tta=...``, through ``TTAPredictor`` and ``trainer.predict``) and by
``leukonet.predict.Predictor``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import nn

MODES = ("none", "flips", "d4")


def check_mode(mode: str | None) -> str:
    """``mode`` as one of ``MODES`` (None -> ``none``); a ValueError naming the choices otherwise."""
    mode = "none" if mode is None else str(mode).lower()
    if mode not in MODES:
        raise ValueError(f"tta must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def views(x: torch.Tensor, mode: str) -> list[torch.Tensor]:
    """The augmented copies of a batch ``x`` (B, C, H, W), the unchanged batch first.

    Flips and 90-degree rotations move pixels only (exact on uint8). Rotations need square images, as
    ``eval_transform`` makes them."""
    mode = check_mode(mode)
    if mode == "none":
        return [x]
    if mode == "flips":
        return [x, x.flip(3), x.flip(2)]
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"tta=d4 rotates by 90 degrees: images must be square, got {tuple(x.shape[-2:])}")
    rotations = [x if k == 0 else torch.rot90(x, k, dims=(2, 3)) for k in range(4)]
    return [v for r in rotations for v in (r, r.flip(3))]


def view_logits(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, mode: str) -> torch.Tensor:
    """Logits of every view, (V, B, classes), fp32; one forward pass per view (BatchNorm in eval mode: a
    view's logits do not depend on the others)."""
    return torch.stack([forward(v.contiguous()).float() for v in views(x, mode)])


def average(logits: torch.Tensor, temperature: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Mean over views of ``softmax(logits / temperature)``: (V, B, classes) -> (B, classes)."""
    return (logits.float() / temperature).softmax(-1).mean(0)


def tta_probabilities(model: nn.Module, x: torch.Tensor, mode: str = "none", calibrated: bool = True) -> torch.Tensor:
    """Class probabilities of ``x`` (uint8 or 0-255 float images, (B, 3, H, W)) averaged over the ``mode``
    views; temperature-scaled by ``model.calibrated`` when the model has one and ``calibrated`` is set."""
    logits = view_logits(model, x, mode)
    if calibrated and hasattr(model, "calibrated"):
        logits = model.calibrated(logits)
    return logits.softmax(-1).mean(0)


class TTAPredictor(L.LightningModule):
    """Wraps a classifier for ``trainer.predict``: each batch gives its per-view logits (B, V, classes),
    so the caller can average them with or without the temperature (``average``)."""

    def __init__(self, model: nn.Module, mode: str = "none") -> None:
        super().__init__()
        self.model = model
        self.mode = check_mode(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return view_logits(self.model, x, self.mode).transpose(0, 1)

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x)
