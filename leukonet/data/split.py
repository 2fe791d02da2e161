"""Stratified train/val/test split, written to and read back from ``split.csv``.

Every experiment that compares numbers must see the same partitions, so the split is a file:
written once per run, byte-identical for the same data and seed, and reusable with
``data.split_file=...``.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from leukonet.classes import CLASSES
from leukonet.data.folder import Entry
from leukonet.errors import DataError

SPLITS = ("train", "val", "test")


def stratified_split(
    entries: Sequence[Entry],
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 42,
    groups: Sequence[Sequence[str]] = (),
) -> dict[str, list[Entry]]:
    """Split each class on its own so every split keeps the class proportions.

    Per class of n images: round(n * val) go to val, round(n * test) to test, the rest to train
    (500 cells give 350/75/75). The units shuffled are the images, except that each of ``groups``
    (paths of duplicate images) moves as one unit, so copies never straddle two splits. The order
    within a class is the sorted paths, shuffled by a generator seeded with (seed, class index),
    so adding a class never reshuffles another.
    """
    if len(fractions) != 3 or abs(sum(fractions) - 1) > 1e-6 or min(fractions) < 0:
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    group_of = {p: min(g) for g in groups for p in g}
    out: dict[str, list[Entry]] = {s: [] for s in SPLITS}
    for label in range(len(CLASSES)):
        units: dict[str, list[Entry]] = {}
        for e in sorted((e for e in entries if e.label == label), key=lambda e: e.path):
            units.setdefault(group_of.get(e.path, e.path), []).append(e)
        if not units:
            continue
        n = sum(map(len, units.values()))
        targets = {"val": round(n * fractions[1]), "test": round(n * fractions[2])}
        ordered = list(units.values())
        filled = {"val": 0, "test": 0}
        for i in np.random.default_rng([seed, label]).permutation(len(ordered)):
            split = next((s for s in ("val", "test") if filled[s] < targets[s]), "train")
            if split != "train":
                filled[split] += len(ordered[i])
            out[split] += ordered[i]
    for s in SPLITS:
        out[s].sort(key=lambda e: (e.label, e.path))
    return out


def write_split(splits: dict[str, list[Entry]], path: str | Path) -> None:
    """Write ``path,label,split`` rows, sorted, with Unix newlines (byte-identical across runs)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["path", "label", "split"])
        for s in SPLITS:
            for e in splits[s]:
                w.writerow([e.path, CLASSES[e.label], s])


def read_split(path: str | Path) -> dict[str, list[Entry]]:
    """Read a ``split.csv``; a bad row raises an error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"split file {path} does not exist")
    out: dict[str, list[Entry]] = {s: [] for s in SPLITS}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"path", "label", "split"} <= set(reader.fieldnames):
            raise DataError(f"{path}: expected a header with columns path,label,split, got {reader.fieldnames}")
        for line, row in enumerate(reader, start=2):
            if row["label"] not in CLASSES or row["split"] not in SPLITS:
                raise DataError(
                    f"{path}:{line}: label must be one of {CLASSES} and split one of {SPLITS}, "
                    f"got label={row['label']!r} split={row['split']!r}"
                )
            out[row["split"]].append(Entry(row["path"], CLASSES.index(row["label"])))
    seen: dict[str, str] = {}
    for s in SPLITS:
        for e in out[s]:
            if e.path in seen:
                raise DataError(f"{path}: {e.path} appears in both {seen[e.path]} and {s}")
            seen[e.path] = s
    return out
