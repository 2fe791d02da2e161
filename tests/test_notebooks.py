"""The notebooks run top to bottom on synthetic cells, and are committed without outputs."""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
from pathlib import Path

import nbformat
import pytest
from ipykernel.kernelspec import write_kernel_spec
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

from conftest import REPO, compose_cfg
from leukonet.classes import CLASSES
from leukonet.evaluate import evaluate

NOTEBOOKS = REPO / "notebooks"
NAMES = ("01_data_tour.ipynb", "02_results.ipynb")
KERNEL = "leukonet-test"
ENV = ("LEUKONET_DATA_ROOT", "LEUKONET_DATA_DIR", "LEUKONET_OVERRIDES", "LEUKONET_RUN_DIR", "LEUKONET_OUTPUTS")


@pytest.fixture(scope="module")
def kernels(tmp_path_factory) -> Path:
    """A kernelspec that runs this interpreter (the venv's python), kept in a temporary folder:
    a python3 kernel in the user's Jupyter folders would otherwise take precedence."""
    folder = tmp_path_factory.mktemp("kernels")
    write_kernel_spec(folder / KERNEL)
    assert json.loads((folder / KERNEL / "kernel.json").read_text())["argv"][0] == sys.executable
    return folder


@pytest.fixture
def env(monkeypatch) -> pytest.MonkeyPatch:
    """The notebooks' parameters, cleared: each test sets its own (the kernel inherits them)."""
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def execute(name: str, kernels: Path) -> list[dict]:
    """Run a notebook in notebooks/ (its working directory) top to bottom; return its outputs."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    km = KernelManager(kernel_name=KERNEL, kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)]))
    NotebookClient(nb, km=km, timeout=120, resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code)
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]  # nbclient raises on one anyway
    return outputs


def text(outputs: list[dict]) -> str:
    """Everything the notebook printed or displayed as text or markdown."""
    parts = [o.get("text", "") for o in outputs]
    parts += [o.get("data", {}).get(kind, "") for o in outputs for kind in ("text/markdown", "text/plain")]
    return "\n".join(parts)


def images(outputs: list[dict]) -> int:
    return sum("image/png" in o.get("data", {}) for o in outputs)


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebooks_have_no_outputs(name: str) -> None:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    assert nb.cells[0].cell_type == "markdown" and "LEUKONET_" in nb.cells[0].source  # parameters documented
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]


def test_data_tour_on_synthetic_cells(kernels: Path, env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env.setenv("LEUKONET_DATA_DIR", str(tmp_path))
    env.setenv("LEUKONET_OVERRIDES", "data.synthetic_cfg.n_per_class=12 data.synthetic_cfg.size=48 data.image_size=48")
    outputs = execute("01_data_tour.ipynb", kernels)
    shown = text(outputs)
    assert images(outputs) == 3  # bar chart, sample grid, augmentation preview
    assert "synthetic" in shown and all(f"| {c} | 8 | 2 | 2 | 12 |" in shown for c in CLASSES)
    assert "data.augment: rotate=Rotate, crop=RandomResizedCrop" in shown  # conf/data/augment/report.yaml
    assert "Unreadable files skipped: 0" in shown
    assert (tmp_path / "synthetic-n12-s48-seed0" / ".complete").is_file()  # generated where told, not in the repo


def test_data_tour_lists_what_a_folder_scan_skipped(
    kernels: Path, env: pytest.MonkeyPatch, cells: Path, tmp_path: Path
) -> None:
    root = tmp_path / "my-cells"
    shutil.copytree(cells, root)
    (root / "neutrophil" / "broken.png").write_bytes(b"not a png")
    (root / "neutrophil" / "notes.txt").write_text("stain batch 3")
    (root / "platelet").mkdir()
    shutil.copy(root / "basophil" / "basophil_0000.png", root / "platelet" / "p.png")
    env.setenv("LEUKONET_DATA_ROOT", str(root))
    env.setenv("LEUKONET_OVERRIDES", "data.image_size=48")
    outputs = execute("01_data_tour.ipynb", kernels)
    shown = text(outputs)
    assert images(outputs) == 3
    assert "my-cells" in shown and "| **total** | " in shown
    assert "Unreadable files skipped: 1" in shown and "`neutrophil/broken.png`" in shown and "not a readable image" in shown
    assert "`platelet`" in shown and "`neutrophil/notes.txt`" in shown


def test_results_of_the_newest_run_with_an_external_evaluation(
    kernels: Path, env: pytest.MonkeyPatch, trained_run: Path, cells: Path, tmp_path: Path
) -> None:
    outputs_dir = tmp_path / "outputs"
    keep = shutil.ignore_patterns("checkpoints", "tensorboard")  # the shared run is copied, never changed
    older, run = outputs_dir / "demo" / "older", outputs_dir / "demo" / "newer"
    shutil.copytree(trained_run, older, ignore=keep)
    shutil.copytree(trained_run, run, ignore=keep)
    os.utime(older / "metrics.json", (1e9, 1e9))
    # an evaluation of the run's checkpoint on another folder, saved inside the run directory
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    evaluate(compose_cfg("evaluate", [f"ckpt_path={ckpt}", f"data.root={cells}", "data.num_workers=0"], run / "eval-cells"))
    # newest of all, but an evaluation, not a training run: never picked as the run
    shutil.copytree(run / "eval-cells", outputs_dir / "evaluate" / "latest")

    env.setenv("LEUKONET_OUTPUTS", str(outputs_dir))
    outputs = execute("02_results.ipynb", kernels)
    shown = text(outputs)
    with open(run / "predictions.csv", newline="") as fh:
        wrong = any(row["correct"] == "0" for row in csv.DictReader(fh))
    assert images(outputs) == 2 + wrong  # curves, confusion matrix, misclassified gallery (if any)
    assert str(run) in shown and "phase 1 2, phase 2 2" in shown
    table = shown[shown.index("| folder | dataset |"):]
    assert "| (this run) | synthetic | test | 15 |" in table
    assert "| eval-cells | cells | all | 100 |" in table
    assert "**Worst domain**" in table
