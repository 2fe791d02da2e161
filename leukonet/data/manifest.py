"""Manifests: one CSV that lists every image of a dataset, whatever layout it came in.

Columns ``path,label`` and optionally ``source`` (where the row came from) and ``split``
(``train``/``val``/``test``, when the source defines one). Paths are relative to the manifest's
folder, or absolute. ``python -m leukonet.data.prepare`` writes them; ``data.manifest=...`` reads them.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path

from leukonet.classes import CLASSES, canonical_class
from leukonet.data.folder import Entry
from leukonet.data.split import SPLITS
from leukonet.errors import DataError

COLUMNS = ("path", "label", "source", "split")


def write_manifest(rows: Iterable[dict[str, str]], out: str | Path) -> int:
    """Write rows (keys from COLUMNS) sorted by split, label and path; return how many."""
    rows = sorted(rows, key=lambda r: (r.get("split") or "", r["label"], r["path"]))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n", extrasaction="raise")
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c) or "" for c in COLUMNS})
    return len(rows)


def read_manifest(path: str | Path) -> tuple[list[Entry], dict[str, list[Entry]] | None]:
    """Entries (paths relative to the manifest's folder) and, if every row names one, the split."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"manifest {path} does not exist")
    entries, split_of = [], {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"path", "label"} <= set(reader.fieldnames):
            raise DataError(f"{path}: expected a header with at least path,label; got {reader.fieldnames}")
        for line, row in enumerate(reader, start=2):
            cls = canonical_class(row["label"] or "")
            split = (row.get("split") or "").strip()
            if cls is None or not row["path"]:
                raise DataError(f"{path}:{line}: needs a path and a label naming one of {CLASSES}, got {row}")
            if split and split not in SPLITS:
                raise DataError(f"{path}:{line}: split must be one of {SPLITS} or empty, got {split!r}")
            entry = Entry(row["path"], CLASSES.index(cls))
            entries.append(entry)
            split_of[entry.path] = split
    if entries and all(split_of.values()):
        return entries, {s: [e for e in entries if split_of[e.path] == s] for s in SPLITS}
    return entries, None
