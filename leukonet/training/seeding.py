"""Randomness that depends only on (seed, epoch), so a resumed run repeats an uninterrupted one.

``seed_everything`` at start-up fixes the global generators once. A run resumed from a checkpoint
starts them afresh, and Lightning creates the training iterator once or twice an epoch depending on
whether the epoch is the first after a (re)start; anything drawn from a stateful generator then
differs from the run that never stopped. Here nothing the data pipeline draws comes from shared
state: the shuffle of epoch k is a function of (seed, k), each image's augmentation of (seed, k,
index), whatever the iterator or worker; the model's own randomness (dropout) is reseeded from
(seed, k, rank) at the start of each epoch.
"""

from __future__ import annotations

from collections.abc import Iterator

import lightning as L
import numpy as np
import torch
from torch.utils.data import Sampler


def epoch_seed(seed: int, *keys: int) -> int:
    """A 32-bit seed of its own for every (seed, epoch, ...) tuple."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0])


class EpochShuffle(Sampler[int]):
    """A permutation of ``range(n)`` drawn from (seed, epoch): the same however often it is iterated."""

    def __init__(self, n: int, seed: int, epoch: int) -> None:
        self.n, self.seed, self.epoch = n, seed, epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        return iter(torch.randperm(self.n, generator=generator).tolist())


class SeedEachEpoch(L.Callback):
    """Reseed torch, numpy and Python at the start of each training epoch, from (seed, epoch, rank)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        L.seed_everything(epoch_seed(self.seed, trainer.current_epoch, trainer.global_rank), verbose=False)
