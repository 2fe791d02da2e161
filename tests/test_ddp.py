"""Many processes: two CPU processes (DDP over gloo) through the real command line, and the SLURM launcher config.

The training runs check what single-device tests cannot: every test image is scored and reported exactly
once, both processes go through both phases together and end with the same weights, and Lightning's
re-run of the command line for process 1 stays inside the run (or sweep job) directory.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.strategies import DDPStrategy
from omegaconf import OmegaConf

from conftest import REPO, TINY
from leukonet.train import CONF
from leukonet.training.distributed import ShardSampler, gather_rows

DDP = ["trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu", "+callbacks.probe._target_=ddp_probe.DDPProbe"]
SMALL = ["data.synthetic_cfg.n_per_class=20", "data.synthetic_cfg.size=48"]  # 70 / 15 / 15 images


def _train(*args: str) -> subprocess.CompletedProcess:
    helpers = os.pathsep.join([str(REPO / "tests" / "helpers"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": helpers}
    return subprocess.run([sys.executable, "-m", "leukonet.train", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _phase_lines(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if "[two-phase]" in line]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("ddp")
    proc = _train("+experiment=demo", f"hydra.run.dir={base / 'run'}", f"paths.data_dir={base / 'data'}",
                  *SMALL, *TINY, *DDP)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "already holds a run" not in proc.stderr  # process 1 re-runs the command into the same directory
    assert sorted(p.name for p in base.iterdir()) == ["data", "run"]  # and makes no directory of its own
    return base / "run"


@pytest.mark.slow
def test_every_test_image_is_reported_once_in_order(ddp_run: Path) -> None:
    test = [r for r in _rows(ddp_run / "split.csv") if r["split"] == "test"]
    metrics = json.loads((ddp_run / "metrics.json").read_text())
    assert metrics["n"] == len(test) == 15
    assert sum(map(sum, metrics["confusion_matrix"])) == len(test)  # none repeated by padding, none lost
    predictions = _rows(ddp_run / "predictions.csv")
    assert len(predictions) == len({p["path"] for p in predictions}) == len(test)  # each image once
    assert all(p["path"].endswith("/" + t["path"]) for p, t in zip(predictions, test))  # in the split's order
    assert [p["true"] for p in predictions] == [t["label"] for t in test]
    for p in predictions:  # a probability row of its own per image
        assert abs(sum(float(v) for k, v in p.items() if k.startswith("prob_")) - 1) < 1e-3


@pytest.mark.slow
def test_both_processes_run_both_phases_and_end_with_the_same_weights(ddp_run: Path) -> None:
    probes = [json.loads((ddp_run / f"probe_rank{r}.json").read_text()) for r in (0, 1)]
    assert [p["world_size"] for p in probes] == [2, 2]
    for p in probes:  # 2 + 2 epochs; the backbone trains in phase 2 only
        assert [e["phase"] for e in p["epochs"]] == [1, 1, 2, 2]
        assert [e["backbone_trains"] for e in p["epochs"]] == [False, False, True, True]
    # gradients of the unfrozen backbone are averaged too: without that each process trains its own
    assert probes[0]["parameters"] == probes[1]["parameters"]
    for e0, e1 in zip(probes[0]["epochs"], probes[1]["epochs"]):  # each epoch's shuffle, split between them
        assert len(e0["train_indices"]) == len(e1["train_indices"]) == 35
        assert sorted(e0["train_indices"] + e1["train_indices"]) == list(range(70))
    assert probes[0]["epochs"][0]["train_indices"] != probes[0]["epochs"][1]["train_indices"]
    # each process logs its phase changes into its own file of the run directory
    for rank, log in ((0, "train.log"), (1, "train_ddp_process_1.log")):
        lines = _phase_lines(ddp_run / log)
        assert all(f"[rank: {rank}]" in line for line in lines) and len(lines) == 4, lines
        assert "phase 1: backbone frozen" in lines[0] and "phase 2 starts" in lines[2]


@pytest.mark.slow
def test_only_rank_zero_writes_the_run(ddp_run: Path) -> None:
    files = {p.name for p in ddp_run.iterdir()}
    assert {"report.md", "metrics.json", "predictions.csv", "split.csv", "checkpoints", "csv", "tensorboard"} <= files
    assert not [f for f in files if "rank_1" in f or "version_" in f]
    assert sorted(p.name for p in (ddp_run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert [p.name for p in (ddp_run / "csv").iterdir() if p.suffix == ".csv"] == ["metrics.csv"]
    phases = {r["phase"] for r in _rows(ddp_run / "csv" / "metrics.csv") if r.get("phase")}
    assert {float(p) for p in phases} == {1.0, 2.0}


@pytest.mark.slow
def test_a_sweep_job_starts_its_own_processes_in_its_own_directory(tmp_path: Path) -> None:
    """Lightning re-runs the command line for process 1: in a --multirun, the whole sweep again."""
    proc = _train("--multirun", "+experiment=demo", f"hydra.sweep.dir={tmp_path / 'sweeps'}/${{now:%H-%M-%S-%f}}",
                  f"paths.data_dir={tmp_path / 'data'}", "data.augment.color.hue=0.05,0.2", *SMALL,
                  "callbacks.two_phase.phase1.max_epochs=1", "callbacks.two_phase.phase2.max_epochs=1",
                  *[o for o in TINY if "max_epochs" not in o], *DDP)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    [sweep] = (tmp_path / "sweeps").iterdir()  # process 1 made no sweep of its own
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    for job in ("0", "1"):
        run = sweep / job
        assert json.loads((run / "metrics.json").read_text())["n"] == 15
        for rank, log in ((0, "train.log"), (1, "train_ddp_process_1.log")):  # one job each, this one
            lines = _phase_lines(run / log)
            assert len(lines) == 4 and all(f"[rank: {rank}]" in line for line in lines), lines
        probes = [json.loads((run / f"probe_rank{r}.json").read_text()) for r in (0, 1)]
        assert probes[0]["parameters"] == probes[1]["parameters"]


# -- the pieces, without training ------------------------------------------------------------------
def _gather_in_two(rank: int, port: int, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        dataset = list(range(7))
        mine = list(UnrepeatedDistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=False))
        rows = torch.tensor([[i, 10 * i] for i in mine], dtype=torch.float32)
        results[rank] = gather_rows(rows, mine, len(dataset)).tolist()
    finally:
        dist.destroy_process_group()


def test_gather_rows_puts_every_process_rows_back_in_dataset_order() -> None:
    from lightning.fabric.plugins.environments.lightning import find_free_network_port

    with mp.Manager() as manager:
        results = manager.dict()
        # fork: nothing to import again; CPU-only, before any CUDA
        mp.start_processes(_gather_in_two, args=(find_free_network_port(), results), nprocs=2, start_method="fork")
        expected = [[i, 10 * i] for i in range(7)]
        assert results[0] == results[1] == expected


def test_gather_rows_refuses_repeated_or_missing_images() -> None:
    rows = torch.zeros(3, 5)
    assert gather_rows(rows, [2, 0, 1], 3).shape == (3, 5)
    with pytest.raises(RuntimeError, match="more than once"):
        gather_rows(rows, [0, 1, 1], 3)
    with pytest.raises(RuntimeError, match="scored 3 of 4"):
        gather_rows(rows, [0, 1, 2], 4)


def test_shards_cover_the_epoch_order_and_are_equally_long() -> None:
    order = [4, 0, 3, 1, 2]
    shards = [list(ShardSampler(order, num_replicas=2, rank=r)) for r in (0, 1)]
    assert shards == [[4, 3, 2], [0, 1, 4]]  # padded with the first item: both processes take 3 steps
    assert set(shards[0] + shards[1]) == set(order)


def test_ddp_trainer_config_builds_a_ddp_trainer(tmp_path: Path) -> None:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=3", "trainer.num_nodes=1"])
    trainer = instantiate(cfg.trainer, default_root_dir=str(tmp_path), precision="32-true", logger=False)
    assert isinstance(trainer.strategy, DDPStrategy) and trainer.num_devices == 3 and trainer.num_nodes == 1


def test_slurm_launcher_composes_without_submitting() -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", ["hydra/launcher=slurm", "+experiment=two_phase_lite0", "trainer=ddp",
                                "trainer.devices=4", "trainer.num_nodes=2", "hydra.launcher.partition=gpu"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    # one SLURM task per device, as Lightning checks; as many nodes as the trainer spans
    assert (launcher.tasks_per_node, launcher.gpus_per_node, launcher.nodes) == (4, 4, 2)
    assert launcher.partition == "gpu" and launcher.timeout_min > 0 and launcher.max_num_timeout == 0
    resolved = OmegaConf.to_container(launcher, resolve=False)
    assert resolved["tasks_per_node"] == "${trainer.devices}"


def test_a_sweep_job_child_runs_that_job_alone(tmp_path: Path) -> None:
    """The command line of DDP process 1 in a sweep job: the job's overrides, run mode, the job's directory."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict

    from leukonet.training.distributed import child_command

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", ["hparams_search=optuna", "+experiment=demo", "trainer=ddp"], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.mode = RunMode.MULTIRUN
        cfg.hydra.overrides.task = ["hparams_search=optuna", "+experiment=demo", "trainer=ddp", "model/head=linear"]
        cfg.hydra.overrides.hydra = ["hydra.mode=MULTIRUN", f"hydra.sweep.dir={tmp_path}", "hydra.sweeper.n_trials=3",
                                     "hydra.job.chdir=false"]
        cfg.hydra.runtime.output_dir = str(tmp_path / "4")
        cfg.hydra.runtime.cwd = str(REPO)
    HydraConfig.instance().set_config(cfg)
    try:
        command, cwd = child_command(1, lightning_command=lambda rank: pytest.fail("a sweep job is not a single run"))
    finally:
        HydraConfig.instance().cfg = None
    args = command[command.index("--config-name=train") + 1:]
    assert args[:4] == ["hparams_search=optuna", "+experiment=demo", "trainer=ddp", "model/head=linear"]
    assert "hydra.job.chdir=false" in args
    assert not [a for a in args if a.startswith(("hydra.sweep", "hydra.mode=MULTI"))]
    assert args[-4:] == ["hydra.mode=RUN", f'hydra.run.dir="{tmp_path / "4"}"', "hydra.job.name=train_ddp_process_1",
                         "hydra.output_subdir=null"]
    assert cwd == str(REPO)
