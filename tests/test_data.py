"""Folder scanning, class aliases, the split, junk files and the data summary."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from leukonet.classes import CLASSES, canonical_class
from leukonet.data.datamodule import CellDataModule
from leukonet.data.folder import scan_folder
from leukonet.data.split import read_split
from leukonet.errors import DataError


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("neutrophil", "neutrophil"), ("NEUTROPHIL", "neutrophil"), ("Neutrophils", "neutrophil"),
        ("neut", "neutrophil"), ("lymp", "lymphocyte"), ("Lymphocytes", "lymphocyte"),
        ("mono", "monocyte"), ("eosi", "eosinophil"), ("EOSINOPHIL", "eosinophil"),
        ("baso", "basophil"), ("2_basophil", "basophil"), ("EOS", "eosinophil"),
        ("ig", None), ("platelet", None), ("erythroblast", None), ("", None), ("band_neutrophils", "neutrophil"),
        ("monoblast", None), ("Lymphoblasts", None), ("basophilic erythroblast", None), ("NEUTROPHIL, EOSINOPHIL", None),
    ],
)
def test_class_aliases(name: str, expected: str | None) -> None:
    assert canonical_class(name) == expected


def _tree(root: Path, folders: dict[str, int], size: int = 40) -> Path:
    rng = np.random.default_rng(0)
    for folder, n in folders.items():
        (root / folder).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / folder / f"c{i}.png")
    return root


def test_scan_matches_aliases_and_reports_the_rest(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"NEUT": 2, "Lymphocytes": 3, "mono": 1, "eosi": 1, "baso": 1, "platelet": 2})
    (root / "NEUT" / "notes.txt").write_text("not an image")
    with pytest.warns(UserWarning, match="platelet"):
        scan = scan_folder(root)
    labels = sorted(CLASSES[e.label] for e in scan.entries)
    assert labels == ["basophil", "eosinophil", "lymphocyte", "lymphocyte", "lymphocyte", "monocyte", "neutrophil", "neutrophil"]
    assert scan.unknown_folders == ["platelet"] and scan.ignored_files == ["NEUT/notes.txt"]


def test_scan_of_a_folder_without_classes_says_what_it_expected(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    with pytest.raises(ValueError, match="expected one folder per class"):
        scan_folder(tmp_path)


def _datamodule(root: Path, out: Path, **kw) -> CellDataModule:
    dm = CellDataModule(root=str(root), image_size=32, num_workers=0, output_dir=str(out), **kw)
    dm.setup("fit")
    return dm


def test_split_is_stratified_deterministic_and_disjoint(cells: Path, tmp_path: Path) -> None:
    a = _datamodule(cells, tmp_path / "a")
    b = _datamodule(cells, tmp_path / "b")
    assert (tmp_path / "a" / "split.csv").read_bytes() == (tmp_path / "b" / "split.csv").read_bytes()
    splits = read_split(tmp_path / "a" / "split.csv")
    paths = [e.path for s in splits.values() for e in s]
    assert len(paths) == len(set(paths)) == 100  # every image once, none in two splits
    for s, n in (("train", 14), ("val", 3), ("test", 3)):  # 70/15/15 of 20, per class
        counts = np.bincount([e.label for e in splits[s]], minlength=5)
        assert counts.tolist() == [n] * 5
    assert [e.path for e in a.entries("test")] == [e.path for e in b.entries("test")]


def test_split_depends_on_seed(cells: Path, tmp_path: Path) -> None:
    a = _datamodule(cells, tmp_path / "a", split_seed=42)
    b = _datamodule(cells, tmp_path / "b", split_seed=7)
    assert [e.path for e in a.entries("test")] != [e.path for e in b.entries("test")]


def test_split_file_is_reused(cells: Path, tmp_path: Path) -> None:
    _datamodule(cells, tmp_path / "a")
    b = _datamodule(cells, tmp_path / "b", split_file=str(tmp_path / "a" / "split.csv"), split_seed=7)
    assert (tmp_path / "a" / "split.csv").read_bytes() == (tmp_path / "b" / "split.csv").read_bytes()
    assert len(b.entries("train")) == 70


def test_split_file_naming_missing_images_is_refused(cells: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(cells, copy)
    _datamodule(copy, tmp_path / "a")
    gone = next((copy / "monocyte").glob("*.png"))
    gone.unlink()
    with pytest.raises(DataError, match=gone.name):
        _datamodule(copy, tmp_path / "b", split_file=str(tmp_path / "a" / "split.csv"))


def test_junk_file_is_skipped_named_and_counted(cells: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(cells, copy)
    junk = copy / "neutrophil" / ".DS_169665.jpg"  # as in the PBC download: a macOS metadata file
    junk.write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(6000))
    with pytest.warns(UserWarning, match=r"\.DS_169665\.jpg: not a readable image"):
        dm = _datamodule(copy, tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "data_summary.json").read_text())
    assert [s["path"] for s in summary["skipped"]] == ["neutrophil/.DS_169665.jpg"]
    assert sum(summary["total"].values()) == 100
    assert ".DS_169665.jpg" not in (tmp_path / "run" / "split.csv").read_text()
    assert all(len(dm.loader(s).dataset) for s in ("train", "val", "test"))


def test_a_class_without_images_stops_training_with_its_name(tmp_path: Path) -> None:
    root = _tree(tmp_path / "data", {"neutrophil": 4, "lymphocyte": 4, "monocyte": 4, "eosinophil": 4})
    with pytest.raises(ValueError, match="basophil"):
        _datamodule(root, tmp_path / "run")


def test_batches_are_uint8_images_of_the_configured_size(cells: Path, tmp_path: Path) -> None:
    import albumentations as A

    dm = _datamodule(cells, tmp_path, augment={"flip": A.HorizontalFlip(p=0.5)}, batch_size=8)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 32, 32) and str(x.dtype) == "torch.uint8" and y.shape == (8,)


def test_copies_of_one_picture_stay_in_one_split(cells: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(cells, copy)
    originals = sorted((copy / "monocyte").glob("*.png"))
    for i, src in enumerate(originals[:6]):  # six exact copies and one re-encoded near copy
        shutil.copy(src, src.with_name(f"dup_{i}.png"))
    Image.open(originals[7]).save(copy / "monocyte" / "near_7.jpg", quality=70)
    dm = _datamodule(copy, tmp_path / "run")
    split_of = {e.path: s for s in ("train", "val", "test") for e in dm.entries(s)}
    assert len(dm.duplicate_groups) == 7
    for group in dm.duplicate_groups:
        assert len({split_of[p] for p in group}) == 1, group


def test_a_split_file_that_leaks_is_refused_unless_allowed(cells: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(cells, copy)
    _datamodule(copy, tmp_path / "a")
    rows = (tmp_path / "a" / "split.csv").read_text().splitlines()
    train_row = next(r for r in rows if r.endswith(",train") and "eosinophil" in r)
    test_row = next(r for r in rows if r.endswith(",test") and "eosinophil" in r)
    shutil.copy(copy / train_row.split(",")[0], copy / test_row.split(",")[0])  # a test image = a train image
    with pytest.raises(DataError, match="span splits"):
        _datamodule(copy, tmp_path / "b", split_file=str(tmp_path / "a" / "split.csv"))
    with pytest.warns(UserWarning, match="span splits"):
        _datamodule(copy, tmp_path / "c", split_file=str(tmp_path / "a" / "split.csv"), allow_leakage=True)
