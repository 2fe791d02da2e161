"""Tests for leukonet.inference.report: metrics against hand-computed values, files written, history merging."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from leukonet.inference.report import compute_metrics, read_history, write_report

NAMES = ["a", "b", "c"]
# 10 samples. Confusion matrix (rows = true):
#   a: [3, 1, 0]   b: [0, 2, 1]   c: [1, 0, 2]
Y_TRUE = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
Y_PRED = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 0])


def _probs(pred: np.ndarray, num_classes: int, confidence: np.ndarray | float = 0.8) -> np.ndarray:
    """Probability rows whose argmax is ``pred`` with the given confidence; the rest spread evenly."""
    conf = np.broadcast_to(np.asarray(confidence, dtype=float), pred.shape)
    probs = np.repeat(((1 - conf) / (num_classes - 1))[:, None], num_classes, axis=1)
    probs[np.arange(len(pred)), pred] = conf
    return probs


def _strict_json(path: Path) -> dict:
    """Load JSON, failing on NaN/Infinity, which are not JSON."""
    def reject(token: str) -> None:
        raise ValueError(f"non-JSON constant {token}")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=reject)


def _write_pngs(folder: Path, n: int) -> list[str]:
    folder.mkdir()
    paths = []
    for i in range(n):
        path = folder / f"img_{i}.png"
        Image.new("RGB", (40, 32), (200, 40 * (i % 6), 120)).save(path)
        paths.append(str(path))
    return paths


def test_compute_metrics_matches_hand_computation() -> None:
    m = compute_metrics(Y_TRUE, _probs(Y_PRED, 3), NAMES)

    assert m["n"] == 10
    assert m["accuracy"] == pytest.approx(7 / 10)
    assert m["confusion_matrix"] == [[3, 1, 0], [0, 2, 1], [1, 0, 2]]
    assert m["class_names"] == NAMES
    expected = {  # precision = tp / column sum, recall = tp / row sum
        "a": (3 / 4, 3 / 4, 4),
        "b": (2 / 3, 2 / 3, 3),
        "c": (2 / 3, 2 / 3, 3),
    }
    for name, (precision, recall, support) in expected.items():
        row = m["per_class"][name]
        assert row["precision"] == pytest.approx(precision, abs=1e-6)
        assert row["recall"] == pytest.approx(recall, abs=1e-6)
        assert row["f1"] == pytest.approx(2 * precision * recall / (precision + recall), abs=1e-6)
        assert row["support"] == support
    assert m["balanced_accuracy"] == pytest.approx((3 / 4 + 2 / 3 + 2 / 3) / 3, abs=1e-6)
    assert m["macro_f1"] == pytest.approx((3 / 4 + 2 / 3 + 2 / 3) / 3, abs=1e-6)
    assert m["weighted_f1"] == pytest.approx((4 * 3 / 4 + 3 * 2 / 3 + 3 * 2 / 3) / 10, abs=1e-6)
    assert all(type(v) is float for v in (m["accuracy"], m["macro_f1"], m["balanced_accuracy"]))
    json.dumps(m, allow_nan=False)


def test_class_missing_from_labels_gives_null_not_nan(tmp_path: Path) -> None:
    names = ["a", "b", "c", "d"]
    # "d" never occurs and is never predicted; "c" never occurs but is predicted once.
    y_true = np.array([0, 0, 1, 1, 1])
    y_pred = np.array([0, 2, 1, 1, 0])
    m = compute_metrics(y_true, _probs(y_pred, 4), names)

    assert m["per_class"]["d"] == {"precision": None, "recall": None, "f1": None, "support": 0}
    assert m["per_class"]["c"] == {"precision": 0.0, "recall": None, "f1": 0.0, "support": 0}
    assert m["balanced_accuracy"] == pytest.approx((1 / 2 + 2 / 3) / 2, abs=1e-6)  # over a and b only

    paths = _write_pngs(tmp_path / "imgs", 5)
    write_report(tmp_path / "out", title="missing", y_true=y_true, probs=_probs(y_pred, 4), paths=paths,
                 class_names=names, extra={"bad": float("nan")})
    saved = _strict_json(tmp_path / "out" / "metrics.json")
    assert saved["per_class"]["d"]["recall"] is None
    assert saved["bad"] is None
    assert "NaN" not in (tmp_path / "out" / "report.md").read_text(encoding="utf-8")


def test_write_report_writes_every_file(tmp_path: Path) -> None:
    paths = _write_pngs(tmp_path / "imgs", 10)
    paths[9] = str(tmp_path / "imgs" / "missing.png")  # the most confident error; it cannot be read
    history = [
        {"epoch": e, "phase": 1 if e < 3 else 2, "train_loss": 1.0 / (e + 1), "val_loss": 1.2 / (e + 1),
         "val_acc": 0.5 + 0.05 * e}
        for e in range(6)
    ]
    extra = {"citation": "Doe J. et al. (2020) A blood cell dataset.", "command": "leukonet evaluate x=1",
             "wall_time_s": 12.5}
    out = tmp_path / "report"
    confidence = np.linspace(0.5, 0.95, 10)
    m = write_report(out, title="Test split report", y_true=Y_TRUE, probs=_probs(Y_PRED, 3, confidence),
                     paths=paths, class_names=NAMES, history=history, extra=extra, gallery_size=2)

    for name in ("metrics.json", "predictions.csv", "report.md", "confusion_matrix.png",
                 "per_class_metrics.png", "loss_curves.png", "misclassified.png"):
        assert (out / name).is_file(), name
    for png in out.glob("*.png"):
        with Image.open(png) as img:
            img.load()
            assert 300 <= img.width <= 3000 and 200 <= img.height <= 3000, (png.name, img.size)

    saved = _strict_json(out / "metrics.json")
    for key in ("accuracy", "macro_f1", "balanced_accuracy", "per_class", "n"):
        assert key in saved
    assert saved["title"] == "Test split report" and saved["wall_time_s"] == 12.5
    assert saved["accuracy"] == m["accuracy"] == pytest.approx(0.7)

    rows = (out / "predictions.csv").read_text(encoding="utf-8").splitlines()
    assert rows[0] == "path,true,predicted,confidence,correct,prob_a,prob_b,prob_c"
    assert len(rows) == 11
    assert rows[4].split(",")[1:3] == ["a", "b"] and rows[4].split(",")[4] == "0"

    md = (out / "report.md").read_text(encoding="utf-8")
    assert md.startswith("# Test split report\n")
    assert "| Class | Precision | Recall | F1-score | Support |" in md
    assert "| macro avg |" in md and "| weighted avg |" in md
    assert "## Data\n\nDoe J. et al. (2020) A blood cell dataset.\n" in md
    assert "## Run" in md and "leukonet evaluate x=1" in md
    assert "3 of 10 images misclassified" in md
    assert "- a → b: 1" in md
    assert "Gallery of 2 of 3" in md
    for figure in ("confusion_matrix.png", "per_class_metrics.png", "loss_curves.png", "misclassified.png"):
        assert f"]({figure})" in md


def test_write_report_without_errors_or_history(tmp_path: Path) -> None:
    out = tmp_path / "report"
    out.mkdir()
    (out / "misclassified.png").write_bytes(b"stale")  # left by an earlier run in the same folder
    paths = _write_pngs(tmp_path / "imgs", 10)
    write_report(out, title="perfect", y_true=Y_TRUE, probs=_probs(Y_TRUE, 3), paths=paths, class_names=NAMES)

    assert not (out / "misclassified.png").exists()
    assert not (out / "loss_curves.png").exists()
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "No misclassified images." in md
    assert "misclassified.png" not in md and "loss_curves.png" not in md


def test_extra_may_not_overwrite_metrics(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="accuracy"):
        write_report(tmp_path, title="t", y_true=Y_TRUE, probs=_probs(Y_PRED, 3), paths=["x"] * 10,
                     class_names=NAMES, extra={"accuracy": 1.0})


def test_read_history_merges_sparse_csvlogger_rows(tmp_path: Path) -> None:
    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text(
        "epoch,phase,step,train/loss,val/acc,val/loss\n"
        "0,,9,,0.5,1.5\n"
        "0,1.0,9,2.0,,\n"
        "1,,19,,0.6,1.25\n"
        "1,1.0,19,1.0,,\n"
        "2,,29,,0.75,1.0\n"
        "2,2.0,29,0.5,,\n"
        "3,2.0,39,0.25,,\n"  # an epoch whose validation did not run
    )
    history = read_history(csv_path)

    assert history == [
        {"epoch": 0, "phase": 1, "train_loss": 2.0, "val_loss": 1.5, "val_acc": 0.5},
        {"epoch": 1, "phase": 1, "train_loss": 1.0, "val_loss": 1.25, "val_acc": 0.6},
        {"epoch": 2, "phase": 2, "train_loss": 0.5, "val_loss": 1.0, "val_acc": 0.75},
        {"epoch": 3, "phase": 2, "train_loss": 0.25, "val_loss": None, "val_acc": None},
    ]
