"""Many processes (DDP, ``trainer=ddp``): what keeps evaluation and the two phases exact.

- Training: each process takes every ``world_size``-th item of the epoch's shuffle (``ShardSampler``);
  Lightning would otherwise wrap that shuffle in a ``DistributedSampler`` seeded from the
  ``PL_GLOBAL_SEED`` variable, which per-epoch reseeding makes differ between processes.
- Validation and test: each process scores every ``world_size``-th image, none repeated and none
  left out. Lightning's default ``DistributedSampler`` pads a split with repeated images so that
  every process gets as many: the metrics would count those twice.
- ``gather_rows``: every process's test probabilities, back in dataset order on all of them.
- ``rewrap_ddp``: ``DistributedDataParallel`` averages the gradients of the parameters that
  required grad when it was built. The backbone is frozen then; once it is unfrozen the wrapper
  must be built again, or each process would silently train a backbone of its own.
- ``job_processes``: Lightning starts DDP processes 1..N-1 by running the command line again. In a
  Hydra ``--multirun`` that would start the whole sweep in each of them, in sweep directories of
  their own; here each runs just its job, in the job's directory, and each job of the sweep starts
  and ends its own processes.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from leukonet.errors import DataError


class ShardSampler(DistributedSampler):
    """Process ``rank``'s share of another sampler's order: items ``rank, rank + w, ...``, the order
    padded with its own first items to a multiple of ``w`` so that every process runs as many steps.
    A ``DistributedSampler``, so Lightning leaves it as it is."""

    def __init__(self, sampler: Sampler[int], num_replicas: int, rank: int) -> None:  # noqa: D107
        # no super().__init__: it wants a dataset and reads the process group; the order comes from ``sampler``
        self.sampler, self.num_replicas, self.rank = sampler, num_replicas, rank
        self.num_samples = math.ceil(len(sampler) / num_replicas)
        self.total_size = self.num_samples * num_replicas
        self.epoch, self.shuffle, self.drop_last = 0, False, False

    def __iter__(self) -> Iterator[int]:
        order = list(self.sampler)
        order += (order * self.num_replicas)[: self.total_size - len(order)]
        return iter(order[self.rank : self.total_size : self.num_replicas])

    def __len__(self) -> int:
        return self.num_samples


def train_sampler(sampler: Sampler[int], trainer: L.Trainer | None) -> Sampler[int]:
    """``sampler`` itself on one process; under DDP this process's ``ShardSampler`` of it."""
    if trainer is None or trainer.world_size <= 1:
        return sampler
    return ShardSampler(sampler, trainer.world_size, trainer.global_rank)


def eval_sampler(dataset: Dataset, trainer: L.Trainer | None, split: str) -> UnrepeatedDistributedSampler | None:
    """Under DDP, process ``r`` of ``w`` scores images ``r, r + w, r + 2w, ...``; else None (all, in order)."""
    if trainer is None or trainer.world_size <= 1:
        return None
    n, world = len(dataset), trainer.world_size
    if 0 < n < world:  # a process without a single batch would leave the others waiting
        raise DataError(f"the {split} split has {n} image(s), fewer than the {world} processes; use fewer devices")
    return UnrepeatedDistributedSampler(dataset, num_replicas=world, rank=trainer.global_rank, shuffle=False)


def loader_indices(loader: DataLoader) -> list[int]:
    """The dataset indices a data loader visits, in the order its batches come."""
    return [int(i) for i in loader.sampler]


def gather_rows(rows: torch.Tensor, indices: Sequence[int], total: int) -> torch.Tensor:
    """Rows each process computed for the dataset items ``indices`` -> all ``total`` rows in dataset
    order, on every process. Every item must have been scored exactly once, by one process."""
    if len(indices) != len(rows):
        raise RuntimeError(f"{len(rows)} rows for {len(indices)} dataset indices (limit_test_batches?)")
    parts = [(list(indices), rows.detach().cpu())]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (list(indices), rows.detach().cpu()))
    index = torch.tensor([i for idx, _ in parts for i in idx], dtype=torch.long)
    counts = torch.bincount(index, minlength=total) if len(index) else torch.zeros(total, dtype=torch.long)
    if len(counts) != total or (counts != 1).any():
        raise RuntimeError(
            f"the processes scored {int((counts > 0).sum())} of {total} images, "
            f"{int((counts > 1).sum())} of them more than once: each must be scored exactly once"
        )
    stacked = torch.cat([r for _, r in parts])
    ordered = torch.empty_like(stacked)
    ordered[index] = stacked
    return ordered


def rewrap_ddp(trainer: L.Trainer) -> None:
    """Build the DDP wrapper again so that it averages the gradients of every parameter that requires
    grad now (e.g. a backbone just unfrozen). A collective: every process calls it at the same step;
    the new wrapper starts from rank 0's weights and buffers. No-op without DDP."""
    strategy = trainer.strategy
    if isinstance(strategy.model, DistributedDataParallel):
        strategy.model = strategy.lightning_module
        strategy.configure_ddp()


# hydra overrides that make a sweep, not a job: a job's DDP processes run without them
_SWEEP_ONLY = ("hydra.mode", "hydra.sweep", "hydra/sweeper", "hydra.launcher", "hydra/launcher", "hydra.run",
               "hydra.job.name", "hydra.job.num", "hydra.job.id", "hydra.output_subdir")
_DDP_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


def child_command(local_rank: int, lightning_command=None) -> tuple[list[str], str]:
    """The command line of DDP process ``local_rank`` of the current Hydra job, and its working directory.

    A single run keeps Lightning's (the same command line, in the same run directory). A job of a
    sweep (``--multirun``, ``hparams_search=...``) gets the job's own overrides, in run mode, in the
    job's directory."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from hydra.utils import get_original_cwd, to_absolute_path

    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN and lightning_command is not None:
        command, cwd = lightning_command(local_rank)
        return list(command), cwd
    import __main__

    spec = getattr(__main__, "__spec__", None)
    command = [sys.executable, "-m", spec.name] if spec else [sys.executable, to_absolute_path(sys.argv[0])]
    command.append(f"--config-name={hc.job.config_name}")
    sources = hc.runtime.config_sources
    command += [f"--config-dir={s.path}" for s in sources if s.provider == "command-line" and s.schema == "file"]
    command += list(hc.overrides.task)
    command += [o for o in hc.overrides.hydra if not o.lstrip("+~").split("=", 1)[0].startswith(_SWEEP_ONLY)]
    # run mode even where a config asks for a sweep (hparams_search sets hydra.mode=MULTIRUN)
    command += ["hydra.mode=RUN", f'hydra.run.dir="{hc.runtime.output_dir}"',
                f"hydra.job.name=train_ddp_process_{local_rank}", "hydra.output_subdir=null"]
    return command, get_original_cwd()


@contextmanager
def job_processes():
    """Run one Hydra job (of a run or a sweep) whose trainer may start DDP processes: they run this job
    alone (``child_command``), and at the end the job's process group and the DDP variables Lightning
    set are gone, so that the sweep's next job starts processes of its own. Nothing to do on one device.

    Lightning builds that command line in a private function, ``_hydra_subprocess_cmd``, replaced here
    for the job's duration; a Lightning without it keeps its own (a sweep's DDP processes would then
    each run the sweep)."""
    try:
        from lightning.pytorch.strategies.launchers import subprocess_script as launcher
    except ImportError:  # another Lightning layout: its own command line
        launcher = None
    lightning_command = getattr(launcher, "_hydra_subprocess_cmd", None)
    saved = {k: os.environ.get(k) for k in _DDP_ENV}
    had_group = dist.is_available() and dist.is_initialized()
    if lightning_command is not None:
        launcher._hydra_subprocess_cmd = lambda local_rank: child_command(local_rank, lightning_command)
    try:
        yield
    finally:
        if lightning_command is not None:
            launcher._hydra_subprocess_cmd = lightning_command
        if not had_group and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
