"""A CSV log that survives a crash and a resume: the report's loss curves read it back.

Lightning's ``CSVLogger`` deletes an existing ``metrics.csv`` when it starts and writes rows every
100 steps, so a run killed and resumed in the same directory loses the history before the crash.
This one writes every row as it is logged, and on resume keeps the rows logged before the
checkpoint's step (the epochs after it are trained, and logged, again).
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment


class ResumableCSVLogger(CSVLogger):
    def __init__(self, *args, resume_from: str | None = None, flush_logs_every_n_steps: int = 1, **kwargs) -> None:
        super().__init__(*args, flush_logs_every_n_steps=flush_logs_every_n_steps, **kwargs)
        self.resume_from = resume_from

    @property
    @rank_zero_experiment
    def experiment(self):
        if self._experiment is None:
            kept = self._rows_before_checkpoint()
            writer = super().experiment  # starts a fresh metrics.csv
            writer.metrics[:0] = kept
        return self._experiment

    def _rows_before_checkpoint(self) -> list[dict[str, str]]:
        path = Path(self.log_dir) / "metrics.csv"
        if not self.resume_from or not path.is_file():
            return []
        step = torch.load(self.resume_from, map_location="cpu", weights_only=True, mmap=True)["global_step"]
        with path.open(newline="") as f:
            return [{k: v for k, v in row.items() if v != ""} for row in csv.DictReader(f) if int(row["step"]) < step]
