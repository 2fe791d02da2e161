"""One short run on the real PBC cells, then the external BCCD set (skipped without the data)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_module

pytestmark = pytest.mark.realdata


def test_pbc_short_run_then_the_bccd_cells(real_data: Path, tmp_path: Path) -> None:
    """Lite0 (offline ImageNet weights) at 64 px, one epoch a phase, on all 2,500 PBC cells; then its checkpoint on
    BCCD's 351 crops. One test, not a module fixture: pytest-xdist's work stealing may put two tests of one module on
    two workers, and each would train. The not-a-leukocyte check is left out of the evaluation (a minute of one
    core here): tests/test_cell_kind.py checks it on real cells of every kind, tests/test_ood.py inside evaluate, and
    experiments/new_lab measures it on BCCD."""
    run = tmp_path / "run"
    proc = run_module(
        "leukonet.train", "+experiment=two_phase_lite0", f"data.root={real_data / 'pbc-2500'}",
        f"hydra.run.dir={run}", "data.image_size=64", "data.batch_size=64",
        "callbacks.two_phase.phase1.max_epochs=1", "callbacks.two_phase.phase2.max_epochs=1",
        "callbacks.two_phase.phase2.lr=1e-4", "trainer.enable_progress_bar=false", "~callbacks.progress_bar", timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ".DS_169665.jpg: not a readable image" in proc.stderr  # the junk file, named
    summary = json.loads((run / "data_summary.json").read_text())
    assert summary["total"] == {"train": 1750, "val": 375, "test": 375}
    assert [s["path"] for s in summary["skipped"]] == ["neutrophil/.DS_169665.jpg"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["n"] == 375 and "Acevedo" in metrics["citation"]
    assert metrics["accuracy"] > 0.5  # chance is 0.2; two epochs of ImageNet features do far better

    out = tmp_path / "bccd"
    proc = run_module("leukonet.evaluate", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
                      f"data.root={real_data / 'bccd-crops'}", f"hydra.run.dir={out}", "kind_check=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 351 and metrics["per_class"]["basophil"]["support"] == 3
    assert "BCCD" in metrics["citation"] and "not_a_leukocyte" not in metrics
