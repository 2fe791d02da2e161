"""What a result was measured on and how to get it again: the machine and the exact command."""

from __future__ import annotations

import os
import platform
import shlex
import sys
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig

from leukonet.resolvers import best_precision


def machine() -> str:
    """CPU model, cores, memory and accelerator, in one line."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        mem = f", {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM"
    except (ValueError, OSError, AttributeError):
        mem = ""
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    # precision: CPUs with and without bf16 differ several times in training speed
    return (f"{cpu}, {os.cpu_count()} cores{mem}{gpu}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"precision {best_precision()}")


def command(module: str) -> str:
    """The command line that reproduces this Hydra run."""
    try:
        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:  # not inside a Hydra run
        overrides = sys.argv[1:]
    return shlex.join(["python", "-m", module, *overrides])


def portable_path(path: str | Path) -> str:
    """A path as results should record it, free of this machine's layout: relative to the working
    directory (the repository) when inside it, from ``site-packages`` on for installed files, from ``~``
    for the home directory (caches), else as given."""
    path = Path(path)
    resolved = path.resolve()
    if "site-packages" in resolved.parts:
        return "/".join(resolved.parts[resolved.parts.index("site-packages") + 1 :])
    for base, prefix in ((Path.cwd(), ""), (Path.home(), "~/")):
        try:
            return prefix + resolved.relative_to(base.resolve()).as_posix()
        except ValueError:
            continue
    return str(path)


def portable_text(text: str, repo: str | Path | None = None) -> str:
    """``text`` (a results file, commands and all) with this machine's checkout layout taken out: paths in the
    repository become relative to it, paths beside it (``../shared/data``) relative to it too."""
    repo = Path(repo or Path.cwd()).resolve()
    return text.replace(f"{repo}/", "").replace(f"{repo.parent}/", "../")
