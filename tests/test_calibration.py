"""Calibrated confidence: temperature scaling and the review threshold, fitted on validation, used downstream."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import compose_cfg
from leukonet.inference.calibration import (
    apply_temperature,
    calibrate,
    expected_calibration_error,
    fit_temperature,
    retained,
    review_threshold,
    risk_coverage,
)
from leukonet.data.folder import load_rgb
from leukonet.data.transforms import eval_transform
from leukonet.evaluate import evaluate
from leukonet.predict import predict
from leukonet.training.model import CellClassifier

KEYS = ("ece_before", "ece_after", "temperature", "review_threshold", "coverage_at_threshold", "accuracy_of_retained")
FIGURES = ("reliability_diagram.png", "risk_coverage.png")


def _calibrated_logits(n: int = 20000, classes: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of a perfectly calibrated model: each label is drawn from softmax(logits)."""
    g = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(n, classes, generator=g)
    labels = torch.multinomial(logits.softmax(1), 1, generator=g).squeeze(1)
    return logits, labels


def test_temperature_scaling_recovers_a_known_temperature() -> None:
    logits, labels = _calibrated_logits()
    assert fit_temperature(logits, labels) == pytest.approx(1.0, abs=0.05)
    overconfident = 3.0 * logits
    t = fit_temperature(overconfident, labels)
    assert t == pytest.approx(3.0, rel=0.05)
    assert fit_temperature(logits / 2, labels) == pytest.approx(0.5, rel=0.05)  # underconfident: T < 1
    before = overconfident.softmax(1).numpy()
    after = apply_temperature(before, t)  # from probabilities alone, as the report does
    assert np.allclose(after, (overconfident / t).softmax(1).numpy(), atol=1e-5)
    assert (after.argmax(1) == before.argmax(1)).all()  # no prediction changes
    ece_before, ece_after = expected_calibration_error(before, labels.numpy()), expected_calibration_error(after, labels.numpy())
    assert ece_before > 0.1 and ece_after < 0.02


def test_review_threshold_meets_the_target_and_is_the_lowest_that_does() -> None:
    logits, labels = _calibrated_logits(n=5000, seed=1)
    probs = logits.softmax(1).numpy()
    conf, correct = probs.max(1), probs.argmax(1) == labels.numpy()
    for target in (0.8, 0.95, 0.99):
        t = review_threshold(conf, correct, target)
        kept = conf >= t
        assert correct[kept].mean() >= target
        assert ((conf >= float(torch.tensor(t))) == kept).all()  # as the checkpoint's float32 buffer holds it
        assert retained(probs, labels.numpy(), t) == {"coverage": kept.mean(), "accuracy": correct[kept].mean()}
        lower = conf[conf < t]
        if len(lower):  # the next lower threshold keeps a set below the target
            assert correct[conf >= lower.max()].mean() < target
    coverage, risk = risk_coverage(probs, labels.numpy())
    assert coverage[-1] == 1 and risk[-1] == pytest.approx(1 - correct.mean())
    # every cell right: nothing flagged; the most confident cell wrong at target 1: everything flagged
    assert review_threshold(np.array([0.5, 0.9, 0.7]), np.array([True, True, True]), 0.995) == 0.5
    t = review_threshold(np.array([0.5, 0.9, 0.7]), np.array([True, False, True]), 0.995)
    assert float(torch.tensor(t)) > 0.9 and retained(np.array([[0.9, 0.1]]), None, t)["coverage"] == 0
    # ties stay together: two cells at 0.9, one of them wrong, cannot be split by a threshold
    assert review_threshold(np.array([0.875, 0.875, 0.9375]), np.array([True, False, True]), 0.99) == 0.9375
    t = review_threshold(np.array([0.95, 0.9]), np.array([True, True]), 0.99)  # not a float32: rounded down
    assert t <= 0.9 and float(torch.tensor(t)) == t


def test_calibrate_reports_what_it_fitted() -> None:
    logits, labels = _calibrated_logits(n=4000, seed=2)
    values = calibrate(3 * logits, labels.numpy(), 0.9)
    assert values["temperature"] == pytest.approx(3, rel=0.1) and values["ece_after"] < values["ece_before"]
    assert values["accuracy_of_retained"] >= 0.9 and 0 < values["coverage_at_threshold"] < 1


def test_training_stores_calibration_and_predict_and_evaluate_use_it(trained_run: Path, cells: Path,
                                                                     tmp_path: Path) -> None:
    ckpts = [trained_run / "checkpoints" / n for n in ("last.ckpt", "best.ckpt")]
    states = [torch.load(c, map_location="cpu", weights_only=True)["state_dict"] for c in ckpts]
    t, threshold = float(states[0]["temperature"]), float(states[0]["review_threshold"])
    assert all(float(s["temperature"]) == t and float(s["review_threshold"]) == threshold for s in states)
    assert 0.01 < t < 100 and t != 1.0 and threshold >= 0
    model = CellClassifier.from_checkpoint(ckpts[0])
    assert float(model.temperature) == t and model.chosen_review_threshold() == pytest.approx(threshold)

    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert set(KEYS) <= set(metrics) and metrics["temperature"] == pytest.approx(t, rel=1e-5)
    assert metrics["review_threshold"] == pytest.approx(threshold, rel=1e-5)
    fit = metrics["calibration_fit"]
    assert fit["split"] == "val" and fit["target_accuracy"] == 0.995 and fit["n"] == 15
    assert fit["accuracy_of_retained"] is None or fit["accuracy_of_retained"] >= 0.995
    assert all((trained_run / f).is_file() for f in FIGURES)
    assert "## Calibration and review" in (trained_run / "report.md").read_text()

    # predict: temperature-scaled probabilities, flagged below the checkpoint's threshold
    images = tmp_path / "today"
    shutil.copytree(cells / "lymphocyte", images)
    cfg = compose_cfg("predict", [f"ckpt_path={ckpts[0]}", f"input={images}", "fields=false", "precision=32-true",
                                  "progress=false"], tmp_path / "predict")
    summary = predict(cfg)
    assert summary["review_threshold"] == pytest.approx(threshold) and summary["review_threshold_from"] == "checkpoint"
    assert summary["temperature"] == pytest.approx(t)
    rows = list(csv.DictReader((tmp_path / "predict" / "predictions.csv").open()))
    names = list(model.hparams.class_names)
    transform = eval_transform(model.hparams.image_size)
    x = torch.stack([transform(image=load_rgb(Path(r["file"])))["image"] for r in rows])
    with torch.no_grad():
        expected = (model(x) / t).softmax(1).numpy()
    got = np.array([[float(r[f"p_{n}"]) for n in names] for r in rows])
    assert np.allclose(got, expected, atol=1e-5)
    for r in rows:
        if abs(float(r["confidence"]) - threshold) > 1e-5:
            assert r["needs_review"] == str(float(r["confidence"]) < threshold and r["not_a_leukocyte"] == "False")
    assert summary["needs_review"] == sum(r["needs_review"] == "True" for r in rows)

    cfg = compose_cfg("predict", [f"ckpt_path={ckpts[0]}", f"input={images}", "fields=false", "precision=32-true",
                                  "progress=false", "review_threshold=0.5"], tmp_path / "predict2")
    assert predict(cfg)["review_threshold_from"] == "config"
    rows = list(csv.DictReader((tmp_path / "predict2" / "predictions.csv").open()))
    assert all(r["needs_review"] == str(float(r["confidence"]) < 0.5 and r["not_a_leukocyte"] == "False") for r in rows)

    # evaluate: ECE before/after, coverage at the checkpoint's threshold, both figures
    cfg = compose_cfg("evaluate", [f"ckpt_path={ckpts[0]}", f"data.root={cells}", "data.num_workers=0",
                                   "precision=32-true"], tmp_path / "eval")
    metrics = evaluate(cfg)
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(KEYS) <= set(written) and written["temperature"] == pytest.approx(t, rel=1e-5)
    assert written["review_threshold"] == pytest.approx(threshold, rel=1e-5)
    preds = list(csv.DictReader((tmp_path / "eval" / "predictions.csv").open()))
    assert written["coverage_at_threshold"] == pytest.approx(
        np.mean([float(r["confidence"]) >= threshold for r in preds]), abs=0.011)
    for f in FIGURES:
        with Image.open(tmp_path / "eval" / f) as im:
            assert im.width > 300 and im.height > 200
    assert metrics["n"] == 100


def test_old_checkpoints_load_with_temperature_one(trained_run: Path, cells: Path, tmp_path: Path) -> None:
    ckpt = torch.load(trained_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    for key in ("temperature", "review_threshold"):
        del ckpt["state_dict"][key]
    torch.save(ckpt, tmp_path / "old.ckpt")
    model = CellClassifier.from_checkpoint(tmp_path / "old.ckpt")
    assert float(model.temperature) == 1.0 and model.chosen_review_threshold() is None
    # kind_check=false: the copied checkpoint has no run beside it to say it trained on drawings (that check: test_ood.py)
    cfg = compose_cfg("predict", [f"ckpt_path={tmp_path / 'old.ckpt'}", f"input={cells / 'basophil'}",
                                  "fields=false", "precision=32-true", "progress=false", "kind_check=false"], tmp_path / "predict")
    summary = predict(cfg)
    assert summary["review_threshold"] == 0.9 and summary["temperature"] == 1.0
    cfg = compose_cfg("evaluate", [f"ckpt_path={tmp_path / 'old.ckpt'}", f"data.root={cells}", "data.num_workers=0",
                                   "precision=32-true", "kind_check=false"], tmp_path / "eval")
    metrics = evaluate(cfg)
    assert metrics["temperature"] == 1.0 and metrics["review_threshold"] is None
    assert metrics["ece_before"] == pytest.approx(metrics["ece_after"], abs=1e-5)
    assert "trained before calibration" in (tmp_path / "eval" / "report.md").read_text()
