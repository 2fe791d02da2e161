"""Train then evaluate through the real command lines, on synthetic cells with a tiny backbone."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

from conftest import TINY, compose_cfg
from conftest import run_module as _run
from leukonet.train import train
from leukonet.training.model import CellClassifier

FIGURES = ("confusion_matrix.png", "per_class_metrics.png")


def _check_report(run: Path, title_word: str) -> dict:
    for name in ("report.md", "metrics.json", "predictions.csv", *FIGURES):
        assert (run / name).is_file(), name
    for png in run.glob("*.png"):
        with Image.open(png) as im:
            im.load()
            assert im.width > 200 and im.height > 100
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"accuracy", "macro_f1", "balanced_accuracy", "per_class", "n"} <= set(metrics)
    assert title_word in (run / "report.md").read_text().splitlines()[0]
    assert "| Class | Precision | Recall | F1-score | Support |" in (run / "report.md").read_text()
    return metrics


def test_training_writes_report_checkpoints_and_logs(trained_run: Path) -> None:
    metrics = _check_report(trained_run, "synthetic")
    assert metrics["n"] == 15 and metrics["split"] == "test"
    assert (trained_run / "loss_curves.png").is_file()
    assert (trained_run / "checkpoints" / "last.ckpt").is_file() and (trained_run / "checkpoints" / "best.ckpt").is_file()
    assert list((trained_run / "tensorboard").glob("events.out.tfevents.*"))
    history = (trained_run / "csv" / "metrics.csv").read_text()
    assert "phase" in history.splitlines()[0] and "val/loss" in history.splitlines()[0]
    assert metrics["epochs"]["phase1"] == 2 and metrics["epochs"]["total"] == 4
    assert "python -m leukonet.train" in metrics["command"] and metrics["machine"]


def test_checkpoint_loads_without_unpickling(trained_run: Path) -> None:
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    torch.load(ckpt, map_location="cpu", weights_only=True)  # raises if anything but tensors/plain data
    model = CellClassifier.from_checkpoint(ckpt)
    x = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
    assert model(x).shape == (2, 5)


def test_evaluate_an_external_folder(trained_run: Path, cells: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    proc = _run("leukonet.evaluate", f"ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}",
                f"data.root={cells}", f"hydra.run.dir={out}", "data.num_workers=0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = _check_report(out, "cells")
    assert metrics["n"] == 100 and metrics["split"] == "all"
    assert sum(map(sum, metrics["confusion_matrix"])) == 100


def test_evaluate_the_test_split_of_a_run(trained_run: Path, tmp_path: Path) -> None:
    root = json.loads((trained_run / "data_summary.json").read_text())["root"]
    out = tmp_path / "eval"
    proc = _run("leukonet.evaluate", f"ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}", f"data.root={root}",
                f"data.split_file={trained_run / 'split.csv'}", f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads((out / "metrics.json").read_text())
    first = json.loads((trained_run / "metrics.json").read_text())
    assert again["n"] == first["n"] and again["confusion_matrix"] == first["confusion_matrix"]


def test_evaluate_names_a_missing_checkpoint(tmp_path: Path) -> None:
    proc = _run("leukonet.evaluate", f"ckpt_path={tmp_path / 'nope.ckpt'}", f"hydra.run.dir={tmp_path / 'e'}")
    assert proc.returncode == 2 and "nope.ckpt does not exist" in proc.stderr


def test_a_run_directory_is_never_overwritten(trained_run: Path) -> None:
    proc = _run("leukonet.train", "+experiment=demo", f"hydra.run.dir={trained_run}", *TINY)
    assert proc.returncode == 2 and "already holds a run" in proc.stderr
    assert json.loads((trained_run / "metrics.json").read_text())["n"] == 15  # untouched


def test_train_returns_the_metric_a_sweep_optimises(cells: Path, tmp_path: Path) -> None:
    cfg = compose_cfg("train", ["+experiment=demo", f"data.root={cells}", "test=false", *TINY], tmp_path)
    metrics = train(cfg)
    assert 0.0 <= metrics[cfg.optimized_metric] <= 1.0 and "test/acc" not in metrics


def test_multirun_sweep_gives_each_run_its_own_directory(cells: Path, tmp_path: Path) -> None:
    proc = _run(
        "leukonet.train", "--multirun", "+experiment=demo", f"data.root={cells}", f"hydra.sweep.dir={tmp_path}",
        "data.augment.color.hue=0.05,0.2", "callbacks.two_phase.phase1.max_epochs=1",
        "callbacks.two_phase.phase2.max_epochs=1", *[o for o in TINY if "max_epochs" not in o],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(p.parent for p in tmp_path.glob("*/metrics.json"))
    assert [r.name for r in runs] == ["0", "1"]
    hues = [(r / ".hydra" / "overrides.yaml").read_text() for r in runs]
    assert "hue=0.05" in hues[0] and "hue=0.2" in hues[1]
