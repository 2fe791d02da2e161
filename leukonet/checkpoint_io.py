"""Checkpoints that a crash cannot corrupt: written beside their final name, then renamed.

Lightning writes a checkpoint straight to its path; a process killed mid-write (pre-emption,
``kill -9``) leaves a truncated ``last.ckpt``, and the run can no longer resume. A rename within a
directory is atomic, so here the file at the path is always a whole checkpoint: the new one or the
one before it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning.pytorch.plugins import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        partial = path.with_name(path.name + ".partial")
        super().save_checkpoint(checkpoint, partial, storage_options)
        with open(partial, "rb") as f:  # on disk before it takes the name
            os.fsync(f.fileno())
        os.replace(partial, path)
