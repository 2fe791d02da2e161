"""A callback for the DDP tests: each process writes down what it did, in probe_rank<r>.json of the run."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import lightning as L


class DDPProbe(L.Callback):
    """Per epoch: the phase, the training indices this process drew, whether its backbone trained;
    at the end of fit: a digest of its parameters (DDP keeps them equal in every process)."""

    def __init__(self) -> None:
        self.epochs: list[dict] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epochs.append({"train_indices": [int(i) for i in trainer.train_dataloader.sampler]})

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        two_phase = next(c for c in trainer.callbacks if type(c).__name__ == "TwoPhaseFinetuning")
        trains = any(p.requires_grad for p in pl_module.backbone.parameters())
        self.epochs[-1].update(phase=two_phase.phase if not two_phase.switch_pending else 1, backbone_trains=trains)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        digest = hashlib.sha256()
        for name, p in sorted(pl_module.named_parameters()):
            digest.update(name.encode() + p.detach().float().cpu().numpy().tobytes())
        out = Path(trainer.default_root_dir) / f"probe_rank{trainer.global_rank}.json"
        out.write_text(json.dumps({"rank": trainer.global_rank, "world_size": trainer.world_size,
                                   "epochs": self.epochs, "parameters": digest.hexdigest()}))
