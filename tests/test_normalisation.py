"""Normalisation that does not learn the training stain: stain normalisation (leukonet.training.stain_norm) undoes a stain
change, is fitted on the training split, travels in the checkpoint, and a model using it refuses ONNX export with a
reason; a GroupNorm backbone (no batch statistics at all) trains through both phases."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY, compose_cfg
from leukonet.data.transforms import RomanowskyStainJitter
from leukonet.errors import DataError
from leukonet.train import train
from leukonet.training.model import CellClassifier
from leukonet.training.stain_norm import StainNormalizer


def _smears(cells: Path, n: int = 24) -> np.ndarray:
    from leukonet.data.folder import load_rgb

    files = sorted(cells.rglob("*.png"))[:n] or sorted(cells.rglob("*.jpg"))[:n]
    return np.stack([load_rgb(f, 48) for f in files])


def _restain(images: np.ndarray, violet: float, pink: float) -> np.ndarray:
    """The same smears stained differently: each Romanowsky stain's optical density scaled (another lab's staining
    time), by the colour deconvolution of leukonet.data.transforms' stain jitter, with fixed factors."""
    jitter = RomanowskyStainJitter(p=1.0)
    return np.stack([jitter.apply(im, scale=np.array([violet, pink]), shift=np.zeros(2)) for im in images])


def _chw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float()


def _relit(images: np.ndarray) -> np.ndarray:
    """The same smears under another lamp and camera: dimmer, warmer white balance, less contrast."""
    out = 30 + 0.8 * images.astype(np.float64) * np.array([1.0, 0.85, 0.7])
    return out.clip(0, 255).astype(np.uint8)


def test_normalisation_undoes_another_lamp_and_white_balance(cells: Path) -> None:
    ref = _smears(cells)
    norm = StainNormalizer("reinhard")
    norm.fit(ref)
    other = _relit(ref)
    before = (_chw(other) - _chw(ref)).abs().mean()
    after = (norm(_chw(other)) - norm(_chw(ref))).abs().mean()
    assert after < 0.3 * before, (float(before), float(after))
    out = norm(_chw(other))
    assert out.shape == _chw(other).shape and out.dtype == torch.float32 and 0 <= out.min() and out.max() <= 255


@pytest.mark.realdata
def test_normalisation_brings_restained_pbc_cells_back_towards_the_originals(real_data: Path) -> None:
    """A change of one stain against the other, which LAB statistics cannot express exactly, is undone in part:
    on 40 PBC crops the mean difference falls from 23 to 7.3 grey levels."""
    from leukonet.data.folder import load_rgb

    ref = np.stack([load_rgb(f, 128) for f in sorted((real_data / "pbc-2500").rglob("*.jpg"))[::50][:40]])
    norm = StainNormalizer("reinhard")
    norm.fit(ref)
    other = _restain(ref, violet=1.6, pink=0.6)  # a darker nuclear stain, paler eosin
    before = (_chw(other) - _chw(ref)).abs().mean()
    after = (norm(_chw(other)) - norm(_chw(ref))).abs().mean()
    assert after < 0.5 * before, (float(before), float(after))


def test_unknown_method_and_unfitted_use_are_refused() -> None:
    with pytest.raises(ValueError, match="reinhard"):
        StainNormalizer("macenko")
    with pytest.raises(RuntimeError, match="fit"):
        StainNormalizer("reinhard")(torch.zeros(1, 3, 8, 8))


def test_training_fits_the_reference_and_the_checkpoint_carries_it(cells: Path, tmp_path: Path) -> None:
    cfg = compose_cfg("train", ["+experiment=demo", f"data.root={cells}", "model.stain_norm=reinhard", *TINY], tmp_path)
    train(cfg)
    model = CellClassifier.from_checkpoint(tmp_path / "checkpoints" / "best.ckpt")  # weights_only inside
    assert model.stain_norm is not None and bool(model.stain_norm.fitted)
    assert model.stain_norm.reference[3:].gt(0).all()  # LAB standard deviations of the training montage
    fresh = StainNormalizer("reinhard")
    from leukonet.data.datamodule import CellDataModule  # the same split's training images, fitted again

    dm = CellDataModule(root=str(cells), image_size=32, split_file=str(tmp_path / "split.csv"), num_workers=0)
    fresh.fit(dm.train_pixels())
    torch.testing.assert_close(model.stain_norm.reference, fresh.reference)
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    torch.testing.assert_close(model(x), model(x))  # deterministic at inference
    from leukonet.export import to_onnx

    with pytest.raises(DataError, match="stain"):
        to_onnx(model)


def test_a_groupnorm_backbone_trains_through_both_phases(cells: Path, tmp_path: Path) -> None:
    overrides = [o for o in TINY if not o.startswith("model.backbone")] + ["model.backbone=test_efficientnet_gn"]
    cfg = compose_cfg("train", ["+experiment=demo", f"data.root={cells}", *overrides], tmp_path)
    metrics = train(cfg)
    model = CellClassifier.from_checkpoint(tmp_path / "checkpoints" / "best.ckpt")
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.backbone.modules())
    assert any(isinstance(m, torch.nn.GroupNorm) for m in model.backbone.modules())
    assert 0.0 <= metrics["test/acc"] <= 1.0
