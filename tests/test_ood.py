"""Not a leukocyte (leukonet.inference.ood): red-cell-only fields, blank slides, platelet clumps and photos of other things
are flagged; synthetic leukocytes are mostly accepted; flagged inputs are left out of the differential count."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from conftest import compose_cfg, run_module
from leukonet.classes import CLASSES
from leukonet.data import synthetic as syn
from leukonet.data.cells import _red_cell_tile
from leukonet.errors import DataError
from leukonet.evaluate import evaluate
from leukonet.inference import ood
from leukonet.inference.cell_kind import CellKind
from leukonet.predict import Cell, Predictor, assess


def _slide(rng: np.random.Generator, n: int, layers: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """An n x n RGB image drawn as synthetic.render_cell draws one: slide background plus stain layers in OD."""
    mix = syn._stain(rng)
    od = (0.85 + 0.3 * syn._noise(rng, n, 4))[..., None] * (syn._BACKGROUND @ mix.T)
    for density, stain in layers:
        od = od + density[..., None] * (stain @ mix.T)
    rgb = np.exp(-od) * 255 * rng.uniform(0.96, 1.03)
    rgb = cv2.GaussianBlur(rgb, (0, 0), rng.uniform(0.3, 0.8) * n / 128) + rng.normal(0, rng.uniform(1, 3), od.shape)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def red_cells_only(rng: np.random.Generator, n: int = 128) -> np.ndarray:
    return _slide(rng, n, [(_red_cell_tile(rng, n), syn._RED_CELL)])


def blank_slide(rng: np.random.Generator, n: int = 128) -> np.ndarray:
    return _slide(rng, n, [])


def platelet_clump(rng: np.random.Generator, n: int = 128) -> np.ndarray:
    """8-15 dark-violet specks (radius 1.5-3 % of the side) clustered near the middle, among red cells."""
    specks = np.zeros((n, n))
    cx, cy = rng.uniform(0.35, 0.65, 2) * n
    for _ in range(int(rng.integers(8, 16))):
        mask = np.zeros((n, n), np.uint8)
        x, y = cx + rng.normal(0, 0.08 * n), cy + rng.normal(0, 0.08 * n)
        cv2.circle(mask, (int(x), int(y)), max(1, round(rng.uniform(0.015, 0.03) * n)), 255, cv2.FILLED)
        specks += syn._soft(mask, 0.5) * rng.uniform(0.5, 0.9)
    return _slide(rng, n, [(specks, syn._NUCLEUS), (_red_cell_tile(rng, n) * (specks < 0.05), syn._RED_CELL)])


def photos(size: int) -> list[np.ndarray]:
    return [cv2.resize(getattr(skdata, name)(), (size, size), interpolation=cv2.INTER_AREA)
            for name in ("chelsea", "astronaut", "coffee")]


def test_the_cell_finder_sees_no_nucleus_in_slides_without_leukocytes() -> None:
    rng = np.random.default_rng(0)
    leukocytes = [syn.render_cell(c, rng, 48) for c in CLASSES for _ in range(6)]
    assert all(ood.has_leukocyte(im) for im in leukocytes)
    assert not any(ood.has_leukocyte(red_cells_only(rng)) or ood.has_leukocyte(blank_slide(rng)) for _ in range(10))
    clumps = np.mean([ood.has_leukocyte(platelet_clump(rng)) for _ in range(20)])
    print(f"\ncell finder: a nucleus in {clumps:.0%} of 20 platelet clumps at 128 px")
    assert clumps <= 0.3  # a dense clump can merge into one nucleus-sized blob: the feature check is the backstop
    # chelsea and coffee: no nucleus; the astronaut's dark-blue suit and flag pass for one (the finder's threshold
    # follows each image's darkest violet, so any photo with a dark-blue patch can): the model check is the backstop
    assert [ood.has_leukocyte(p) for i, p in enumerate(photos(48) + photos(128)) if i % 3 != 1] == [False] * 4


@pytest.fixture(scope="module")
def predictor(trained_run: Path) -> Predictor:
    return Predictor(trained_run / "checkpoints" / "last.ckpt")


def _flagged(predictor: Predictor, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    _, checks = assess(predictor, [Cell("x", None, None, None, im) for im in images])
    flags = np.array([c["not_a_leukocyte"] for c in checks])
    no_nucleus = np.array([c["ood_reason"] == "no nucleus" for c in checks])
    return flags, no_nucleus, np.array([c["ood_score"] for c in checks], dtype=float)


def test_stats_are_stored_as_tensors_and_flag_what_is_not_a_leukocyte(trained_run: Path, predictor: Predictor) -> None:
    ckpt = torch.load(trained_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    stats = ckpt["ood"]
    assert stats["means"].shape[0] == len(CLASSES) and stats["precision"].shape[0] == stats["means"].shape[1]
    assert float(stats["accept"]) >= ood.ACCEPT and float(stats["threshold"]) > 0  # 95 % of validation kept
    best = torch.load(trained_run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    assert torch.equal(best["ood"]["threshold"], stats["threshold"])

    checked = Predictor(trained_run / "checkpoints" / "last.ckpt")
    checked.cell_kind = CellKind()  # what load_predictor adds for a checkpoint trained on real cells
    rng = np.random.default_rng(1)
    cases = {  # (images, predictor): synthetic drawings are not real cells to the cell-kind check, so without it
        "synthetic leukocytes (48 px)": ([syn.render_cell(c, rng, 48) for c in CLASSES for _ in range(10)], predictor),
        "red cells only (128 px)": ([red_cells_only(rng) for _ in range(10)], predictor),
        "blank slides (128 px)": ([blank_slide(rng) for _ in range(10)], predictor),
        "platelet clumps (128 px)": ([platelet_clump(rng) for _ in range(20)], predictor),
        "platelet clumps, kind check (128 px)": ([platelet_clump(rng) for _ in range(20)], checked),
        "photos, kind check (48 px)": (photos(48), checked),
        "photos, kind check (360 px)": (photos(360), checked),
    }
    rates = {}
    print()
    for name, (images, p) in cases.items():
        flags, no_nucleus, scores = _flagged(p, images)
        rates[name] = flags.mean()
        print(f"{name}: {flags.mean():.0%} flagged of {len(flags)} (no nucleus {no_nucleus.mean():.0%}, "
              f"unfamiliar (ood_score > 1) {np.mean(scores > 1):.0%}, median ood_score {np.median(scores):.2f})")
    assert rates["synthetic leukocytes (48 px)"] == 0  # unfamiliar features no longer flag: a nucleus is found in all
    assert rates["red cells only (128 px)"] == rates["blank slides (128 px)"] == 1
    assert rates["platelet clumps (128 px)"] >= 0.8 and rates["platelet clumps, kind check (128 px)"] == 1
    assert rates["photos, kind check (48 px)"] == rates["photos, kind check (360 px)"] == 1


def test_old_checkpoints_keep_the_classical_check(trained_run: Path, tmp_path: Path) -> None:
    ckpt = torch.load(trained_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    del ckpt["ood"]
    torch.save(ckpt, tmp_path / "old.ckpt")
    with pytest.warns(UserWarning, match="ood_score and .unfamiliar. are left empty"):
        old = Predictor(tmp_path / "old.ckpt")
    rng = np.random.default_rng(2)
    flags, _, scores = _flagged(old, [blank_slide(rng), red_cells_only(rng), syn.render_cell("neutrophil", rng, 48)])
    assert flags.tolist() == [True, True, False] and np.isnan(scores).all()


def test_predict_leaves_flagged_inputs_out_of_the_count(trained_run: Path, cells: Path, tmp_path: Path) -> None:
    data = tmp_path / "today"
    shutil.copytree(cells / "neutrophil", data / "cells")
    rng = np.random.default_rng(3)
    (data / "other").mkdir()
    Image.fromarray(blank_slide(rng)).save(data / "other" / "blank.png")
    Image.fromarray(red_cells_only(rng)).save(data / "other" / "red_cells.png")
    Image.fromarray(photos(224)[0]).save(data / "other" / "cat.png")
    out = tmp_path / "run"
    proc = run_module("leukonet.predict", f"ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}", f"input={data}",
                      f"hydra.run.dir={out}", "progress=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    other = [r for r in rows if Path(r["file"]).parent.name == "other"]
    assert len(other) == 3 and all(r["not_a_leukocyte"] == "True" and r["predicted"] == "" for r in other)
    assert all(r["ood_reason"] == "no nucleus" and r["needs_review"] == "False" and float(r["ood_score"]) > 0
               for r in other)
    flagged = sum(r["not_a_leukocyte"] == "True" for r in rows)
    summary = json.loads((out / "differential.json").read_text())
    assert summary["cells"] == 23 and summary["not_a_leukocyte"] == flagged >= 3
    assert sum(d["cells"] for d in summary["differential"]) == 23 - flagged  # flagged inputs are not counted
    assert flagged == 3  # unfamiliar features do not flag; a run trained on drawings gets no cell-kind check
    assert summary["ood_check"].startswith("cell finder;") and summary["lab_profile"].startswith("none (kind_check")
    printed = " ".join(proc.stdout.split())  # rich wraps the title
    assert f"Differential count: {23 - flagged} cells" in printed and f"{flagged} inputs not leukocytes" in printed


def test_evaluate_checks_the_kinds_of_cells_as_predict_does(trained_run: Path, cells: Path, tmp_path: Path) -> None:
    """kind_check=auto (the default): a checkpoint trained on synthetic drawings gets no cell-kind check, as in
    predict; true runs it on every image; anything else is refused before any work."""
    few = tmp_path / "few"
    for c in CLASSES:
        (few / c).mkdir(parents=True)
        for p in sorted((cells / c).iterdir())[:2]:
            shutil.copy(p, few / c / p.name)
    ckpt = trained_run / "checkpoints" / "last.ckpt"

    def run(name: str, *extra: str) -> dict:
        return evaluate(compose_cfg("evaluate", [f"ckpt_path={ckpt}", f"data.root={few}", "data.num_workers=0",
                                                 "precision=32-true", *extra], tmp_path / name))

    assert "not_a_leukocyte" not in run("auto")
    checked = run("true", "kind_check=true")["not_a_leukocyte"]
    assert checked["checked"] == 10 and checked["flagged"] == sum(checked["by_reason"].values())
    with pytest.raises(DataError, match="kind_check must be auto, true or false"):
        run("bad", "kind_check=sometimes")
    assert not (tmp_path / "bad").exists()
