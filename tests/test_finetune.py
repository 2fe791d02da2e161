"""The two phases: in phase 1 nothing in the backbone moves (weights and BatchNorm statistics),
the head learns; in phase 2 the backbone learns, as a new parameter group at the phase-2 rate."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from leukonet.data.datamodule import CellDataModule
from leukonet.training.finetune import TwoPhaseFinetuning
from leukonet.training.model import CellClassifier


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    return [k for k in a if not torch.equal(a[k], b[k])]


class Probe(L.Callback):
    """Records, after every training batch, the phase, the states, BN modes and learning rates."""

    def __init__(self, two_phase: TwoPhaseFinetuning) -> None:
        self.two_phase, self.records = two_phase, []

    def on_fit_start(self, trainer, pl_module) -> None:
        self.start_backbone = _snapshot(pl_module.backbone)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        bns = [m for m in pl_module.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.records.append(
            {
                "phase": self.two_phase.phase,
                "backbone": _snapshot(pl_module.backbone),
                "head": _snapshot(pl_module.head),
                "bn_training": {m.training for m in bns},
                "lrs": [g["lr"] for g in trainer.optimizers[0].param_groups],
                "grad_params": sum(p.numel() for p in pl_module.parameters() if p.requires_grad),
            }
        )


@pytest.mark.parametrize("bn_stats", ["frozen", "update"])
def test_phase1_freezes_backbone_and_bn_statistics_phase2_trains_it(bn_stats: str, cells: Path, tmp_path: Path) -> None:
    L.seed_everything(0)
    dm = CellDataModule(root=str(cells), image_size=32, batch_size=16, num_workers=0, output_dir=str(tmp_path))
    model = CellClassifier(
        backbone="test_efficientnet", pretrained=False, image_size=32,
        optimizer=lambda params: torch.optim.AdamW(params, lr=0.5),  # the callback must override this rate
    )
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.backbone.modules())
    head_start = _snapshot(model.head)
    two_phase = TwoPhaseFinetuning(
        phase1={"lr": 1e-2, "max_epochs": 2, "patience": 5}, phase2={"lr": 1e-3, "max_epochs": 2, "patience": 5},
        phase2_bn_stats=bn_stats,
    )
    probe = Probe(two_phase)
    trainer = L.Trainer(
        callbacks=[two_phase, probe], logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, max_epochs=10, num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=dm)

    phase1 = [r for r in probe.records if r["phase"] == 1]
    phase2 = [r for r in probe.records if r["phase"] == 2]
    assert phase1 and phase2 and trainer.current_epoch == 4  # 2 epochs a phase, in one fit

    for r in phase1:
        assert _changed(probe.start_backbone, r["backbone"]) == []  # weights and running stats alike
        assert r["bn_training"] == {False}
        assert r["lrs"] == [1e-2]
    assert _changed(head_start, phase1[-1]["head"])
    assert phase1[0]["grad_params"] == sum(p.numel() for p in model.head.parameters())

    start2 = phase1[-1]["backbone"]
    changed = _changed(start2, phase2[-1]["backbone"])
    assert any(k.endswith("weight") for k in changed)
    assert any(k.endswith("running_mean") for k in changed) == (bn_stats == "update")
    for r in phase2:
        assert r["bn_training"] == {bn_stats == "update"}
        assert r["lrs"] == [1e-3, 1e-3]  # head group and the backbone's new group
        assert r["grad_params"] == sum(p.numel() for p in model.parameters())


def test_phase_ends_on_patience_and_restores_its_best_weights(cells: Path, tmp_path: Path) -> None:
    """With a rate that only makes things worse, each phase stops after `patience` epochs
    without improvement, and the weights left are the best ones seen."""
    L.seed_everything(0)
    dm = CellDataModule(root=str(cells), image_size=32, batch_size=16, num_workers=0, output_dir=str(tmp_path))
    model = CellClassifier(backbone="test_efficientnet", pretrained=False, image_size=32,
                           optimizer=lambda params: torch.optim.SGD(params, lr=1.0))
    two_phase = TwoPhaseFinetuning(
        phase1={"lr": 50.0, "max_epochs": 10, "patience": 2}, phase2={"lr": 50.0, "max_epochs": 10, "patience": 2}
    )
    trainer = L.Trainer(callbacks=[two_phase], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, max_epochs=30, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)
    assert trainer.current_epoch < 20  # early stopping ended both phases
    assert two_phase.boundary_epoch is not None and two_phase.final_weights is not None
    val_loss = trainer.validate(model, datamodule=dm, verbose=False)[0]["val/loss"]
    best = min(two_phase.best_score, two_phase.phase1_best["score"])
    assert abs(val_loss - best) < 1e-4
