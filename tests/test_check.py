"""The dataset check on small trees: duplicates, label conflicts, leakage, conversions, sizes, the CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import run_module
from leukonet.classes import CLASSES
from leukonet.data.check import NEAR_DISTANCE, leakage, main, run_checks
from leukonet.data.folder import Entry, scan_folder
from leukonet.data.manifest import write_manifest
from leukonet.data.split import write_split
from leukonet.data.synthetic import render_cell


def _cell(label: str, i: int, size: int = 64) -> Image.Image:
    return Image.fromarray(render_cell(label, np.random.default_rng([7, CLASSES.index(label), i]), size))


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """3 distinct cells a class at 64 px, plus one of each problem."""
    root = tmp_path / "data"
    for c in CLASSES:
        (root / c).mkdir(parents=True)
        for i in range(3):
            _cell(c, i).save(root / c / f"{c}_{i}.png")
    shutil.copy(root / "neutrophil" / "neutrophil_0.png", root / "neutrophil" / "copy_of_0.png")  # exact
    _cell("lymphocyte", 0).save(root / "monocyte" / "relabelled.jpg", quality=70)  # near, other class
    _cell("eosinophil", 9).convert("RGBA").save(root / "eosinophil" / "alpha.png")
    _cell("basophil", 9).convert("L").save(root / "basophil" / "grey.png")
    _cell("monocyte", 9, size=200).save(root / "monocyte" / "big.png")  # 200 px > 3 x median 64
    _cell("lymphocyte", 9).resize((64, 24)).save(root / "lymphocyte" / "flat.png")  # aspect 2.67
    (root / "neutrophil" / "notes.jpg").write_text("not an image")
    return root


def _splits(root: Path) -> dict[str, list[Entry]]:
    """All in train except the exact copy (test) and the near duplicate (val)."""
    entries = scan_folder(root).entries
    moved = {"neutrophil/copy_of_0.png": "test", "monocyte/relabelled.jpg": "val"}
    return {s: [e for e in entries if moved.get(e.path, "train") == s] for s in ("train", "val", "test")}


def test_report_lists_every_problem(tree: Path) -> None:
    report = run_checks(tree, scan_folder(tree).entries)
    assert report["counts"] == {
        "all": {"basophil": 4, "eosinophil": 4, "lymphocyte": 4, "monocyte": 5, "neutrophil": 4}
    }
    assert [u["path"] for u in report["unreadable"]] == ["neutrophil/notes.jpg"]
    assert report["unreadable"][0]["reason"].startswith("not a readable image")
    assert {c["path"]: c["why"] for c in report["converted"]} == {
        "basophil/grey.png": "converted from greyscale (L)",
        "eosinophil/alpha.png": "converted from RGBA with transparency (composited on white)",
    }
    outliers = {o["path"]: o for o in report["size_outliers"]}
    assert report["median_size"] == [64, 64] and set(outliers) == {"monocyte/big.png", "lymphocyte/flat.png"}
    assert outliers["monocyte/big.png"]["why"] == "width 200 px > 3 x median 64; height 200 px > 3 x median 64"
    assert outliers["lymphocyte/flat.png"]["why"] == "aspect ratio 2.67 > 2"

    (exact,), (near,) = report["duplicates"]["exact"], report["duplicates"]["near"]
    assert exact["paths"] == ["neutrophil/copy_of_0.png", "neutrophil/neutrophil_0.png"]
    assert exact["scope"] == "within_class"
    assert near["paths"] == ["lymphocyte/lymphocyte_0.png", "monocyte/relabelled.jpg"]
    assert near["scope"] == "across_classes" and near["classes"] == ["lymphocyte", "monocyte"]
    assert near["distance"] <= NEAR_DISTANCE
    assert (report["label_conflicts"], report["leakage"]) == (1, 0)


def test_leakage_finds_groups_spanning_splits(tree: Path) -> None:
    exact, near = leakage(tree, _splits(tree))
    assert (exact["kind"], exact["splits"]) == ("exact", ["test", "train"])
    assert (near["kind"], near["paths"], near["splits"]) == (
        "near", ["lymphocyte/lymphocyte_0.png", "monocyte/relabelled.jpg"], ["train", "val"]
    )
    assert [g["kind"] for g in leakage(tree, _splits(tree), near=False)] == ["exact"]


def test_cli_writes_json_with_split_counts(tree: Path, tmp_path: Path) -> None:
    write_split(_splits(tree), tmp_path / "split.csv")
    assert main([str(tree), "--split-file", str(tmp_path / "split.csv"), "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert set(report["counts"]) == {"all", "train", "val", "test"}
    assert report["counts"]["test"]["neutrophil"] == 1 and report["counts"]["val"]["monocyte"] == 1
    assert (report["leakage"], report["label_conflicts"]) == (2, 1)
    assert [u["path"] for u in report["unreadable"]] == ["neutrophil/notes.jpg"] and report["unknown_folders"] == []


def test_cli_reads_a_manifest_and_its_split(tree: Path, tmp_path: Path) -> None:
    rows = [
        {"path": str(tree / e.path), "label": CLASSES[e.label], "split": s}
        for s, es in _splits(tree).items()
        for e in es
    ]
    write_manifest(rows, tmp_path / "manifest.csv")
    assert main([str(tmp_path / "manifest.csv"), "--json", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["leakage"] == 2


def test_strict_passes_a_clean_tree(tmp_path: Path) -> None:
    for c in CLASSES:
        (tmp_path / c).mkdir()
        _cell(c, 0).save(tmp_path / c / "a.png")
        shutil.copy(tmp_path / c / "a.png", tmp_path / c / "b.png")  # within a class: reported, allowed
    assert main([str(tmp_path), "--strict"]) == 0


def _cli(*args: str) -> subprocess.CompletedProcess:
    return run_module("leukonet.data.check", *args, timeout=120)


def test_strict_exit_codes(tree: Path, tmp_path: Path) -> None:
    write_split(_splits(tree), tmp_path / "split.csv")
    done = _cli(str(tree), "--split-file", str(tmp_path / "split.csv"), "--strict", "--json", str(tmp_path / "r.json"))
    assert done.returncode == 1, done.stderr
    assert "leakage: 2 groups" in " ".join(done.stdout.split()) and (tmp_path / "r.json").is_file()
    missing = _cli(str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and missing.stderr.startswith("error: data root")
    assert "Traceback" not in missing.stderr
