"""The notebooks are committed with the outputs of their defaults (the embedded sample, the committed run
experiments/two_phase/), run top to bottom on every other input, and re-executed still give outputs of
the committed shape: per code cell the same kinds of output (stream, figure, table), values aside."""

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
TWO_PHASE = REPO / "experiments" / "two_phase"
MAX_BYTES = 3_000_000  # both notebooks together, figures included


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


def committed(name: str) -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOKS / name, as_version=4)


def execute(name: str, kernels: Path) -> nbformat.NotebookNode:
    """Run a notebook in notebooks/ (its working directory) top to bottom; return it with its new outputs."""
    nb = committed(name)
    km = KernelManager(kernel_name=KERNEL, kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)]))
    NotebookClient(nb, km=km, timeout=120, resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code)
    assert not [o for o in outputs(nb) if o.output_type == "error"]  # nbclient raises on one anyway
    return nb


def outputs(nb: nbformat.NotebookNode) -> list[dict]:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]


def text(outs: list[dict]) -> str:
    """Everything the notebook printed or displayed as text or markdown."""
    parts = [o.get("text", "") for o in outs]
    parts += [o.get("data", {}).get(kind, "") for o in outs for kind in ("text/markdown", "text/plain")]
    return "\n".join(parts)


def images(outs: list[dict]) -> int:
    return sum("image/png" in o.get("data", {}) for o in outs)


def shape(nb: nbformat.NotebookNode) -> list[list[tuple]]:
    """Per code cell, its outputs' kinds: ("stream", stdout|stderr), or the output type and its mime types.
    Consecutive writes to one stream are one output (how a kernel chunks its prints varies)."""
    cells = []
    for cell in (c for c in nb.cells if c.cell_type == "code"):
        kinds: list[tuple] = []
        for o in cell.outputs:
            if o.output_type == "stream":
                kind = ("stream", o.name)
                if kinds and kinds[-1] == kind:
                    continue
            elif o.output_type == "error":
                kind = ("error", o.ename)
            else:
                kind = (o.output_type, *sorted(o.data))
            kinds.append(kind)
        cells.append(kinds)
    return cells


def assert_committed_shape(name: str, fresh: nbformat.NotebookNode) -> None:
    """The outputs of a new run have the shape of the committed ones, cell by cell."""
    old = committed(name)
    sources = [c.source.splitlines()[0] for c in old.cells if c.cell_type == "code"]
    assert [c.source for c in fresh.cells] == [c.source for c in old.cells]
    for source, was, now in zip(sources, shape(old), shape(fresh)):
        assert now == was, f"{name}, cell starting {source!r}: outputs {now}, committed {was}; re-execute it (notebooks/README.md)"


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebooks_hold_the_outputs_of_one_clean_run(name: str) -> None:
    raw = (NOTEBOOKS / name).read_text(encoding="utf-8")
    nb = nbformat.reads(raw, as_version=4)
    nbformat.validate(nb)
    assert nb.cells[0].cell_type == "markdown" and "LEUKONET_" in nb.cells[0].source  # parameters documented
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), "run top to bottom once"
    assert all(c.outputs for c in code[1:]), "every cell after the imports shows something"
    outs = outputs(nb)
    assert not [o for o in outs if o.output_type == "error"]
    assert not [o.text for o in outs if o.output_type == "stream" and o.name == "stderr"]  # no warnings
    assert images(outs) >= 3
    assert str(REPO) not in raw  # paths are shown relative to the repository root
    assert not [c.metadata for c in code if "execution" in c.metadata]  # no timings, which churn
    assert sum((NOTEBOOKS / n).stat().st_size for n in NAMES) < MAX_BYTES


def test_data_tour_defaults_to_the_embedded_sample(kernels: Path, env: pytest.MonkeyPatch) -> None:
    nb = execute("01_data_tour.ipynb", kernels)
    assert_committed_shape("01_data_tour.ipynb", nb)
    shown = text(outputs(nb))
    assert "pbc-sample: leukonet/data/sample, 500 images at 224 px" in shown
    assert "Acevedo" in shown  # the sample's source, cited
    assert all(f"| {c} | 70 | 15 | 15 | 100 |" in shown for c in CLASSES)
    assert images(outputs(nb)) == 3


@pytest.mark.realdata
def test_results_default_to_the_committed_run(kernels: Path, env: pytest.MonkeyPatch, real_data: Path) -> None:
    nb = execute("02_results.ipynb", kernels)
    assert_committed_shape("02_results.ipynb", nb)
    shown = text(outputs(nb))
    assert "(`experiments/two_phase`)" in shown and "78 epochs: phase 1 29, phase 2 49" in shown  # from history.csv
    assert "| (this run) | pbc-2500 | test | 375 |" in shown and "| bccd | bccd-crops | all | 351 |" in shown
    if real_data == REPO.parent / "shared" / "data":  # where predictions.csv's paths point
        assert "not found" not in shown and images(outputs(nb)) == 3


@pytest.mark.parametrize("found", [0, 2])
def test_results_gallery_without_the_images(kernels: Path, env: pytest.MonkeyPatch, tmp_path: Path, found: int) -> None:
    """The committed run's misclassified cells where the data is not beside the checkout: the ones found
    are drawn, else the run's own misclassified.png is shown; the notebook keeps the committed shape."""
    run = tmp_path / "two_phase"
    shutil.copytree(TWO_PHASE, run, ignore=shutil.ignore_patterns("*.png", "split.csv"))
    shutil.copy(TWO_PHASE / "misclassified.png", run)
    with open(run / "predictions.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    available = sorted((REPO / "leukonet" / "data" / "sample" / "basophil").glob("*.jpg"))
    wrong = [row for row in rows if row["correct"] == "0"]
    for k, row in enumerate(wrong):
        row["path"] = os.path.relpath(available[k], REPO) if k < found else f"not-here/{Path(row['path']).name}"
    with open(run / "predictions.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    env.setenv("LEUKONET_RUN_DIR", str(run))
    nb = execute("02_results.ipynb", kernels)
    assert_committed_shape("02_results.ipynb", nb)
    shown = text(outputs(nb))
    assert f"{len(wrong)} of 375 cells (test split) misclassified; showing {found}" in shown
    assert f"{len(wrong) - found} of their images not found (e.g. not-here/" in shown
    assert ("the gallery the run drew" in shown) == (found == 0)
    assert images(outputs(nb)) == 3


def test_data_tour_on_synthetic_cells(kernels: Path, env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env.setenv("LEUKONET_DATA_DIR", str(tmp_path))
    env.setenv("LEUKONET_OVERRIDES",
               "data=synthetic data.synthetic_cfg.n_per_class=12 data.synthetic_cfg.size=48 data.image_size=48")
    outs = outputs(execute("01_data_tour.ipynb", kernels))
    shown = text(outs)
    assert images(outs) == 3  # bar chart, sample grid, augmentation preview
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
    outs = outputs(execute("01_data_tour.ipynb", kernels))
    shown = text(outs)
    assert images(outs) == 3
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
    outs = outputs(execute("02_results.ipynb", kernels))
    shown = text(outs)
    with open(run / "predictions.csv", newline="", encoding="utf-8") as fh:
        wrong = any(row["correct"] == "0" for row in csv.DictReader(fh))
    assert images(outs) == 2 + wrong  # curves, confusion matrix, misclassified gallery (if any)
    assert str(run) in shown and "phase 1 2, phase 2 2" in shown
    assert "not found" not in shown  # the synthetic cells, where training wrote them
    table = shown[shown.index("| folder | dataset |"):]
    assert "| (this run) | synthetic | test | 15 |" in table
    assert "| eval-cells | cells | all | 100 |" in table
    assert "**Worst domain**" in table
