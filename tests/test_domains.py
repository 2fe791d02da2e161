"""Test-time augmentation and evaluation on several named datasets (domains) at once."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import compose_cfg, run_module
from leukonet.errors import DataError
from leukonet.evaluate import evaluate
from leukonet.inference.tta import check_mode, tta_probabilities, views
from leukonet.predict import Predictor
from leukonet.training.model import CellClassifier


@pytest.fixture(scope="module")
def model(trained_run: Path) -> CellClassifier:
    m = CellClassifier.from_checkpoint(trained_run / "checkpoints" / "last.ckpt")
    m.temperature.fill_(1.7)  # a temperature other than 1, so the test sees it respected
    return m


def _images(n: int = 6, size: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def test_views_are_the_flips_and_rotations() -> None:
    x = _images(2, 8)
    assert [len(views(x, m)) for m in ("none", "flips", "d4")] == [1, 3, 8]
    d4 = views(x, "d4")
    assert torch.equal(d4[0], x) and len({v.numpy().tobytes() for v in d4}) == 8  # 8 different images
    assert torch.equal(views(x, "flips")[1], x.flip(3)) and torch.equal(views(x, "flips")[2], x.flip(2))
    with pytest.raises(ValueError, match="none, flips, d4"):
        check_mode("rot")


@torch.inference_mode()
def test_d4_average_is_invariant_to_flips_and_rotations(model: CellClassifier) -> None:
    x = _images()
    reference = tta_probabilities(model, x, "d4")
    assert torch.allclose(reference.sum(1), torch.ones(len(x)), atol=1e-6)
    for moved in (torch.rot90(x, 1, (2, 3)), torch.rot90(x, 2, (2, 3)), torch.rot90(x, 3, (2, 3)), x.flip(3), x.flip(2),
                  x.transpose(2, 3)):
        assert (tta_probabilities(model, moved, "d4") - reference).abs().max() < 1e-5
    # flips alone are not closed under rotation: the model is not rotation invariant, so this differs
    assert (tta_probabilities(model, torch.rot90(x, 1, (2, 3)), "none") - tta_probabilities(model, x, "none")).abs().max() > 1e-5


@torch.inference_mode()
def test_tta_none_is_the_plain_calibrated_model(model: CellClassifier) -> None:
    x = _images()
    plain = model.calibrated(model(x)).softmax(1)
    assert torch.allclose(tta_probabilities(model, x, "none"), plain, atol=1e-7)
    assert torch.allclose(tta_probabilities(model, x, "none", calibrated=False), model(x).softmax(1), atol=1e-7)
    # flips: the mean of each view's temperature-scaled softmax
    by_hand = torch.stack([model.calibrated(model(v)).softmax(1) for v in (x, x.flip(3), x.flip(2))]).mean(0)
    assert torch.allclose(tta_probabilities(model, x, "flips"), by_hand, atol=1e-6)


def test_predictor_tta(trained_run: Path, cells: Path) -> None:
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    images = [np.asarray(Image.open(p).convert("RGB"))
              for p in sorted((cells / "monocyte").iterdir())[:4]]
    plain, d4 = Predictor(ckpt), Predictor(ckpt, tta="d4")
    probs, _ = d4.classify(images)
    assert np.allclose(probs, d4.probabilities(images), atol=1e-5)  # the two paths agree
    assert np.allclose(plain.classify(images)[0], Predictor(ckpt, tta="none").probabilities(images), atol=1e-6)
    rotated = [np.ascontiguousarray(np.rot90(im)) for im in images]
    assert np.allclose(d4.probabilities(rotated), probs, atol=1e-5)


def _domain_rows(path: Path) -> dict:
    return json.loads(path.read_text())


def test_evaluate_two_domains_writes_subreports_and_the_worst(trained_run: Path, cells: Path, tmp_path: Path) -> None:
    # two parts of the synthetic cells under other names (small, to keep the reports quick): every class, and two
    def copy(name: str, classes: list[str], n: int) -> Path:
        for folder in classes:
            (tmp_path / name / folder).mkdir(parents=True)
            for p in sorted((cells / folder).iterdir())[:n]:
                shutil.copy(p, tmp_path / name / folder / p.name)
        return tmp_path / name

    lab_a = copy("lab-a", sorted(p.name for p in cells.iterdir() if p.is_dir()), 4)
    lab_b = copy("lab-b", ["neutrophil", "lymphocyte"], 5)
    out = tmp_path / "eval"
    cfg = compose_cfg("evaluate", [f"ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}", "data.num_workers=0",
                                   f"+domains.lab_a.root={lab_a}", f"+domains.lab_b.root={lab_b}"], out)
    summary = evaluate(cfg)
    for name, n in (("lab_a", 20), ("lab_b", 10)):
        for f in ("report.md", "metrics.json", "predictions.csv", "confusion_matrix.png"):
            assert (out / name / f).is_file(), (name, f)
        metrics = json.loads((out / name / "metrics.json").read_text())
        assert metrics["n"] == n and metrics["domain"] == name and metrics["tta"] == "none"
        assert summary["domains"][name]["confusion_matrix"] == metrics["confusion_matrix"]
        assert summary["domains"][name]["balanced_accuracy"] == metrics["balanced_accuracy"]
    written = _domain_rows(out / "domains.json")
    assert written == json.loads(json.dumps(summary))
    bal = {k: v["balanced_accuracy"] for k, v in written["domains"].items()}
    assert written["worst_domain"] == min(bal, key=bal.get)
    md = (out / "domains.md").read_text()
    assert "| lab_a" in md and "| lab_b" in md and f"**{written['worst_domain']}**" in md
    assert md.count("confusion matrix") == 2
    assert not (out / "metrics.json").exists()  # only the per-domain reports


def test_evaluate_with_tta_flips_end_to_end(trained_run: Path, cells: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    proc = run_module("leukonet.evaluate", f"ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}",
                      f"data.root={cells}", f"hydra.run.dir={out}", "data.num_workers=0", "tta=flips")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 100 and metrics["tta"] == "flips" and "tta=flips" in metrics["title"]
    assert metrics["ece_before"] is not None and metrics["ece_after"] is not None
    bad = compose_cfg("evaluate", [f"ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}", f"data.root={cells}",
                                   "tta=rot"], tmp_path / "bad")
    with pytest.raises(DataError, match="tta must be one of none, flips, d4"):
        evaluate(bad)
