"""``python -m leukonet.data.prepare``: each dataset layout, on small look-alikes written here."""

from __future__ import annotations

import csv
import hashlib
import io
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import run_module
from leukonet.classes import CLASSES
from leukonet.data import prepare
from leukonet.data.datamodule import CellDataModule
from leukonet.data.manifest import read_manifest
from leukonet.data.split import SPLITS
from leukonet.errors import DataError

PBC_PREFIX = {"basophil": "BA", "eosinophil": "EO", "erythroblast": "ERB", "ig": "IG", "lymphocyte": "LY",
              "monocyte": "MO", "neutrophil": "SNE", "platelet": "PLATELET"}
PBC_COUNTS = {"basophil": 2, "eosinophil": 1, "erythroblast": 3, "ig": 4, "lymphocyte": 2, "monocyte": 1,
              "neutrophil": 3, "platelet": 1}
EXCLUDED = {f"{c}: not one of our five classes": PBC_COUNTS[c] for c in ("erythroblast", "ig", "platelet")}


def _image_bytes(seed: int = 0, size: int = 40, fmt: str = "JPEG") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def _image(path: Path, seed: int = 0, size: int = 40) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_image_bytes(seed, size, "PNG" if path.suffix == ".png" else "JPEG"))
    return path


def _written(rows: list[dict[str, str]], out: Path):
    """Write the manifest, check it reads back as the same entries, all of them existing files."""
    prepare.write(rows, out)
    entries, splits = read_manifest(out)
    expected = sorted((prepare.manifest_path(r["path"], out.parent), r["label"]) for r in rows)
    assert sorted((e.path, CLASSES[e.label]) for e in entries) == expected
    assert all(not e.path.startswith("/") and (out.parent / e.path).is_file() for e in entries)
    return entries, splits


def _labels(rows) -> Counter:
    return Counter(r["label"] for r in rows)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- folder ------------------------------------------------------------------------------------------
def test_folder_keeps_aliased_classes_and_reports_the_rest(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for folder, n in {"NEUT": 3, "Lymphocytes": 2, "mono": 1, "eosi": 1, "baso": 1, "platelet": 2}.items():
        for i in range(n):
            _image(root / folder / f"c{i}.png", seed=i)
    (root / "NEUT" / "notes.txt").write_text("not an image")
    (root / "NEUT" / ".DS_1.jpg").write_bytes(b"\x00\x00\x00\x01Bud1")  # macOS metadata named .jpg
    rows, left = prepare.from_folder(root)
    assert _labels(rows) == {"neutrophil": 3, "lymphocyte": 2, "monocyte": 1, "eosinophil": 1, "basophil": 1}
    assert dict(left) == {
        "folder platelet/: not one of our five classes": 2,
        "not an image file": 1,
        "not a readable image": 1,
    }
    assert left.examples["not a readable image"] == ["NEUT/.DS_1.jpg"]
    entries, splits = _written(rows, tmp_path / "manifests" / "data.csv")
    assert splits is None and all(e.path.startswith("../data/") for e in entries)


def test_folder_manifest_loads_in_the_datamodule(tmp_path: Path) -> None:
    root = tmp_path / "cells"
    for k, cls in enumerate(CLASSES):
        for i in range(10):
            _image(root / cls / f"{cls}_{i}.jpg", seed=10 * k + i)
    out = tmp_path / "manifests" / "cells.csv"
    prepare.main(["folder", str(root), "--out", str(out)])
    dm = CellDataModule(manifest=str(out), image_size=32, num_workers=0, output_dir=str(tmp_path / "run"))
    dm.setup("fit")
    assert sum(len(dm.entries(s)) for s in SPLITS) == 50 and not dm.skipped
    assert {e.label for e in dm.entries("train")} == set(range(len(CLASSES)))
    images, _ = next(iter(dm.train_dataloader()))
    assert tuple(images.shape[1:]) == (3, 32, 32)


# -- csv ---------------------------------------------------------------------------------------------
def test_csv_maps_labels_keeps_splits_and_counts_what_it_leaves_out(tmp_path: Path) -> None:
    for i in range(6):
        _image(tmp_path / "images" / f"{i}.png", seed=i)
    table = tmp_path / "lists" / "labels.csv"
    table.parent.mkdir()
    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "Label", "split", "note"])
        w.writerow(["../images/0.png", "NEUT", "train", "x"])
        w.writerow(["../images/1.png", "Eosinophils", "val", ""])
        w.writerow([str(tmp_path / "images" / "2.png"), "lymphocyte", "test", ""])  # absolute path
        w.writerow(["../images/3.png", "platelet", "train", ""])
        w.writerow(["../images/4.png", "ig", "train", ""])
        w.writerow(["../images/5.png", "NEUTROPHIL, EOSINOPHIL", "train", ""])
        w.writerow(["../images/missing.png", "monocyte", "train", ""])
    rows, left = prepare.from_csv(table)
    assert {(Path(r["path"]).name, r["label"], r["split"]) for r in rows} == {
        ("0.png", "neutrophil", "train"), ("1.png", "eosinophil", "val"), ("2.png", "lymphocyte", "test"),
    }
    assert dict(left) == {
        "label 'platelet': not one of our five classes": 1,
        "label 'ig': not one of our five classes": 1,
        "several labels": 1,
        "image file not found": 1,
    }
    assert left.examples["image file not found"] == ["../images/missing.png"]
    _, splits = _written(rows, tmp_path / "labels_manifest.csv")
    assert {s: len(splits[s]) for s in SPLITS} == {"train": 1, "val": 1, "test": 1}


def test_cli_names_the_file_whose_header_lacks_path_and_label(tmp_path: Path) -> None:
    table = tmp_path / "labels.csv"
    table.write_text("file,class\na.png,neutrophil\n")
    out = tmp_path / "m.csv"
    done = run_module("leukonet.data.prepare", "csv", str(table), "--out", str(out), timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"error: {table}: expected a header with columns path,label")
    assert "Traceback" not in done.stderr and not out.exists()


# -- pbc ---------------------------------------------------------------------------------------------
def _pbc_files() -> dict[str, bytes]:
    """PBC_dataset_normal_DIB/<class>/<PREFIX>_<n>.jpg for the eight classes, plus the junk file."""
    files = {
        f"PBC_dataset_normal_DIB/{cls}/{PBC_PREFIX[cls]}_{100 + i}.jpg": _image_bytes(i)
        for cls, n in PBC_COUNTS.items()
        for i in range(n)
    }
    files["PBC_dataset_normal_DIB/neutrophil/.DS_169665.jpg"] = b"\x00\x00\x00\x01Bud1"
    return files


def test_pbc_folder_nested_one_level_keeps_the_five_leukocyte_classes(tmp_path: Path) -> None:
    download = tmp_path / "download"
    for name, data in _pbc_files().items():
        (download / "PBC" / name).parent.mkdir(parents=True, exist_ok=True)
        (download / "PBC" / name).write_bytes(data)
    (download / "README.txt").write_text("Acevedo et al. 2020")
    rows, left = prepare.from_pbc(download, tmp_path / "unused")
    assert _labels(rows) == {c: PBC_COUNTS[c] for c in CLASSES}
    assert dict(left) == {**EXCLUDED, "hidden file (macOS metadata)": 1, "outside the class folders": 1}
    assert {r["source"] for r in rows} >= {"download/PBC/PBC_dataset_normal_DIB/basophil/BA_100.jpg"}
    assert not (tmp_path / "unused").exists()
    _, splits = _written(rows, tmp_path / "pbc.csv")
    assert splits is None


def test_pbc_zip_extracts_only_kept_images_safely(tmp_path: Path, capsys) -> None:
    archive = tmp_path / "dl" / "PBC_dataset_normal_DIB.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("PBC_dataset_normal_DIB/", b"")
        for name, data in _pbc_files().items():
            zf.writestr(name, data)
        zf.writestr("PBC_dataset_normal_DIB/monocyte/MO_broken.jpg", b"truncated")
        zf.writestr("__MACOSX/PBC_dataset_normal_DIB/basophil/._BA_100.jpg", b"\x00\x05\x16\x07")
        zf.writestr(zipfile.ZipInfo("../../evil.jpg"), _image_bytes(9))
        zf.writestr(zipfile.ZipInfo("/tmp/evil.jpg"), _image_bytes(9))
    before = _digest(archive)
    target = tmp_path / "out" / "pbc_images"
    rows, left = prepare.from_pbc(archive, target)
    assert _labels(rows) == {c: PBC_COUNTS[c] for c in CLASSES}
    assert dict(left) == {
        **EXCLUDED,
        "hidden file (macOS metadata)": 1,
        "macOS metadata (__MACOSX/)": 1,
        "unsafe path in the zip (absolute or '..')": 2,
        "not a readable image": 1,
    }
    extracted = sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file())
    assert extracted == sorted(f"{c}/{PBC_PREFIX[c]}_{100 + i}.jpg" for c in CLASSES for i in range(PBC_COUNTS[c]))
    assert not list(tmp_path.rglob("evil.jpg")) and _digest(archive) == before
    assert {r["source"] for r in rows} >= {"PBC_dataset_normal_DIB.zip:PBC_dataset_normal_DIB/basophil/BA_100.jpg"}
    _written(rows, tmp_path / "out" / "pbc.csv")
    with pytest.raises(DataError, match="pbc_images exists and is not empty; pass --force"):
        prepare.from_pbc(archive, target)
    assert len(prepare.from_pbc(archive, target, force=True)[0]) == len(rows)

    out = tmp_path / "m" / "pbc.csv"  # the CLI extracts beside the manifest by default
    prepare.main(["pbc", str(archive), "--out", str(out)])
    assert (tmp_path / "m" / "pbc_images" / "basophil" / "BA_100.jpg").is_file()
    assert read_manifest(out)[0][0].path.startswith("pbc_images/")
    printed = capsys.readouterr().out
    assert "left out: 13" in printed and "erythroblast" in printed and "../../evil.jpg" in printed


# -- table -------------------------------------------------------------------------------------------
def test_table_like_bccd_labels_csv(tmp_path: Path) -> None:
    master = tmp_path / "BCCD" / "dataset-master"
    for i in range(7):
        _image(master / "JPEGImages" / f"BloodImage_{i:05d}.jpg", seed=i)
    (master / "labels.csv").write_text(
        ",Image,Category\n0,0,NEUTROPHIL\n1,1,BASOPHIL\n2,2,\"NEUTROPHIL, EOSINOPHIL\"\n3,3,\n"
        "4,4,LYMPHOCYTE\n5,5,MONOCYTE\n6,6,EOSINOPHIL\n7,7,NEUTROPHIL\n"
    )
    rows, left = prepare.from_table(master / "labels.csv", master / "JPEGImages")
    assert {Path(r["path"]).name: r["label"] for r in rows} == {
        "BloodImage_00000.jpg": "neutrophil", "BloodImage_00001.jpg": "basophil", "BloodImage_00004.jpg": "lymphocyte",
        "BloodImage_00005.jpg": "monocyte", "BloodImage_00006.jpg": "eosinophil",
    }
    assert dict(left) == {"several labels": 1, "empty label": 1, "image file not found": 1}
    assert left.examples == {
        "several labels": ["id 2: 'NEUTROPHIL, EOSINOPHIL'"], "empty label": ["id 3: ''"],
        "image file not found": ["BloodImage_00007.jpg"],
    }
    assert rows[0]["source"] == "labels.csv:2"
    _written(rows, tmp_path / "bccd.csv")


def test_table_with_codes_through_the_cli(tmp_path: Path) -> None:
    for name in ("a1", "a2", "a3"):
        _image(tmp_path / "imgs" / f"{name}.png")
    (tmp_path / "table.csv").write_text("Image ID,Class Label\na1,1\na2,2.0\na3,9\n")
    out = tmp_path / "coded.csv"
    prepare.main(["table", str(tmp_path / "table.csv"), "--images", str(tmp_path / "imgs"), "--pattern", "{id}.png",
                  "--codes", "1=neutrophil,2=EOS", "--out", str(out)])
    entries, _ = read_manifest(out)
    assert {(e.path, CLASSES[e.label]) for e in entries} == {("imgs/a1.png", "neutrophil"), ("imgs/a2.png", "eosinophil")}
    rows, left = prepare.from_table(tmp_path / "table.csv", tmp_path / "imgs", "{id}.png", codes={"1": "neutrophil"})
    assert dict(left) == {"label '2.0' not in --codes": 1, "label '9' not in --codes": 1}
    with pytest.raises(DataError, match=r"table.csv: expected an id column .* found columns \['Image ID', 'Class Label'\]"):
        prepare.from_table(tmp_path / "table.csv", tmp_path / "imgs", id_column="file")


# -- bloodmnist --------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [28, 64])
def test_bloodmnist_writes_pngs_and_keeps_its_split(tmp_path: Path, size: int) -> None:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, per_label in (("train", 2), ("val", 1), ("test", 1)):
        labels = np.repeat(np.arange(8, dtype=np.uint8), per_label)[:, None]
        arrays[f"{split}_images"] = rng.integers(0, 255, (len(labels), size, size, 3), dtype=np.uint8)
        arrays[f"{split}_labels"] = labels
    npz = tmp_path / "bloodmnist.npz"
    np.savez_compressed(npz, **arrays)
    out_dir = tmp_path / "blood"
    rows, left = prepare.from_bloodmnist(npz, out_dir)
    assert dict(left) == {
        "erythroblast (label 2): not one of our five classes": 4,
        "ig (label 3): not one of our five classes": 4,
        "platelet (label 7): not one of our five classes": 4,
    }
    assert Counter((r["split"], r["label"]) for r in rows) == {(s, c): 2 if s == "train" else 1 for s in SPLITS for c in CLASSES}
    first = out_dir / "train" / "basophil" / "train_00000.png"
    assert np.array_equal(np.asarray(Image.open(first)), arrays["train_images"][0])
    assert (out_dir / "val" / "neutrophil" / "val_00006.png").is_file()
    _, splits = _written(rows, tmp_path / "bloodmnist.csv")
    assert {s: len(splits[s]) for s in SPLITS} == {"train": 10, "val": 5, "test": 5}


def test_bloodmnist_without_its_keys_names_the_file_and_the_keys_found(tmp_path: Path) -> None:
    npz = tmp_path / "other.npz"
    np.savez(npz, images=np.zeros((1, 28, 28, 3), np.uint8))
    with pytest.raises(DataError, match=r"other.npz: missing keys \['train_images'.*found keys \['images'\]"):
        prepare.from_bloodmnist(npz, tmp_path / "out")


# -- the command line's guards -----------------------------------------------------------------------
def test_out_is_never_overwritten_without_force_nor_written_into_the_source(tmp_path: Path, capsys) -> None:
    root = tmp_path / "data"
    for cls in CLASSES:
        _image(root / cls / "a.png")
    out = tmp_path / "m.csv"
    out.write_text("keep me\n")
    with pytest.raises(SystemExit) as stop:
        prepare.main(["folder", str(root), "--out", str(out)])
    assert stop.value.code == 2 and out.read_text() == "keep me\n"
    assert capsys.readouterr().err == f"error: {out} already exists; pass --force to overwrite it\n"
    prepare.main(["folder", str(root), "--out", str(out), "--force"])
    assert len(read_manifest(out)[0]) == len(CLASSES)
    with pytest.raises(SystemExit):
        prepare.main(["folder", str(root), "--out", str(root / "m.csv")])
    assert "is inside the source" in capsys.readouterr().err and not (root / "m.csv").exists()


# -- fields (leukonet.data.cells) --------------------------------------------------------------------
def test_fields_lists_the_crops(tmp_path: Path) -> None:
    pytest.importorskip("leukonet.data.cells")
    from leukonet.data.synthetic import generate_dataset

    cells = generate_dataset(tmp_path / "cells", n_per_class=2, size=128, seed=1)
    fields = tmp_path / "fields"  # LISC-like: one leukocyte somewhere in a larger .bmp field
    for i, cell in enumerate(sorted(cells.glob("*/*.png"))):
        field = Image.new("RGB", (384, 288), (242, 230, 231))
        field.paste(Image.open(cell), (40 + 37 * i % 200, 30 + 23 * i % 120))
        (fields / cell.parent.name).mkdir(parents=True, exist_ok=True)
        field.save(fields / cell.parent.name / f"{i}.bmp")
    out, crops = tmp_path / "lisc.csv", tmp_path / "crops"
    prepare.main(["fields", str(fields), "--crops-out", str(crops), "--out", str(out)])
    entries, _ = read_manifest(out)
    assert entries and all((out.parent / e.path).is_file() for e in entries)
    assert all((out.parent / e.path).resolve().is_relative_to(crops.resolve()) for e in entries)
