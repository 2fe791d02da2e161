"""Crash recovery and reproducibility: a run killed in phase 2 and resumed ends where an uninterrupted
run ends, and two runs with one seed give identical results."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY, run_module
from leukonet.training.model import CellClassifier

pytestmark = pytest.mark.slow

# phase 1 runs its 2 epochs (0-1); phase 2 starts at epoch 2 with patience 2, so early stopping
# state matters when the run is cut in epoch 3
RUN = ["+experiment=demo", "seed=42", "trainer.deterministic=true", "callbacks.two_phase.phase2.max_epochs=6",
       "callbacks.two_phase.phase2.patience=2", *[o for o in TINY if "phase2.max_epochs" not in o]]
# results that must agree; times, paths and the command line may not
SAME = ("n", "accuracy", "balanced_accuracy", "macro_f1", "per_class", "confusion_matrix", "epochs", "final_weights")


def _train(run_dir: Path, data: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m leukonet.train``: each run a new process (``run_module``), as a user's runs are."""
    return run_module("leukonet.train", *RUN, f"data.root={data}", f"hydra.run.dir={run_dir}", *extra, env=env)


def _history(run_dir: Path) -> list[dict]:
    """Every logged row of the training epochs: phase, losses, accuracies, each param group's lr."""
    keep = ("epoch", "step", "phase", "train/loss", "val/loss", "val/acc", "lr-AdamW", "lr-AdamW/pg1", "lr-AdamW/pg2")
    rows = list(csv.DictReader((run_dir / "csv" / "metrics.csv").open()))
    return [{k: r.get(k, "") for k in keep} for r in rows if not any(k.startswith("test/") and v for k, v in r.items())]


def _predictions(ckpt: Path) -> torch.Tensor:
    model = CellClassifier.from_checkpoint(ckpt).eval()
    x = torch.randint(0, 255, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(x)


@pytest.fixture(scope="module")
def uninterrupted(cells: Path, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("resume") / "uninterrupted"
    proc = _train(run_dir, cells)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_same_seed_gives_identical_results(uninterrupted: Path, cells: Path, tmp_path: Path) -> None:
    proc = _train(tmp_path / "again", cells)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, again = (json.loads((d / "metrics.json").read_text()) for d in (uninterrupted, tmp_path / "again"))
    assert {k: first[k] for k in SAME} == {k: again[k] for k in SAME}
    assert (uninterrupted / "predictions.csv").read_text() == (tmp_path / "again" / "predictions.csv").read_text()
    assert _history(uninterrupted) == _history(tmp_path / "again")
    assert torch.equal(_predictions(uninterrupted / "checkpoints" / "last.ckpt"),
                       _predictions(tmp_path / "again" / "checkpoints" / "last.ckpt"))


def test_a_run_killed_in_phase_2_resumes_and_ends_as_if_never_stopped(uninterrupted: Path, cells: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests" / "helpers"), os.environ.get("PYTHONPATH", "")])}
    proc = _train(run_dir, cells, "+callbacks.kill={_target_: crash.KillAt, epoch: 3, batch: 1}", env=env)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert not (run_dir / "metrics.json").exists()

    # what the killed run left: the end of epoch 2, the first of phase 2
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["epoch"] == 2
    state = next(v for k, v in saved["callbacks"].items() if k.startswith("TwoPhaseFinetuning"))
    assert state["phase"] == 2 and state["boundary_epoch"] == 2
    groups = saved["optimizer_states"][0]["param_groups"]
    assert len(groups) == 2 and all(g["lr"] == pytest.approx(1e-3) for g in groups)  # head + backbone, phase-2 lr

    proc = _train(run_dir, cells, "ckpt_path=last")
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, resumed = (json.loads((d / "metrics.json").read_text()) for d in (uninterrupted, run_dir))
    assert {k: first[k] for k in SAME} == {k: resumed[k] for k in SAME}
    assert (uninterrupted / "predictions.csv").read_text() == (run_dir / "predictions.csv").read_text()
    # same phases, learning rates and validation losses epoch by epoch, the killed epoch included
    assert _history(uninterrupted) == _history(run_dir)


def test_resuming_without_a_checkpoint_says_so(tmp_path: Path) -> None:
    proc = _train(tmp_path / "never", tmp_path, "ckpt_path=last")
    assert proc.returncode == 2 and "cannot resume" in proc.stderr and "last.ckpt does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path: Path, monkeypatch) -> None:
    from lightning.pytorch.plugins import TorchCheckpointIO

    from leukonet.training.checkpoint_io import AtomicCheckpointIO

    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"epoch": 1, "w": torch.ones(3)}, path)

    def dies_mid_write(self, checkpoint, target, storage_options=None):
        Path(target).write_bytes(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # the process is gone before the write completes

    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"epoch": 2, "w": torch.zeros(3)}, path)
    saved = torch.load(path, weights_only=True)
    assert saved["epoch"] == 1 and torch.equal(saved["w"], torch.ones(3))
