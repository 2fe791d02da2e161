"""The LightningModule: a timm backbone, a configurable head, and the metrics a hematologist reads.

Inputs are uint8 images; the module normalises them with its backbone's own mean and std, so a
checkpoint carries its preprocessing. What "frozen" means (no gradients, BatchNorm statistics
fixed and in eval mode) lives here; when to freeze is the two-phase callback's business.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import matplotlib.pyplot as plt
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

from leukonet.classes import CLASSES
from leukonet.training.distributed import gather_rows, loader_indices
from leukonet.training.stain_norm import StainNormalizer
from leukonet.training.weights import load_pretrained


def build_head(kind: str, in_features: int, num_classes: int, dropout: float, hidden: int) -> nn.Module:
    """``linear``: dropout + linear. ``fastai``: fastai's create_head on concat-pooled features
    (BatchNorm, dropout p/2, hidden linear + ReLU, BatchNorm, dropout p, linear)."""
    if kind == "linear":
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, num_classes))
    if kind == "fastai":
        return nn.Sequential(
            nn.BatchNorm1d(in_features),
            nn.Dropout(dropout / 2),
            nn.Linear(in_features, hidden, bias=False),
            nn.ReLU(inplace=True),
            nn.BatchNorm1d(hidden),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes, bias=False),
        )
    raise ValueError(f"model.head.kind must be 'linear' or 'fastai', got {kind!r}")


def _metrics(num_classes: int, prefix: str) -> MetricCollection:
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(num_classes, average="micro"),
            "balanced_acc": MulticlassRecall(num_classes, average="macro"),
            "macro_f1": MulticlassF1Score(num_classes, average="macro"),
        },
        prefix=prefix,
    )


class CellClassifier(L.LightningModule):
    """timm backbone + head for the five leukocyte classes."""

    def __init__(
        self,
        backbone: str = "resnet34",
        pretrained: bool = True,
        weights_file: str | None = None,
        head: dict | None = None,
        image_size: int = 224,
        class_names: Sequence[str] = CLASSES,
        channels_last: bool = True,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        scheduler_monitor: str = "val/loss",
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        compile: bool = False,
        stain_norm: str | None = None,
    ) -> None:
        super().__init__()
        head = {"kind": "linear", "dropout": 0.0, "hidden": 512, **(head or {})}
        net = timm.create_model(backbone, pretrained=False)
        self.weights_source = None
        if pretrained:
            src = load_pretrained(net, backbone, weights_file)
            self.weights_source = f"{src.kind}: {src.location}"
        cfg = net.pretrained_cfg
        mean, std = list(mean or cfg["mean"]), list(std or cfg["std"])
        net.reset_classifier(0, global_pool="catavgmax" if head["kind"] == "fastai" else "avg")
        self.backbone = net
        self.head = build_head(head["kind"], net.num_features * (2 if head["kind"] == "fastai" else 1),
                               len(class_names), head["dropout"], head["hidden"])
        # stain normalisation (leukonet.training.stain_norm), fitted on the training split in setup(); null: none
        self.stain_norm = StainNormalizer(stain_norm) if stain_norm else None
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255, persistent=False)
        # calibration, fitted on the validation split after training (leukonet.inference.calibration); saved in checkpoints:
        # probabilities are softmax(logits / temperature); cells whose calibrated confidence is below
        # review_threshold are flagged needs_review (negative: none chosen, as in checkpoints from before)
        self.register_buffer("temperature", torch.tensor(1.0))
        self.register_buffer("review_threshold", torch.tensor(-1.0))
        # a lab's class mix (leukonet.adapt, label shift): added to the logits, T * log(target prior / training
        # prior), so softmax(logits / T) is the posterior under the lab's proportions; zeros: the training mix
        self.register_buffer("log_prior_shift", torch.zeros(len(class_names)))
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.backbone_frozen = False
        self.bn_stats_frozen = False
        self.save_hyperparameters(
            {
                "backbone": backbone,
                "head": head,
                "image_size": image_size,
                "class_names": list(class_names),
                "channels_last": channels_last,
                "mean": mean,
                "std": std,
                "scheduler_monitor": scheduler_monitor,
                "weights_source": self.weights_source,
                "stain_norm": stain_norm,
            }
        )
        if channels_last:
            self.to(memory_format=torch.channels_last)
        if compile:  # in place: the state dict keeps its keys; compiled on the first batch, again at phase 2
            self.backbone.compile()
        n = len(class_names)
        self.val_metrics = _metrics(n, "val/")
        self.test_metrics = _metrics(n, "test/")
        self.test_per_class = MetricCollection(
            {
                "precision": MulticlassPrecision(n, average=None),
                "recall": MulticlassRecall(n, average=None),
                "f1": MulticlassF1Score(n, average=None),
            }
        )
        self.val_confusion = MulticlassConfusionMatrix(n)
        # mean loss per image over the whole split, summed over every process (DDP): early stopping and
        # the phase switch read val/loss, and every process must see the same value to decide alike
        self.val_loss = MeanMetric(nan_strategy="disable")
        self.test_loss = MeanMetric(nan_strategy="disable")
        self.test_probs: list[torch.Tensor] = []
        self.val_logits: list[torch.Tensor] = []  # kept by trainer.validate only (not while fitting): calibration

    # -- building blocks ------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: str = "cpu") -> CellClassifier:
        """Rebuild a trained model from a checkpoint without unpickling anything but tensors."""
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
        hp = dict(ckpt["hyper_parameters"])
        hp.pop("weights_source", None)
        model = cls(pretrained=False, **hp)
        model.load_state_dict(_with_calibration(ckpt["state_dict"], len(model.hparams.class_names)))
        model.weights_source = ckpt["hyper_parameters"].get("weights_source")
        return model.eval()

    def setup(self, stage: str) -> None:
        """Fit the stain normalisation's reference on the training images before training (a resumed run
        fits the same one, then loads it from the checkpoint)."""
        if stage == "fit" and self.stain_norm is not None and not bool(self.stain_norm.fitted):
            self.stain_norm.fit(self.trainer.datamodule.train_pixels())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Checkpoints from before calibration lack its buffers: temperature 1, no review threshold, no prior shift."""
        _with_calibration(checkpoint["state_dict"], len(self.hparams.class_names))

    def calibrated(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits divided by the fitted temperature: their softmax is the calibrated probabilities."""
        return logits / self.temperature

    def chosen_review_threshold(self) -> float | None:
        """The review threshold chosen on validation, or None (a checkpoint from before calibration)."""
        t = float(self.review_threshold)
        return t if t >= 0 else None

    def freeze_backbone(self) -> None:
        """No gradients into the backbone and its BatchNorm statistics fixed (eval mode)."""
        self.backbone.requires_grad_(False)
        self.backbone_frozen = True
        self.backbone.eval()

    def unfreeze_backbone(self, bn_stats_frozen: bool = False) -> None:
        """Let the backbone learn; with ``bn_stats_frozen`` its BatchNorm layers keep their running
        statistics (eval mode) while their scale and shift still train."""
        self.backbone_frozen = False
        self.bn_stats_frozen = bn_stats_frozen
        self.train(self.training)

    def train(self, mode: bool = True) -> CellClassifier:
        """Lightning switches modes around every validation; frozen parts stay in eval mode."""
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.eval()
        elif self.bn_stats_frozen:
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """0-255 images -> the backbone's input: stain-normalised (if chosen), scaled by the weights' mean and std."""
        if self.stain_norm is not None:
            x = self.stain_norm(x)
        x = (x.float() - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.hparams.channels_last else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 or float images in 0-255, (B, 3, H, W) -> logits (B, classes)."""
        x = self.preprocess(x)
        if self.backbone_frozen:
            with torch.no_grad():  # no activations kept for a backward pass that cannot happen
                features = self.backbone(x)
        else:
            features = self.backbone(x)
        return self.logits_of(features)

    def logits_of(self, features: torch.Tensor) -> torch.Tensor:
        """The logits of pooled backbone features: the head, then the lab's class-mix shift (fp32, also under
        bf16 autocast). ``leukonet.adapt`` re-fits the head on stored features through this."""
        return self.head(features).float() + self.log_prior_shift

    # -- Lightning steps ------------------------------------------------------------------
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y), sync_dist=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_loss.update(F.cross_entropy(logits, y), len(y))
        self.log("val/loss", self.val_loss, prog_bar=True)
        self.val_metrics.update(logits, y)
        self.val_confusion.update(logits, y)
        if self.trainer.state.fn == "validate":
            self.val_logits.append(logits.detach().float().cpu())

    def on_validation_epoch_start(self) -> None:
        self.val_logits = []

    def on_validation_epoch_end(self) -> None:
        # torchmetrics' compute() already counts every process's images; sync_dist says so to Lightning
        self.log_dict(self.val_metrics.compute(), prog_bar=True, sync_dist=True)
        self.val_metrics.reset()
        fig, _ = self.val_confusion.plot(labels=list(self.hparams.class_names))
        for logger in self.loggers:
            if hasattr(logger.experiment, "add_figure"):
                logger.experiment.add_figure("val/confusion_matrix", fig, self.current_epoch)
        plt.close(fig)
        self.val_confusion.reset()
        loader = self.trainer.val_dataloaders
        if self.trainer.state.fn == "validate" and isinstance(loader, DataLoader):  # every image once, dataset order
            mine = torch.cat(self.val_logits) if self.val_logits else torch.empty(0, len(self.hparams.class_names))
            self.val_logits = [gather_rows(mine, loader_indices(loader), len(loader.dataset))]

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.test_loss.update(F.cross_entropy(logits, y), len(y))
        self.log("test/loss", self.test_loss)
        self.test_metrics.update(logits, y)
        self.test_per_class.update(logits, y)
        self.test_probs.append(logits.softmax(1).cpu())

    def on_test_epoch_start(self) -> None:
        self.test_probs = []

    def on_test_epoch_end(self) -> None:
        self.log_dict(self.test_metrics.compute(), sync_dist=True)  # global already, as in validation
        per_class = self.test_per_class.compute()
        for name, values in per_class.items():
            for c, v in zip(self.hparams.class_names, values):
                self.log(f"test/{name}_{c}", v, sync_dist=True)
        self.test_metrics.reset()
        self.test_per_class.reset()
        loader = self.trainer.test_dataloaders
        if isinstance(loader, DataLoader):  # every image once, in dataset order, on every process (DDP)
            mine = torch.cat(self.test_probs) if self.test_probs else torch.empty(0, len(self.hparams.class_names))
            self.test_probs = [gather_rows(mine, loader_indices(loader), len(loader.dataset))]

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x).softmax(1)

    def configure_optimizers(self) -> Any:
        """Optimise what requires grad now; the two-phase callback adds the backbone later."""
        if self.optimizer_factory is None:
            raise ValueError("model.optimizer is not set: give a partial optimizer in the config")
        optimizer = self.optimizer_factory(params=[p for p in self.parameters() if p.requires_grad])
        if self.scheduler_factory is None:
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "monitor": self.hparams.scheduler_monitor},
        }


def _with_calibration(state_dict: dict[str, torch.Tensor], n_classes: int) -> dict[str, torch.Tensor]:
    """``state_dict`` with the calibration and prior-shift buffers' defaults filled in where missing (old checkpoints)."""
    state_dict.setdefault("temperature", torch.tensor(1.0))
    state_dict.setdefault("review_threshold", torch.tensor(-1.0))
    state_dict.setdefault("log_prior_shift", torch.zeros(n_classes))
    return state_dict
