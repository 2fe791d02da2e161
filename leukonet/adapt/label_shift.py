"""A lab's class mix from its unlabelled cells: EM on the posteriors (Saerens, Latinne & Decaestecker 2002).

A normal differential is about 60 % neutrophils; PBC trains on 20 % of each class. If the classifier's
posteriors are calibrated on the training mix, re-weighting them by ``target prior / training prior`` and
re-estimating the prior as their mean converges to the lab's proportions (maximum likelihood). The
posteriors of a model that has not been adapted are off-domain and overconfident: EM then amplifies their
errors (issue 17's probe: one lab 50 % -> 31 %), so it runs after adaptation, on temperature-scaled
probabilities, and its estimate is reported before it is applied.
"""

from __future__ import annotations

import numpy as np

FLOOR = 1e-3  # no class's estimated share goes below this: a class the lab has but rarely sees stays possible


def em_prior(probs: np.ndarray, train_prior: np.ndarray, max_iter: int = 1000, tol: float = 1e-8) -> np.ndarray:
    """The class proportions (C,) that maximise the likelihood of the cells whose training-mix posteriors are
    ``probs`` (N, C)."""
    p = np.asarray(probs, dtype=np.float64)
    base = np.asarray(train_prior, dtype=np.float64)
    prior = base.copy()
    for _ in range(max_iter):
        w = p * (prior / base)
        w /= w.sum(1, keepdims=True)
        new = np.clip(w.mean(0), FLOOR, None)
        new /= new.sum()
        if np.abs(new - prior).max() < tol:
            prior = new
            break
        prior = new
    return prior


def log_shift(prior: np.ndarray, train_prior: np.ndarray, temperature: float) -> np.ndarray:
    """What to add to the raw logits so that ``softmax(logits / T)`` is the posterior under ``prior``."""
    return float(temperature) * (np.log(np.asarray(prior, np.float64)) - np.log(np.asarray(train_prior, np.float64)))
