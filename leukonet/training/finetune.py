"""The report's two phases in one ``trainer.fit``: train the head on a frozen backbone, then all.

Each phase has its own learning rate, epoch limit and early-stopping patience on the validation
loss, and ends by restoring its best weights. Lightning's ``BackboneFinetuning`` unfreezes at a
fixed epoch and keeps BatchNorm training while "frozen"; here the switch follows early stopping
and the frozen backbone's BatchNorm statistics stay fixed. Subclassing ``BaseFinetuning`` keeps
Lightning's bookkeeping of the added parameter group, so a resumed run gets its optimizer back.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BaseFinetuning
from lightning.pytorch.trainer.states import TrainerFn
from lightning.fabric.utilities.rank_zero import rank_prefixed_message
from torch.optim import Optimizer

from leukonet.training.distributed import rewrap_ddp

log = logging.getLogger(__name__)


def _say(trainer: L.Trainer, message: str) -> None:
    """Every process logs its phase changes (under DDP each decides for itself), naming its rank.
    Under Hydra they land in the run directory: train.log, train_ddp_process_<rank>.log."""
    log.info(rank_prefixed_message(message, trainer.global_rank) if trainer.world_size > 1 else message)


@dataclass
class Phase:
    lr: float
    max_epochs: int
    patience: int


class TwoPhaseFinetuning(BaseFinetuning):
    """Phase 1: head only at ``phase1.lr``; phase 2: backbone joins as a new param group, every group
    at ``phase2.lr``. ``phase2_bn_stats``: keep the BatchNorm statistics of phase 1 ("frozen") or
    let them follow the batches ("update") in phase 2."""

    def __init__(
        self,
        phase1: dict | None = None,
        phase2: dict | None = None,
        monitor: str = "val/loss",
        min_delta: float = 0.0,
        phase2_bn_stats: str = "frozen",
    ) -> None:
        super().__init__()
        self.phases = {
            1: Phase(**{"lr": 1e-3, "max_epochs": 30, "patience": 8, **(phase1 or {})}),
            2: Phase(**{"lr": 1e-5, "max_epochs": 30, "patience": 8, **(phase2 or {})}),
        }
        if phase2_bn_stats not in ("update", "frozen"):
            raise ValueError(f"phase2_bn_stats must be 'update' or 'frozen', got {phase2_bn_stats!r}")
        self.monitor, self.min_delta = monitor, min_delta
        self.phase2_bn_frozen = phase2_bn_stats == "frozen"
        self.phase = 1
        self.switch_pending = False
        self.boundary_epoch: int | None = None
        self.phase1_best: dict[str, Any] | None = None  # score, epoch and weights phase 2 must beat
        self.final_weights: str | None = None  # where the weights left after fit come from
        self._reset_tracking()

    def _reset_tracking(self) -> None:
        self.best_score = math.inf
        self.best_epoch = -1
        self.wait = 0
        self.epochs_in_phase = 0
        self.best_state: dict[str, Any] | None = None

    # -- BaseFinetuning interface ---------------------------------------------------------
    def freeze_before_training(self, pl_module: L.LightningModule) -> None:
        pl_module.freeze_backbone()

    def finetune_function(self, pl_module: L.LightningModule, epoch: int, optimizer: Optimizer) -> None:
        if not self.switch_pending:
            return
        lr = self.phases[2].lr
        for group in optimizer.param_groups:
            group["lr"] = lr
        pl_module.unfreeze_backbone(bn_stats_frozen=self.phase2_bn_frozen)
        self.unfreeze_and_add_param_group(pl_module.backbone, optimizer, lr=lr, train_bn=True)
        trainer = pl_module.trainer
        rewrap_ddp(trainer)  # DDP must average the backbone's gradients too
        if pl_module.scheduler_factory is not None:  # a fresh schedule that knows the new group
            for config in trainer.lr_scheduler_configs:
                config.scheduler = pl_module.scheduler_factory(optimizer)
        self.switch_pending = False
        _say(trainer, f"[two-phase] epoch {epoch}: phase 2 starts, backbone unfrozen, lr {lr:g} for all layers")

    # -- Lightning hooks --------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.phase == 2 and not self.switch_pending:  # resumed in phase 2: the backbone trains
            pl_module.unfreeze_backbone(bn_stats_frozen=self.phase2_bn_frozen)
            self.make_trainable(pl_module.backbone)
            rewrap_ddp(trainer)
        elif not self._restarting:
            for optimizer in trainer.optimizers:
                for group in optimizer.param_groups:
                    group["lr"] = self.phases[1].lr
            _say(trainer, f"[two-phase] phase 1: backbone frozen (BatchNorm in eval), head lr {self.phases[1].lr:g}")
        super().on_fit_start(trainer, pl_module)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        pl_module.log("phase", float(self.phase), on_step=False, on_epoch=True, sync_dist=True)  # same in all

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking:
            return
        if self.monitor not in trainer.callback_metrics:
            raise KeyError(f"two-phase callback monitors {self.monitor!r}, but only "
                           f"{sorted(trainer.callback_metrics)} were logged")
        score = float(trainer.callback_metrics[self.monitor])
        self.epochs_in_phase += 1
        if score < self.best_score - self.min_delta:
            self.best_score, self.best_epoch, self.wait = score, trainer.current_epoch, 0
            self.best_state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        else:
            self.wait += 1
        phase = self.phases[self.phase]
        ends = self.wait >= phase.patience or self.epochs_in_phase >= phase.max_epochs
        # under DDP all processes must end the phase together, or some would wait for the others forever:
        # the monitored metric is synced, and the decision is reduced as Lightning's EarlyStopping does
        if not trainer.strategy.reduce_boolean_decision(ends, all=False):
            return
        why = "patience ran out" if self.wait >= phase.patience else "epoch limit reached"
        if self.best_state is not None:
            pl_module.load_state_dict(self.best_state)
        _say(
            trainer,
            f"[two-phase] phase {self.phase} ends at epoch {trainer.current_epoch} ({why}); restored the best "
            f"weights, epoch {self.best_epoch}, {self.monitor}={self.best_score:.4f}"
        )
        if self.phase == 1:
            self.phase1_best = {"score": self.best_score, "epoch": self.best_epoch, "state": self.best_state}
            self.phase, self.switch_pending = 2, True
            self.boundary_epoch = trainer.current_epoch + 1
            self._reset_tracking()
            return
        trainer.should_stop = True
        p1 = self.phase1_best
        if p1 is not None and p1["state"] is not None and p1["score"] <= self.best_score:
            pl_module.load_state_dict(p1["state"])
            self.final_weights = f"phase 1, epoch {p1['epoch']} ({self.monitor}={p1['score']:.4f})"
            _say(trainer, f"[two-phase] phase 2 never beat phase 1: keeping the weights of {self.final_weights}")
        else:
            self.final_weights = f"phase 2, epoch {self.best_epoch} ({self.monitor}={self.best_score:.4f})"

    # -- checkpointing: a resumed run continues in the right phase --------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "phase": self.phase,
            "switch_pending": self.switch_pending,
            "boundary_epoch": self.boundary_epoch,
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "wait": self.wait,
            "epochs_in_phase": self.epochs_in_phase,
            "best_state": self.best_state,
            "phase1_best": self.phase1_best,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        for key in ("phase", "switch_pending", "boundary_epoch", "best_score", "best_epoch", "wait",
                    "epochs_in_phase", "best_state", "phase1_best"):
            setattr(self, key, state_dict[key])
