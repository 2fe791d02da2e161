"""``python -m module args`` in a process forked from a server that has already imported leukonet, torch and
Lightning (``multiprocessing``'s forkserver): each call still runs in a fresh process, as on the command line,
without paying the 8-10 s of imports again (on 2 cores most of a tiny test run's time: the predict, train-evaluate
and domains tests took 98 s instead of 144 with 2 workers). The server never runs a torch operation, so its children
start with no OpenMP threads to inherit (a child forked from a process that has used them hangs at its first
operation). Where there is no forkserver (Windows), a plain subprocess."""

from __future__ import annotations

import io
import logging
import multiprocessing
import os
import runpy
import subprocess
import sys
import tempfile
from pathlib import Path

# what the commands import, not the commands themselves (runpy would find them imported, and warn)
PRELOAD = ["hydra", "lightning", "timm", "albumentations", "matplotlib.pyplot", "leukonet.training.model",
           "leukonet.training.finetune", "leukonet.data.transforms", "leukonet.inference.report", "leukonet.inference.ood"]
_context = multiprocessing.get_context("forkserver") if "forkserver" in multiprocessing.get_all_start_methods() else None
if _context is not None:
    _context.set_forkserver_preload(PRELOAD)


def _main(module: str, args: list[str], cwd: str, env: dict[str, str], out: str, err: str) -> None:
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, out), (2, err)):
        with open(path, "wb") as f:
            os.dup2(f.fileno(), fd)
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True)
    sys.argv = [module, *args]
    # as `python -m` orders them: the working directory, then $PYTHONPATH's entries (the server was started without)
    sys.path[:0] = [cwd, *(p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p)]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        logging.shutdown()


def run(module: str, *args: str, cwd: Path, timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Like ``subprocess.run([python, -m, module, *args], cwd=cwd, env=env, capture_output=True, text=True,
    timeout=timeout)``; ``env`` None: this process's environment."""
    env = dict(os.environ if env is None else env)
    if _context is None:
        return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout)
    with tempfile.TemporaryDirectory() as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        child = _context.Process(target=_main, args=(module, list(args), str(cwd), env, str(out), str(err)))
        child.start()
        child.join(timeout)
        if child.exitcode is None:
            child.kill()
            child.join()
            raise subprocess.TimeoutExpired([module, *args], timeout)
        read = lambda p: p.read_text(errors="replace") if p.exists() else ""  # noqa: E731
        return subprocess.CompletedProcess([sys.executable, "-m", module, *args], child.exitcode, read(out), read(err))
