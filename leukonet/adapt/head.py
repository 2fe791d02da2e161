"""The head re-fitted for a new lab on the backbone's features: its labelled cells and/or its confident
unlabelled ones (class-balanced self-training), with the training lab's cells kept in every batch.

The backbone is left as the BatchNorm step made it, so each cell's features (``leukonet.inference.ood.features``: the
pooled features the head reads) are computed once and the head (fastai's or a linear one, a few hundred
thousand weights) trains in seconds on 2 CPU cores. Pseudo-labels
follow Zou et al. 2018 (class-balanced self-training): each round keeps the same share of the cells
predicted in each class, most confident first, so the classes the lab has many of do not crowd out the rest;
the training cells keep their labels in every batch, so the model does not forget what it knew.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F



@dataclass
class SelfTraining:
    rounds: int = 0  # 0: no pseudo-labels (labelled cells, if any, still train the head)
    share: float = 0.5  # of the cells predicted in each class, the most confident, as pseudo-labels per round
    min_confidence: float = 0.5
    steps: int = 150  # optimiser steps per round
    lr: float = 1e-3
    batch: int = 64  # training cells, and as many target cells, per step
    label_weight: float = 4.0  # a labelled target cell is drawn this many times as often as a pseudo-labelled one


@torch.no_grad()  # not inference_mode: calibration fits a temperature on these with autograd
def logits(model, feats: torch.Tensor) -> torch.Tensor:
    """The model's raw logits (prior shift included) from pooled features."""
    was = model.head.training
    model.head.eval()
    try:
        return model.logits_of(feats)
    finally:
        model.head.train(was)


def pseudo_labels(probs: np.ndarray, share: float, min_confidence: float) -> np.ndarray:
    """Class-balanced pseudo-labels (-1: none): per predicted class, the ``share`` most confident of its cells
    whose confidence is at least ``min_confidence``."""
    predicted, confidence = probs.argmax(1), probs.max(1)
    out = np.full(len(probs), -1, dtype=np.int64)
    for c in np.unique(predicted):
        members = np.flatnonzero((predicted == c) & (confidence >= min_confidence))
        keep = members[np.argsort(-confidence[members], kind="stable")][: int(np.ceil(share * (predicted == c).sum()))]
        out[keep] = c
    return out


def fit(model, source: tuple[torch.Tensor, np.ndarray], target: torch.Tensor, labels: np.ndarray,
        cfg: SelfTraining, seed: int = 0) -> list[dict]:
    """Train ``model.head`` in place on the source features and labels, the target's labelled cells (``labels``
    >= 0) and, for ``cfg.rounds`` rounds, its pseudo-labelled ones. Returns one entry per round."""
    rounds = max(cfg.rounds, 1 if (labels >= 0).any() else 0)
    if rounds == 0:
        return []
    with torch.random.fork_rng():  # dropout draws from the global generator: seeded here, restored after
        torch.manual_seed(seed)
        return _fit(model, source, target, labels, cfg, rounds, torch.Generator().manual_seed(seed))


def _fit(model, source: tuple[torch.Tensor, np.ndarray], target: torch.Tensor, labels: np.ndarray, cfg: SelfTraining,
         rounds: int, g: torch.Generator) -> list[dict]:
    src_x, src_y = source[0].clone(), torch.as_tensor(source[1])  # clones: features come from inference mode
    optimizer = torch.optim.AdamW(model.head.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.01)
    history = []
    for r in range(rounds):
        probs = torch.softmax(logits(model, target) / model.temperature, 1).numpy()
        pseudo = pseudo_labels(probs, cfg.share, cfg.min_confidence) if cfg.rounds else np.full(len(target), -1)
        y = np.where(labels >= 0, labels, pseudo)
        chosen = np.flatnonzero(y >= 0)
        history.append({"round": r + 1, "labelled": int((labels >= 0).sum()),
                        "pseudo_labelled": int(((labels < 0) & (pseudo >= 0)).sum()),
                        "pseudo_per_class": np.bincount(pseudo[(labels < 0) & (pseudo >= 0)], minlength=probs.shape[1]).tolist()})
        if not len(chosen):
            break
        weight = torch.as_tensor(np.where(labels[chosen] >= 0, cfg.label_weight, 1.0))
        tgt_x, tgt_y = target[torch.as_tensor(chosen)].clone(), torch.as_tensor(y[chosen])
        model.head.train()
        with torch.enable_grad():
            for _ in range(cfg.steps):
                i = torch.randint(len(src_x), (cfg.batch,), generator=g)
                j = torch.multinomial(weight, cfg.batch, replacement=True, generator=g)
                x = torch.cat([src_x[i], tgt_x[j]])
                loss = F.cross_entropy(model.head(x).float(), torch.cat([src_y[i], tgt_y[j]]))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        model.head.eval()
    return history
