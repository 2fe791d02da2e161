"""Predict on new images: one row per cell, whole fields cropped, the differential count with its CI."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import run_module
from leukonet.data.cells import synthetic_field
from leukonet.predict import differential


def test_differential_count_has_exact_binomial_intervals() -> None:
    rows = {r["class"]: r for r in differential(["neutrophil"] * 60 + ["lymphocyte"] * 40, ["lymphocyte", "neutrophil", "basophil"])}
    assert rows["neutrophil"]["cells"] == 60 and rows["neutrophil"]["percent"] == 60
    # Rümke's table for a 100-cell count: 0 % -> 0-3.6 %, 40 % -> 30.3-50.3 %
    assert rows["basophil"]["ci95_low"] == 0 and rows["basophil"]["ci95_high"] == pytest.approx(3.62, abs=0.01)
    assert rows["lymphocyte"]["ci95_low"] == pytest.approx(30.33, abs=0.01)
    assert rows["lymphocyte"]["ci95_high"] == pytest.approx(50.28, abs=0.01)


def test_predict_a_folder_of_crops_and_fields(trained_run: Path, cells: Path, tmp_path: Path) -> None:
    data = tmp_path / "today"
    shutil.copytree(cells / "monocyte", data / "crops")
    (data / "crops" / "broken.jpg").write_bytes(b"not a picture")
    field, truth = synthetic_field(np.random.default_rng(0), (360, 480), 3, ["neutrophil", "lymphocyte", "eosinophil"])
    Image.fromarray(field).save(data / "field.png")
    out = tmp_path / "run"
    proc = run_module("leukonet.predict", f"ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}", f"input={data}",
                      f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    crops = [r for r in rows if Path(r["file"]).parent.name == "crops"]
    fields = [r for r in rows if r["file"].endswith("field.png")]
    assert len(crops) == 20 and all(r["cell"] == "" for r in crops)
    assert len(fields) == len(truth) and sorted(int(r["cell"]) for r in fields) == [0, 1, 2]
    summary = json.loads((out / "differential.json").read_text())
    threshold = summary["review_threshold"]  # the checkpoint's, chosen on validation (tests/test_calibration.py)
    assert summary["review_threshold_from"] == "checkpoint"
    for r in rows:
        probs = [float(r[f"p_{c}"]) for c in ("basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil")]
        assert sum(probs) == pytest.approx(1, abs=1e-4) and float(r["confidence"]) == max(probs)
        needs_review = max(probs) < threshold and r["not_a_leukocyte"] == "False"  # only leukocytes are reviewed
        assert r["needs_review"] == str(needs_review) or abs(max(probs) - threshold) < 1e-5
    flagged = sum(r["not_a_leukocyte"] == "True" for r in rows)  # not leukocytes (tests/test_ood.py): not counted
    assert summary["cells"] == 23 and sum(d["cells"] for d in summary["differential"]) == 23 - flagged
    assert [u["file"] for u in summary["unreadable"]] == [str(data / "crops" / "broken.jpg")]
    printed = proc.stdout.replace("\n", "")  # rich wraps long paths
    assert f"Differential count: {23 - flagged} cells" in " ".join(proc.stdout.split()) and "broken.jpg" in printed

    again = run_module("leukonet.predict", f"ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}", f"input={data}",
                       f"hydra.run.dir={out}")
    assert again.returncode == 2 and "exists" in again.stderr  # never overwrites results


def test_a_run_of_one_labs_cells_measures_its_own_lab_profile(trained_run: Path, cells: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = run_module("leukonet.predict", f"ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}", f"input={cells}",
                      "kind_check=true", f"hydra.run.dir={out}", "progress=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "differential.json").read_text())
    assert summary["cells"] == 100 and summary["lab_profile"] == "this run's 100 cells with a nucleus"
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert {r["unfamiliar"] for r in rows} <= {"True", "False"} and summary["unfamiliar"] == sum(
        r["unfamiliar"] == "True" and r["not_a_leukocyte"] == "False" for r in rows)


def test_predict_names_missing_inputs(trained_run: Path, tmp_path: Path) -> None:
    proc = run_module("leukonet.predict", f"ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}",
                      f"input={tmp_path / 'nowhere'}", f"hydra.run.dir={tmp_path / 'out'}")
    assert proc.returncode == 2 and "nowhere does not exist" in proc.stderr


def test_predict_the_cells_a_csv_lists(trained_run: Path, cells: Path, tmp_path: Path) -> None:
    """A manifest or a run's predictions.csv as input: its path column, relative to the CSV's folder."""
    listing = tmp_path / "list" / "cells.csv"
    listing.parent.mkdir()
    picked = sorted((cells / "eosinophil").iterdir())[:3]
    rows = [f"{p},eosinophil" for p in picked] + ["gone/missing.png,eosinophil", f"{picked[0]},eosinophil"]
    listing.write_text("path,label\n" + "\n".join(rows) + "\n")
    out = tmp_path / "run"
    proc = run_module("leukonet.predict", f"ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}", f"input={listing}",
                      f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "differential.json").read_text())
    assert summary["files"] == 4 and summary["cells"] == 3  # each file once; the missing one named, skipped
    assert [u["file"] for u in summary["unreadable"]] == [str(listing.parent / "gone" / "missing.png")]
    assert "file not found" in summary["unreadable"][0]["reason"]
    (tmp_path / "bad.csv").write_text("file,label\nx.png,basophil\n")
    bad = run_module("leukonet.predict", f"ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}",
                     f"input={tmp_path / 'bad.csv'}", f"hydra.run.dir={tmp_path / 'bad'}")
    assert bad.returncode == 2 and "needs a 'path' column" in bad.stderr
