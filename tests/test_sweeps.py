"""Hyper-parameter searches: Optuna's seeded TPE and a basic-sweeper grid, composed from conf/hparams_search."""

from __future__ import annotations

import csv
from pathlib import Path

import yaml
from hydra import compose, initialize_config_dir

from conftest import TINY
from conftest import run_module as _run
from leukonet.train import CONF

SHORT = ["callbacks.two_phase.phase1.max_epochs=1", "callbacks.two_phase.phase2.max_epochs=1",
         *[o for o in TINY if "max_epochs" not in o]]


def _final_val_acc(trial: Path) -> float:
    """The validation accuracy of the final model: the csv log's last validation row."""
    rows = [r for r in csv.DictReader((trial / "csv" / "metrics.csv").open()) if r.get("val/acc")]
    return float(rows[-1]["val/acc"])


def test_optuna_search_runs_its_trials_and_records_the_best(cells: Path, tmp_path: Path) -> None:
    proc = _run("leukonet.train", "hparams_search=optuna", "+experiment=demo", f"data.root={cells}",
                f"hydra.sweep.dir={tmp_path}", "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.n_startup_trials=1",
                *SHORT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = sorted(p.parent for p in tmp_path.glob("*/metrics.json"))
    assert [t.name for t in trials] == ["0", "1"]  # both finished, each with its report
    results = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert results["name"] == "optuna"
    assert results["best_value"] == max(_final_val_acc(t) for t in trials)
    assert {"callbacks.two_phase.phase1.lr", "model/head"} <= set(results["best_params"])
    for trial in trials:  # each trial ran with its own sampled learning rate
        overrides = (trial / ".hydra" / "overrides.yaml").read_text()
        assert "callbacks.two_phase.phase1.lr=" in overrides and "model/head=" in overrides


def test_optuna_sampler_is_seeded_and_maximises_the_validation_metric() -> None:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", ["hparams_search=optuna", "+experiment=two_phase_lite0"], return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper.direction == "maximize" and cfg.optimized_metric.startswith("val/")
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler" and sweeper.sampler.seed is not None
    assert cfg.task_name == "two_phase_lite0"  # the experiment still names the runs


def test_grid_composes_every_combination() -> None:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", ["hparams_search=grid", "+experiment=two_phase_lite0"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert params["model/head"] == "linear,fastai" and len(params["data.augment.color.hue"].split(",")) == 3
