"""The synthetic smear generator: determinism, layout, idempotence, and that classes differ."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from leukonet.classes import CLASSES
from leukonet.data import synthetic
from leukonet.data.synthetic import generate_dataset, render_cell


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_arguments_give_identical_files(tmp_path: Path) -> None:
    a = _files(generate_dataset(tmp_path / "a", n_per_class=3, size=48, seed=7))
    b = _files(generate_dataset(tmp_path / "b", n_per_class=3, size=48, seed=7))
    assert a == b
    assert len(a) == 5 * 3 + 1  # images plus the marker


def test_image_does_not_depend_on_count_but_on_seed(tmp_path: Path) -> None:
    few = _files(generate_dataset(tmp_path / "few", n_per_class=2, size=48, seed=7))
    more = _files(generate_dataset(tmp_path / "more", n_per_class=3, size=48, seed=7))
    other = _files(generate_dataset(tmp_path / "other", n_per_class=2, size=48, seed=8))
    for name, data in few.items():
        if name.endswith(".png"):
            assert more[name] == data
            assert other[name] != data


def test_layout_counts_shapes_and_dtype(tmp_path: Path) -> None:
    root = generate_dataset(tmp_path / "ds", n_per_class=4, size=64, seed=0)
    assert root == tmp_path / "ds"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == sorted(CLASSES)
    for label in CLASSES:
        names = sorted(p.name for p in (root / label).iterdir())
        assert names == [f"{label}_{i:04d}.png" for i in range(4)]
        image = cv2.imread(str(root / label / names[0]), cv2.IMREAD_UNCHANGED)
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]  # no staging directory left behind


@pytest.mark.parametrize("size", [32, 100, 128])
def test_render_cell_shape_and_dtype(size: int) -> None:
    for label in CLASSES:
        image = render_cell(label, np.random.default_rng(1), size)
        assert image.shape == (size, size, 3) and image.dtype == np.uint8


def test_unknown_label_is_refused() -> None:
    with pytest.raises(ValueError, match="platelet"):
        render_cell("platelet", np.random.default_rng(0))


def test_complete_root_is_returned_without_rendering(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = generate_dataset(tmp_path / "ds", n_per_class=2, size=32, seed=1)
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}

    def fail(*args: object) -> None:
        raise AssertionError("rendered again")

    monkeypatch.setattr(synthetic, "render_cell", fail)
    assert generate_dataset(str(root), n_per_class=2, size=32, seed=1) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before


@pytest.mark.parametrize("changed", [{"n_per_class": 3}, {"size": 48}, {"seed": 2}])
def test_mismatched_parameters_are_refused(tmp_path: Path, changed: dict[str, int]) -> None:
    root = generate_dataset(tmp_path / "ds", n_per_class=2, size=32, seed=1)
    before = _files(root)
    with pytest.raises(ValueError, match="delete it or choose another root") as error:
        generate_dataset(root, **{"n_per_class": 2, "size": 32, "seed": 1, **changed})
    assert str(root) in str(error.value)
    assert _files(root) == before


def test_root_without_marker_is_refused_and_left_alone(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    (root / "neutrophil").mkdir(parents=True)
    (root / "neutrophil" / "mine.png").write_bytes(b"user data")
    with pytest.raises(ValueError, match="delete it or choose another root"):
        generate_dataset(root, n_per_class=2, size=32)
    assert _files(root) == {"neutrophil/mine.png": b"user data"}
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]


def test_interrupted_run_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def crash_on_third(*args: object) -> np.ndarray:
        calls.append(args)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return render_cell(*args)

    monkeypatch.setattr(synthetic, "render_cell", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        generate_dataset(tmp_path / "ds", n_per_class=2, size=32)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    assert (generate_dataset(tmp_path / "ds", n_per_class=2, size=32) / ".complete").is_file()


def test_empty_root_is_filled(tmp_path: Path) -> None:
    (tmp_path / "ds").mkdir()
    root = generate_dataset(tmp_path / "ds", n_per_class=1, size=32)
    assert (root / ".complete").is_file() and len(list(root.rglob("*.png"))) == 5


def _features(image: np.ndarray) -> np.ndarray:
    """Colour histograms of the central region and its fraction of dark (nuclear) pixels."""
    centre = image[16:48, 16:48].reshape(-1, 3).astype(np.float64)
    hists = [np.histogram(centre[:, c], bins=8, range=(0, 256))[0] / len(centre) for c in range(3)]
    dark = np.mean(centre.sum(axis=1) < 300)
    return np.concatenate([*hists, [dark]])


def test_classes_are_separable_by_simple_statistics() -> None:
    """A nearest-centroid classifier on colour statistics, fit on half, must beat 60 % on the rest."""
    rngs = [[np.random.default_rng([3, k, i]) for i in range(40)] for k in range(len(CLASSES))]
    x = np.array([[_features(render_cell(c, rng, 64)) for rng in row] for c, row in zip(CLASSES, rngs)])
    train, test = x[:, ::2], x[:, 1::2]
    mean, std = train.reshape(-1, x.shape[-1]).mean(0), train.reshape(-1, x.shape[-1]).std(0) + 1e-9
    centroids = ((train - mean) / std).mean(axis=1)
    distances = np.linalg.norm(((test - mean) / std)[:, :, None, :] - centroids[None, None], axis=-1)
    accuracy = np.mean(distances.argmin(-1) == np.arange(len(CLASSES))[:, None])
    assert accuracy > 0.6, accuracy
