"""The stain, optics and scale augmentation (conf/data/augment/stain_robust.yaml)."""

from __future__ import annotations

import warnings
from pathlib import Path

import albumentations as A
import numpy as np
import pytest
from hydra.utils import instantiate
from PIL import Image

from conftest import REPO, TINY, compose_cfg, load_script
from leukonet.data.datamodule import CellDataset
from leukonet.data.synthetic import render_cell
from leukonet.data.transforms import RomanowskyStainJitter, train_transform
from leukonet.train import train
from leukonet.training.seeding import epoch_seed

NEW = ["scale", "stain", "he_stain", "gray", "defocus", "blur", "noise", "jpeg"]


def _augment(tmp_path: Path, *overrides: str) -> dict[str, A.BasicTransform]:
    cfg = compose_cfg("train", ["data/augment=stain_robust", "data.image_size=48", *overrides], tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecated or unknown arguments for albumentations 2.x
        return instantiate(cfg.data.augment, _convert_="all")


@pytest.fixture(scope="module")
def cell() -> np.ndarray:
    return render_cell("eosinophil", np.random.default_rng(0), size=48)


def test_stain_robust_extends_the_report_and_each_entry_switches_off(tmp_path: Path) -> None:
    augment = _augment(tmp_path)
    report = _augment(tmp_path, "data/augment=report")
    assert list(augment) == [*report, *NEW]  # the report's transforms first, unchanged
    assert all(isinstance(t, A.BasicTransform) for t in augment.values())
    assert augment["he_stain"].p == 0.0  # off unless asked for
    assert "stain" not in _augment(tmp_path, "~data.augment.stain")
    assert "stain" not in report  # the default recipe is untouched


@pytest.mark.parametrize("name", NEW)
def test_each_new_transform_keeps_shape_and_dtype_and_repeats_with_its_seed(name: str, cell: np.ndarray, tmp_path: Path) -> None:
    t = _augment(tmp_path, f"data.augment.{name}.p=1.0")[name]
    dataset = CellDataset(np.stack([cell, cell]), np.array([0, 0]), A.Compose([t]), seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # CellDataset seeds each image from (seed, epoch, index): the same draw every time
        a = [_raw(dataset, 0), _raw(dataset, 1)]
        b = [_raw(dataset, 0), _raw(dataset, 1)]
    assert all(x.dtype == np.uint8 and x.shape == cell.shape for x in a)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    if name != "gray":  # greyscale has nothing to draw
        dataset.epoch = 1
        assert not np.array_equal(a[0], _raw(dataset, 0))


def _raw(dataset: CellDataset, i: int) -> np.ndarray:
    """CellDataset's draw for image ``i`` (its seeding), before the tensor conversion."""
    dataset.transform.set_random_seed(epoch_seed(dataset.seed, dataset.epoch, i))
    return dataset.transform(image=dataset.pixels[i])["image"]


def test_the_full_pipeline_gives_the_training_tensor(cell: np.ndarray, tmp_path: Path) -> None:
    augment = _augment(tmp_path, *(f"data.augment.{n}.p=1.0" for n in NEW))
    dataset = CellDataset(np.stack([cell] * 2), np.array([0, 1]), train_transform(augment, 32), seed=0)
    x, y = dataset[1]
    assert tuple(x.shape) == (3, 32, 32) and str(x.dtype) == "torch.uint8" and y == 1
    assert np.array_equal(dataset[1][0].numpy(), x.numpy())


def test_stain_jitter_without_jitter_is_the_identity(cell: np.ndarray) -> None:
    rng = np.random.default_rng(1)
    noise = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    t = RomanowskyStainJitter(scale_range=(1.0, 1.0), shift_range=(0.0, 0.0), p=1.0)
    for img in (cell, noise, np.full((4, 4, 3), 255, np.uint8), np.zeros((4, 4, 3), np.uint8)):
        assert np.abs(t(image=img)["image"].astype(int) - img).max() <= 1


def test_stain_jitter_moves_violet_and_pink_separately(cell: np.ndarray) -> None:
    def od(img: np.ndarray) -> np.ndarray:
        return -np.log((img.astype(float) + 1) / 256)

    more_violet = RomanowskyStainJitter(p=1.0)  # violet x1.3, pink unchanged:
    more_violet.get_params = lambda: {"scale": np.array([1.3, 1.0]), "shift": np.zeros(2)}
    out = more_violet(image=cell)["image"]
    nuclear = od(cell)[..., 1] - od(cell)[..., 2] > 0.5
    assert nuclear.any()
    gain = od(out)[nuclear].sum() / od(cell)[nuclear].sum()
    assert 1.15 < gain < 1.35  # the nuclei darken by ~the violet factor
    pink = (np.abs(od(cell)[..., 1] - od(cell)[..., 2]) < 0.05) & (od(cell).sum(-1) > 0.3)
    if pink.any():  # eosin-only pixels barely move
        assert np.abs(od(out)[pink].sum() / od(cell)[pink].sum() - 1) < 0.1


def test_the_experiment_is_the_ablations_recommendation(tmp_path: Path) -> None:
    cfg = compose_cfg("train", ["+experiment=stain_robust"], tmp_path)
    assert cfg.task_name == "stain_robust" and cfg.model.backbone == "tf_efficientnet_lite0"
    assert list(cfg.data.augment) == [*compose_cfg("train", [], tmp_path).data.augment, "zoom"]
    assert list(cfg.data.augment.zoom.scale) == [1.0, 3.0]
    # the recipe the full-budget ablation measured (experiments/stain_robustness/ablation.py, variant zoom)
    ablation = load_script(REPO / "experiments" / "stain_robustness" / "ablation.py")
    measured = compose_cfg("train", ablation.VARIANTS["zoom"][1], tmp_path)
    assert cfg.data.augment == measured.data.augment and cfg.model == measured.model
    lite0 = compose_cfg("train", ["+experiment=two_phase_lite0"], tmp_path)
    assert cfg.callbacks == lite0.callbacks


@pytest.mark.parametrize("overrides", [["data/augment=stain_robust", *(f"data.augment.{n}.p=1.0" for n in NEW)],
                                       ["+experiment=stain_robust", "data.augment.zoom.p=1.0"]])
def test_one_epoch_of_training_with_every_new_transform(cells: Path, tmp_path: Path, overrides: list[str]) -> None:
    overrides = [
        *overrides, f"data.root={cells}", "test=false",
        *(o for o in TINY if "max_epochs" not in o),
        "callbacks.two_phase.phase1.max_epochs=1", "callbacks.two_phase.phase2.max_epochs=1",
    ]
    metrics = train(compose_cfg("train", overrides, tmp_path))
    assert np.isfinite(metrics["val/loss"])


def test_preview_writes_a_grid_per_transform_and_the_page(tmp_path: Path) -> None:
    preview = load_script(REPO / "experiments" / "stain_robustness" / "preview.py")
    preview.main(["--synthetic", "--out", str(tmp_path), "--train-size", "48", "--size", "32", "--draws", "2"])
    page = (tmp_path / "augmentations.md").read_text()
    for name in [*NEW, "zoom", "report", "stain_robust", "experiment"]:  # zoom: added by +experiment=stain_robust
        assert f"(augmentations/{name}.png)" in page
        with Image.open(tmp_path / "augmentations" / f"{name}.png") as img:
            assert img.size == (3 * 36, 5 * 36)  # 5 cells x (original + 2 draws), 2 px borders


def test_the_committed_previews_are_listed_and_small() -> None:
    docs = Path(__file__).resolve().parents[1] / "docs"
    page = (docs / "augmentations.md").read_text()
    for name in [*NEW, "zoom", "experiment"]:
        png = docs / "augmentations" / f"{name}.png"
        assert f"(augmentations/{name}.png)" in page and png.stat().st_size < 300_000
