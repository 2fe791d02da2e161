"""One short run on the real PBC cells, then the external BCCD set (skipped without the data)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_module

pytestmark = pytest.mark.realdata


@pytest.fixture(scope="module")
def pbc_run(real_data: Path, tmp_path_factory) -> Path:
    """Lite0 (offline ImageNet weights) at 64 px, one epoch a phase, on all 2,500 PBC cells."""
    run = tmp_path_factory.mktemp("pbc") / "run"
    proc = run_module(
        "leukonet.train", "+experiment=two_phase_lite0", f"data.root={real_data / 'pbc-2500'}",
        f"hydra.run.dir={run}", "data.image_size=64", "data.batch_size=64",
        "callbacks.two_phase.phase1.max_epochs=1", "callbacks.two_phase.phase2.max_epochs=1",
        "callbacks.two_phase.phase2.lr=1e-4", "trainer.enable_progress_bar=false", "~callbacks.progress_bar", timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ".DS_169665.jpg: not a readable image" in proc.stderr  # the junk file, named
    return run


def test_pbc_short_run(pbc_run: Path) -> None:
    summary = json.loads((pbc_run / "data_summary.json").read_text())
    assert summary["total"] == {"train": 1750, "val": 375, "test": 375}
    assert [s["path"] for s in summary["skipped"]] == ["neutrophil/.DS_169665.jpg"]
    metrics = json.loads((pbc_run / "metrics.json").read_text())
    assert metrics["n"] == 375 and "Acevedo" in metrics["citation"]
    assert metrics["accuracy"] > 0.5  # chance is 0.2; two epochs of ImageNet features do far better


def test_bccd_external_evaluation(pbc_run: Path, real_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "bccd"
    proc = run_module("leukonet.evaluate", f"ckpt_path={pbc_run / 'checkpoints' / 'last.ckpt'}",
                      f"data.root={real_data / 'bccd-crops'}", f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 351 and metrics["per_class"]["basophil"]["support"] == 3
    assert "BCCD" in metrics["citation"]
