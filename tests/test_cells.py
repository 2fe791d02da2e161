"""Finding and cropping leukocytes in whole fields: synthetic fields with known cells, then real crops."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from leukonet.classes import CLASSES
from leukonet.data.cells import (
    FIELD_CROP,
    TRAINING_FRACTION,
    Cell,
    _optical_density,
    crop_cell,
    find_cells,
    main_cell,
    prepare_fields,
    red_cell_width,
    single_cell,
    size_unit,
    synthetic_field,
)
from leukonet.data.folder import load_rgb


def _match(truth: list[Cell], found: list[Cell]) -> list[tuple[Cell, Cell]]:
    """Pair each true cell with the nearest unpaired found cell within half its radius."""
    pairs, free = [], list(found)
    for t in truth:
        near = [f for f in free if math.hypot(f.x - t.x, f.y - t.y) < t.radius / 2]
        if near:
            best = min(near, key=lambda f: math.hypot(f.x - t.x, f.y - t.y))
            free.remove(best)
            pairs.append((t, best))
    return pairs


def _write_png(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes())


def test_finds_synthetic_leukocytes() -> None:
    """20 fields, every class, 1-3 cells each: recall, false positives and centring error."""
    n_true = n_found = 0
    errors, relative = [], []
    for i in range(20):
        labels = [CLASSES[(i + j) % len(CLASSES)] for j in range(1 + i % 3)]
        field, truth = synthetic_field(np.random.default_rng([1, i]), (360, 480), len(labels), labels)
        found = find_cells(field)
        pairs = _match(truth, found)
        n_true, n_found = n_true + len(truth), n_found + len(found)
        errors += [math.hypot(f.x - t.x, f.y - t.y) for t, f in pairs]
        relative += [math.hypot(f.x - t.x, f.y - t.y) / t.radius for t, f in pairs]
    recall = len(errors) / n_true
    false_positives = (n_found - len(errors)) / max(n_found, 1)
    print(
        f"\nsynthetic fields: {n_true} cells, recall {recall:.3f}, false positives {false_positives:.3f} "
        f"of {n_found} found, centring error {np.mean(errors):.2f} px = {np.mean(relative):.3f} radius "
        f"(worst {np.max(relative):.3f})"
    )
    assert recall >= 0.9
    assert false_positives <= 0.1
    assert np.mean(relative) < 0.25


@pytest.mark.parametrize("size", [(360, 480), (480, 640), (300, 300)])
def test_red_cell_ruler(size: tuple[int, int]) -> None:
    """The red cells' width is about their drawn diameter, and halves with the image."""
    field, _ = synthetic_field(np.random.default_rng(list(size)), size, n_cells=1)
    drawn = 2 * 0.1125 * FIELD_CROP * min(size)  # synthetic red cells: radius 0.10-0.125 of a crop's side
    width = red_cell_width(_optical_density(field))
    assert width is not None and 0.8 * drawn < width < 1.05 * drawn
    half = cv2.resize(field, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA)
    assert red_cell_width(_optical_density(half)) == pytest.approx(width / 2, rel=0.1)


@pytest.mark.parametrize("seed", range(3))
def test_ruler_falls_back_to_the_shorter_side(seed: int) -> None:
    """With no whole red cell to measure (a tight crop), sizes are relative to the shorter side."""
    field, (cell,) = synthetic_field(np.random.default_rng([8, seed]), (360, 480), n_cells=1)
    crop = crop_cell(field, cell, fraction=0.7, out_size=200)  # the leukocyte and the red cells it cuts
    assert red_cell_width(_optical_density(crop)) is None
    assert size_unit(_optical_density(crop)) == 200
    assert size_unit(_optical_density(np.full((100, 120, 3), 255, np.uint8))) == 100


def test_finds_leukocytes_at_half_the_magnification() -> None:
    """Four fields in a 2x2 mosaic shrunk to one field's size: cells half as large, all still found."""
    size = (360, 480)
    fields = [synthetic_field(np.random.default_rng([7, i]), size, n_cells=3) for i in range(4)]
    mosaic = np.vstack([np.hstack([fields[0][0], fields[1][0]]), np.hstack([fields[2][0], fields[3][0]])])
    mosaic = cv2.resize(mosaic, (size[1], size[0]), interpolation=cv2.INTER_AREA)
    truth = [Cell((c.x + size[1] * (i % 2) + 0.5) / 2 - 0.5, (c.y + size[0] * (i // 2) + 0.5) / 2 - 0.5, c.radius / 2)
             for i, (_, cells) in enumerate(fields) for c in cells]
    found = find_cells(mosaic)
    pairs = _match(truth, found)
    assert len(pairs) >= 0.9 * len(truth)
    assert len(found) - len(pairs) <= 1
    assert np.mean([abs(f.radius / t.radius - 1) for t, f in pairs]) < 0.15


def test_crop_centres_the_cell_at_the_training_fraction() -> None:
    field, _ = synthetic_field(np.random.default_rng(3), n_cells=1, labels=["neutrophil"])
    (cell,) = find_cells(field)
    crop = crop_cell(field, cell, TRAINING_FRACTION, out_size=200)
    assert crop.shape == (200, 200, 3) and crop.dtype == np.uint8
    (again,) = find_cells(crop)  # the same definition of the cell's extent, so it fills the fraction
    assert math.hypot(again.x - 99.5, again.y - 99.5) < 0.05 * 200
    assert 2 * again.radius / 200 == pytest.approx(TRAINING_FRACTION, rel=0.15)


def test_crop_reflects_at_the_border() -> None:
    field = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    crop = crop_cell(field, Cell(2.0, 57.0, 30.0), fraction=0.5, out_size=120)  # 120 px square around a corner
    assert crop.shape == (120, 120, 3)
    assert np.array_equal(crop[3:63, 58:120], field[0:60, 0:62])  # the field itself, unscaled, beside its reflection
    assert np.array_equal(crop[:, 57], crop[:, 59])  # mirrored about column x = 0


@pytest.mark.parametrize("seed", range(3))
def test_no_leukocyte_no_cells(seed: int) -> None:
    red_cells_only, cells = synthetic_field(np.random.default_rng(seed), n_cells=0)
    assert cells == [] and find_cells(red_cells_only) == []
    blank = np.random.default_rng(seed).normal((242, 230, 231), 2.0, (480, 640, 3))
    assert find_cells(np.clip(blank, 0, 255).astype(np.uint8)) == []
    assert find_cells(np.full((100, 120, 3), 255, np.uint8)) == []
    assert main_cell(blank, []) is None


def test_prepare_fields(tmp_path: Path) -> None:
    source, out = tmp_path / "fields", tmp_path / "crops"
    folders = {"Neutrophils": "neutrophil", "lymph": "lymphocyte"}  # aliases, as scan_folder reads them
    for i, folder in enumerate(["Neutrophils", "Neutrophils", "lymph"]):
        field, _ = synthetic_field(np.random.default_rng([2, i]), n_cells=1, labels=[folders[folder]])
        _write_png(source / folder / f"field_{i}.png", field)
    _write_png(source / "lymph" / "empty.png", synthetic_field(np.random.default_rng(9), n_cells=0)[0])
    (source / "lymph" / "broken.jpg").write_bytes(b"not an image")

    rows, left_out = prepare_fields(source, out)
    assert left_out == {"no leukocyte found": 1, "unreadable image": 1}
    assert sorted((Path(r["path"]).relative_to(out).as_posix(), r["label"]) for r in rows) == [
        ("lymphocyte/field_2.png", "lymphocyte"),
        ("neutrophil/field_0.png", "neutrophil"),
        ("neutrophil/field_1.png", "neutrophil"),
    ]
    for row in rows:
        assert Path(row["path"]).is_absolute() and Path(row["source"]).is_file()
        assert load_rgb(row["path"]).shape == (360, 360, 3)


def _central_single_cell_rate(paths: list[Path]) -> float:
    """Share of single-cell crops in which find_cells finds exactly one cell, within 10 % of the side of the centre."""
    hits = 0
    for path in paths:
        image = load_rgb(path)
        cells = find_cells(image)
        h, w = image.shape[:2]
        hits += len(cells) == 1 and math.hypot(cells[0].x - (w - 1) / 2, cells[0].y - (h - 1) / 2) < 0.1 * min(h, w)
    return hits / len(paths)


def _sample(root: Path, n: int) -> list[Path]:
    files = sorted(p for p in root.glob("*/*") if p.suffix.lower() == ".jpg" and not p.name.startswith("."))
    return [files[i] for i in np.random.default_rng(0).choice(len(files), n, replace=False)]


@pytest.mark.realdata
def test_real_crops(real_data: Path) -> None:
    pbc = _central_single_cell_rate(_sample(real_data / "pbc-2500", 50))
    bccd = _central_single_cell_rate(_sample(real_data / "bccd-crops", 50))
    print(f"\nexactly one cell near the centre: PBC {pbc:.2f}, BCCD {bccd:.2f} (50 crops each)")
    assert pbc >= 0.9
    assert bccd >= 0.3  # another lab, tight crops: cells fill the frame and often run off it


def test_a_cell_cut_by_the_fields_edge_is_found_and_marked() -> None:
    field, (truth,) = synthetic_field(np.random.default_rng(3), n_cells=1, labels=["neutrophil"])
    whole = find_cells(field)
    assert len(whole) == 1 and not whole[0].cut
    cut = field[:, : int(truth.x + 0.4 * truth.radius)]  # the edge runs through the nucleus
    (found,) = [c for c in find_cells(cut) if abs(c.y - truth.y) < truth.radius]
    assert found.cut and found.x < cut.shape[1]


def test_single_cell_tells_a_crop_from_a_field() -> None:
    image = np.zeros((100, 100, 3), np.uint8)
    main = Cell(50, 52, 20)
    assert single_cell(image, [main]) is main
    assert single_cell(image, [main, Cell(97, 50, 18, cut=True)]) is main  # a neighbour cut by the crop's edge
    assert single_cell(image, [main, Cell(50, 88, 15)]) is main  # next to it: a neighbour, or a split lobe
    assert single_cell(image, [Cell(50, 50, 15), Cell(90, 90, 12)]) is None  # another whole cell apart: a field
    assert single_cell(image, [Cell(50, 50, 6)]) is None  # far smaller than a crop's cell: a field
    assert single_cell(image, [Cell(90, 50, 20)]) is None  # off the centre: a field
    assert single_cell(image, []) is None
