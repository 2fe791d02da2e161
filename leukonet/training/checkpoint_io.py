"""Checkpoints that a crash cannot corrupt: written beside their final name, then renamed.

Lightning writes a checkpoint straight to its path; a process killed mid-write (pre-emption,
``kill -9``) leaves a truncated ``last.ckpt``, and the run can no longer resume. A rename within a
directory is atomic, so here the file at the path is always a whole checkpoint: the new one or the
one before it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from lightning.pytorch.plugins import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        partial = path.with_name(path.name + ".partial")
        super().save_checkpoint(checkpoint, partial, storage_options)
        with open(partial, "rb") as f:  # on disk before it takes the name
            os.fsync(f.fileno())
        os.replace(partial, path)


def update_checkpoints(paths: Sequence[str | Path], edit: Callable[[dict[str, Any]], None],
                       checkpoint_io: TorchCheckpointIO) -> list[str]:
    """Load each existing checkpoint of ``paths`` once (tensors only), let ``edit`` change it in place, and
    save it back through ``checkpoint_io`` (the trainer's: atomic). Returns the paths written."""
    written = []
    for path in dict.fromkeys(str(p) for p in paths if p):
        if not Path(path).is_file():
            continue
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        edit(ckpt)
        checkpoint_io.save_checkpoint(ckpt, path)
        written.append(path)
    return written
