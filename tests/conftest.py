"""Shared fixtures: tiny synthetic datasets, Hydra composition, and the real data when present."""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

import forked_cli
from leukonet.data.synthetic import generate_dataset
from leukonet.train import CONF

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config) -> None:
    """Under pytest-xdist (`make test` runs ``-n auto``) each worker, and every process it starts, gets its share of
    the cores as torch threads: two workers with a thread per core each oversubscribe the machine (measured on 2
    cores: predict, train-evaluate and domains tests 159 s with 2 threads a worker, 144 s with 1)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def load_script(path: Path):
    """An experiment script (not a package module) imported by its path, to test its functions."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shared_data() -> Path | None:
    """The real datasets: $LEUKONET_DATA, else ../shared/data beside the checkout."""
    for candidate in (os.environ.get("LEUKONET_DATA"), REPO.parent / "shared" / "data"):
        if candidate and (Path(candidate) / "pbc-2500").is_dir():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def real_data() -> Path:
    found = shared_data()
    if found is None:
        pytest.skip("real data not found: set LEUKONET_DATA or place it in ../shared/data")
    return found


@pytest.fixture(scope="session")
def cells(tmp_path_factory) -> Path:
    """20 synthetic cells a class at 48 px, generated once per test session."""
    return generate_dataset(tmp_path_factory.mktemp("synthetic") / "cells", n_per_class=20, size=48, seed=0)


# Small and fast: a timm test backbone with BatchNorm, random weights, 32 px, short phases.
TINY = [
    "model.backbone=test_efficientnet",
    "model.pretrained=false",
    "data.image_size=32",
    "data.batch_size=16",
    "data.num_workers=0",
    "callbacks.two_phase.phase1.max_epochs=2",
    "callbacks.two_phase.phase2.max_epochs=2",
    "callbacks.two_phase.phase2.lr=1e-3",
    "~callbacks.progress_bar",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]


def run_module(module: str, *args: str, timeout: float = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m module args...`` from the repository root, as on the command line: a new process each time,
    forked from one that has done the imports (``forked_cli``), its exit code, stdout and stderr; ``env``: its
    environment (default: this process's)."""
    return forked_cli.run(module, *args, cwd=REPO, timeout=timeout, env=env)


def forked_script_run(cmd: list[str], log: Path, threads: int | None) -> None:
    """Stands in for the experiment scripts' ``run(cmd, log, threads)`` (experiments/stain_robustness/ablation.py) when a
    test calls a script's ``main`` in-process: the same ``python -m leukonet.<command> ...`` through ``run_module``,
    without the 10-13 s of imports each fresh interpreter pays; its output in ``log``, a failure a SystemExit."""
    assert cmd[1] == "-m" and threads is None, cmd
    proc = run_module(cmd[2], *cmd[3:])
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"failed (exit {proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """One short two-phase training run through `python -m leukonet.train`, shared by the session:
    read it, or copy it before adding files."""
    base = tmp_path_factory.mktemp("train")
    proc = run_module(
        "leukonet.train", "+experiment=demo", f"hydra.run.dir={base / 'run'}", f"paths.data_dir={base / 'data'}",
        "data.synthetic_cfg.n_per_class=20", "data.synthetic_cfg.size=48", *TINY,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return base / "run"


def compose_cfg(config: str, overrides: list[str], output_dir: Path | None = None) -> DictConfig:
    """Compose a config as the command line would, with the run directory pinned."""
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name=config, overrides=overrides)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
    return cfg
