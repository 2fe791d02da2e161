"""``python -m leukonet.station.export out=labels.csv [case=ID]``: the station's reviewed cells as a manifest
(``path,label,source``) that ``leukonet.adapt target.labels=`` and ``leukonet.train data.manifest=`` read. The
database is only read; ``out`` is never overwritten and appears whole or not at all."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import hydra
from omegaconf import DictConfig

from leukonet.errors import DataError, RunExistsError, exit_on_user_error
from leukonet.station.db import Case, open_database
from leukonet.station.exports import manifest_csv, manifest_rows
from leukonet.station.storage import ImageStore
from leukonet.train import CONF


def export(cfg: DictConfig) -> Path:
    out = Path(str(cfg.out))
    if out.exists():
        raise RunExistsError(f"{out} exists; choose another out=...")
    sessions = open_database(str(cfg.db_url), create=False)
    case = None if cfg.case is None else int(cfg.case)
    if case is not None:
        with sessions() as s:
            if s.get(Case, case) is None:
                raise DataError(f"case={case}: no such case in {cfg.db_url}")
    rows = manifest_rows(sessions, ImageStore(Path(str(cfg.station_dir)) / "images"), case, bool(cfg.unreviewed))
    if not rows:
        raise DataError(f"no {'cells' if cfg.unreviewed else 'reviewed cells'} to export"
                        f"{'' if case is None else f' in case {case}'}")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
    with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
        f.write(manifest_csv(rows))
    os.replace(tmp, out)
    print(f"{len(rows)} cells -> {out}")
    return out


@hydra.main(version_base="1.3", config_path=CONF, config_name="station_export")
def main(cfg: DictConfig) -> None:
    exit_on_user_error(lambda: export(cfg))


if __name__ == "__main__":
    main()
