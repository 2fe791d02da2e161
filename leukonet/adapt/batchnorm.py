"""BatchNorm statistics for a new lab: re-estimated on its cells (AdaBN), or mapped onto the training lab's.

The backbone's BatchNorm layers keep ImageNet's running statistics through both training phases
(``leukonet.training.finetune``), so the head learnt features normalised with *those*. Two ways to use a lab's
unlabelled cells:

- ``adabn`` (Li et al. 2016): every backbone BatchNorm normalises with the lab's own statistics. What
  reaches the head is then no longer what it was trained on (the probe in issue 17: BCCD 64 % -> 16 %).
- ``map``: each layer's input is first moved from the lab's per-channel moments onto the training
  lab's, then normalised as before: ``x -> (x - mu_T) / sd_T * sd_S + mu_S``, then the layer's own
  ImageNet normalisation. Deeper layers see the mapped outputs of earlier ones (one pass, batch moments,
  as AdaBN estimates them). The map is folded into each layer's running mean and weight, so the adapted
  model is an ordinary checkpoint: the same module, other numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

BATCH = 128  # cells per forward pass: the batch moments that the mapping of deeper layers uses
EPS = 1e-6  # added to a variance before its square root in the map (a channel that never fires stays put)


def backbone_norms(model) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    return {n: m for n, m in model.backbone.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def _passes(model, images: torch.Tensor) -> None:
    """Forward ``images`` (uint8, N x 3 x H x W, already at the model's size) through the backbone in batches."""
    with torch.inference_mode():
        for i in range(0, len(images), BATCH):
            model.backbone(model.preprocess(images[i : i + BATCH]))


class _Moments:
    """Running per-channel sum and sum of squares of a layer's input over every position of every image, or with
    ``center`` over the central ``center`` x ``center`` share of each feature map: where the cell is, whatever
    the framing (a PBC crop is mostly red cells and plasma around a cell spanning a third of it, a BCCD crop
    mostly cell)."""

    def __init__(self, center: float | None = None) -> None:
        self.n, self.s, self.ss, self.center = 0, 0.0, 0.0, center

    def add(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add a batch; returns its own per-channel mean and variance (float32)."""
        if self.center and x.ndim == 4:
            h, w = x.shape[2:]
            ch, cw = max(1, round(h * self.center)), max(1, round(w * self.center))
            x = x[:, :, (h - ch) // 2 : (h - ch) // 2 + ch, (w - cw) // 2 : (w - cw) // 2 + cw]
        dims = [d for d in range(x.ndim) if d != 1]
        var, mean = torch.var_mean(x.float(), dim=dims, correction=0)
        count = x.numel() // x.shape[1]
        self.n += count
        self.s = self.s + mean.double() * count
        self.ss = self.ss + (var.double() + mean.double() ** 2) * count
        return mean, var

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.s / self.n
        return mean.float(), (self.ss / self.n - mean * mean).clamp_min(0).float()


@contextmanager
def _hooks(norms: dict[str, nn.Module], hook: Callable[[str], Callable]) -> Iterator[None]:
    handles = [m.register_forward_pre_hook(hook(name)) for name, m in norms.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def input_moments(model, images: torch.Tensor, center: float | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per backbone BatchNorm layer, the mean and variance of its input over ``images`` (``center``: over the
    central share of each map only), the model as it is (eval mode): the training lab's moments when ``images``
    are its training cells."""
    norms = backbone_norms(model)
    moments = {name: _Moments(center) for name in norms}

    def hook(name: str):
        def record(module, args) -> None:
            moments[name].add(args[0])

        return record

    model.eval()
    with _hooks(norms, hook):
        _passes(model, images)
    return {name: m.result() for name, m in moments.items()}


def adabn(model, images: torch.Tensor) -> None:
    """Replace every backbone BatchNorm's running statistics with those of ``images`` (the lab's cells)."""
    norms = backbone_norms(model)
    saved = {name: m.momentum for name, m in norms.items()}
    model.eval()
    for m in norms.values():
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over all batches
        m.train()
    try:
        _passes(model, images)
    finally:
        for name, m in norms.items():
            m.momentum = saved[name]
            m.eval()


def map_to_source(model, images: torch.Tensor, source: dict[str, tuple[torch.Tensor, torch.Tensor]],
                  center: float | None = None) -> None:
    """Fold into every backbone BatchNorm the map of its input from the moments of ``images`` (the lab's cells)
    onto ``source`` (``input_moments`` of the training cells, with the same ``center``), layer after layer."""
    norms = backbone_norms(model)
    if set(norms) != set(source):
        raise ValueError("the source moments were measured on another backbone")
    target = {name: _Moments(center) for name in norms}

    def hook(name: str):
        mu_s, var_s = source[name]
        sd_s = var_s.add(EPS).sqrt()

        def move(module, args):
            x = args[0]
            mean, var = target[name].add(x)
            shape = [1, -1] + [1] * (x.ndim - 2)
            scale = (sd_s / var.add(EPS).sqrt()).view(shape)
            return ((x - mean.view(shape)) * scale + mu_s.view(shape)).to(x.dtype)

        return move

    model.eval()
    with _hooks(norms, hook):
        _passes(model, images)
    with torch.no_grad():
        for name, m in norms.items():
            mu_s, var_s = source[name]
            mu_t, var_t = target[name].result()
            sd_s, sd_t = var_s.add(EPS).sqrt(), var_t.add(EPS).sqrt()
            # gamma * ((x - mu_t) sd_s / sd_t + mu_s - mu_i) / sd_i + beta
            #   = gamma' (x - m') / sd_i + beta, with gamma' = gamma sd_s / sd_t and m' = mu_t - (mu_s - mu_i) sd_t / sd_s
            m.running_mean.copy_(mu_t - (mu_s - m.running_mean) * sd_t / sd_s)
            if m.affine:
                m.weight.mul_(sd_s / sd_t)
            else:  # no weight to carry the scale: the variance does
                m.running_var.copy_((m.running_var + m.eps) * (sd_t / sd_s) ** 2 - m.eps)
