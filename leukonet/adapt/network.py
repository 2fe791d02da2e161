"""The whole network tuned for a new lab, where re-fitting the head on fixed features is not enough.

Two objectives, each a method's ``network`` entry:

- ``labels``: fine-tuning every layer on the lab's labelled cells with the training cells in every batch
  (Chossegros et al. 2024 fine-tune the whole EfficientNet on at most 100 labelled cells of a lab), the
  backbone at a tenth of the head's learning rate;
- ``entropy``: label-free, TENT (Wang et al. 2021) with the class-balance term of information maximisation
  (SHOT, Liang et al. 2020): only the BatchNorm layers' scale and shift learn, to make the lab's predictions
  confident and their mix diverse, while cross-entropy on the training cells keeps the model what it was.

BatchNorm running statistics stay the training lab's in both (eval mode): the lab's own statistics are what
collapse the model (AdaBN, ``leukonet.adapt.batchnorm``). Augmentation is the cheap, label-safe part of the
recipe's (flips and quarter turns), so a few dozen cells do not get memorised as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from leukonet.resolvers import best_precision

OBJECTIVES = ("none", "labels", "entropy")


@dataclass
class NetworkTuning:
    objective: str = "none"
    steps: int = 120  # optimiser steps at most
    passes: float = 48.0  # labels: at most this many passes over the labelled cells (5 cells: 20 steps, 41: 120)
    min_steps: int = 20
    min_labelled: int = 0  # labels: fewer labelled cells leave the network as it is (the head still learns them)
    lr: float = 1e-3  # the head's (labels) or the BatchNorm affine parameters' (entropy)
    backbone_lr: float = 1e-4  # labels: every other backbone weight
    batch: int = 16  # training cells, and as many of the lab's, per step
    diversity: float = 1.0  # entropy: weight of the class-balance term (entropy of the batch's mean prediction)
    source_weight: float = 1.0  # entropy: weight of the training cells' cross-entropy


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Per image, a random quarter turn and horizontal flip (the recipe rotates by any angle and flips)."""
    out = torch.empty_like(x)
    turns = torch.randint(4, (len(x),), generator=g)
    flips = torch.rand(len(x), generator=g) < 0.5
    for i in range(len(x)):
        im = torch.rot90(x[i], int(turns[i]), dims=(1, 2))
        out[i] = im.flip(2) if flips[i] else im
    return out


def tune(model, source: tuple[torch.Tensor, np.ndarray], target: torch.Tensor, labels: np.ndarray,
         cfg: NetworkTuning, seed: int = 0) -> dict:
    """Tune ``model`` in place on uint8 images: ``source`` the training cells and their labels, ``target`` the lab's
    cells with ``labels`` (-1: unlabelled). Returns what was done, for the report."""
    if cfg.objective not in OBJECTIVES:
        raise ValueError(f"method.network.objective must be one of {OBJECTIVES}, got {cfg.objective!r}")
    if cfg.objective == "none" or cfg.steps <= 0:
        return {"objective": "none"}
    labelled = np.flatnonzero(labels >= 0)
    if cfg.objective == "labels" and not len(labelled):
        return {"objective": "labels", "skipped": "no labelled cells"}
    if cfg.objective == "labels" and len(labelled) < cfg.min_labelled:
        return {"objective": "labels", "skipped": f"{len(labelled)} labelled cells, fewer than method.network.min_labelled="
                                                  f"{cfg.min_labelled}: too few to fine-tune every layer on"}
    steps = cfg.steps
    if cfg.objective == "labels":  # a few cells seen a few hundred times each would be learnt by heart
        steps = int(np.clip(np.ceil(cfg.passes * len(labelled) / cfg.batch), min(cfg.min_steps, cfg.steps), cfg.steps))
    g = torch.Generator().manual_seed(seed)
    norms = [m for m in model.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if cfg.objective == "labels":
        backbone = list(model.backbone.parameters())
        groups = [{"params": backbone, "lr": cfg.backbone_lr}, {"params": list(model.head.parameters()), "lr": cfg.lr}]
        trainable = backbone + groups[1]["params"]
    else:
        affine = [p for m in norms for p in (m.weight, m.bias) if p is not None]
        groups = [{"params": affine, "lr": cfg.lr}]
        trainable = affine
    was = {id(p): p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.99), weight_decay=0.01 if cfg.objective == "labels" else 0.0)
    src_x, src_y = source[0], torch.as_tensor(source[1])
    tgt_y = torch.as_tensor(labels)
    pool = torch.as_tensor(labelled if cfg.objective == "labels" else np.arange(len(target)))
    losses = []
    bf16 = best_precision().startswith("bf16") and next(model.parameters()).device.type == "cpu"
    model.unfreeze_backbone(bn_stats_frozen=True)  # running statistics stay the training lab's (eval mode)
    model.train()
    model.head.eval()  # no dropout: a few dozen cells, every one counts
    try:
        with torch.enable_grad(), torch.random.fork_rng():
            torch.manual_seed(seed)
            for _ in range(steps):
                i = torch.randint(len(src_x), (cfg.batch,), generator=g)
                j = pool[torch.randint(len(pool), (cfg.batch,), generator=g)]
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):  # as training: bf16 where the CPU has it
                    logits = model(augment(torch.cat([src_x[i], target[j]]), g).float()).float()
                loss = F.cross_entropy(logits[: cfg.batch], src_y[i])
                if cfg.objective == "labels":
                    loss = loss + F.cross_entropy(logits[cfg.batch :], tgt_y[j])
                else:
                    p = torch.softmax(logits[cfg.batch :], 1)
                    entropy = -(p * torch.log(p + 1e-8)).sum(1).mean()
                    mean = p.mean(0)
                    balance = -(mean * torch.log(mean + 1e-8)).sum()
                    loss = cfg.source_weight * loss + entropy - cfg.diversity * balance
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
    finally:
        model.bn_stats_frozen = False
        model.eval()
        for p in model.parameters():
            p.requires_grad_(was[id(p)])
    return {"objective": cfg.objective, "steps": steps, "cells": int(len(pool)),
            "loss_first": round(float(np.mean(losses[:10])), 4), "loss_last": round(float(np.mean(losses[-10:])), 4)}
