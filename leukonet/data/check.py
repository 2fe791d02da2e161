"""Integrity checks for a cell dataset: unreadable files, conversions, odd sizes, duplicates, leakage.

Why: none of these shows in a loss curve. A cell that sits in both train and test (the same file
copied, or the same image re-encoded or resized) inflates every test number; the same cell under two
labels is a labelling error the model is punished for; a file that needed a conversion or has an
odd size is worth a look before it is trusted. So they are counted before training, not guessed at.

    python -m leukonet.data.check ROOT_OR_MANIFEST [--split-file split.csv] [--json FILE] [--strict]

ROOT_OR_MANIFEST is a class-per-folder tree or a manifest CSV (its ``split`` column, if complete,
is the split; ``--split-file`` overrides it and, as in training, then lists the files to check).
Prints rich tables; ``--json`` writes the report of :func:`run_checks`; ``--strict`` exits 1 on
leakage (a duplicate group spanning splits) or a label conflict (one spanning classes). A bad
input exits 2 with ``error: ...``. Training start-up calls :func:`leakage`.

Duplicates: *exact* groups share the SHA-256 of their bytes; *near* groups link distinct files
whose 64-bit perceptual hashes (pHash) differ in at most NEAR_DISTANCE bits, chained into
connected components. Each file is read once and decoded once, by ``load_rgb`` at DECODE_SIZE
(a JPEG over twice that at a reduced DCT scale), in a thread pool.

Speed: pbc-2500 (2,500 JPEGs of 360x363 px, with a 70/15/15 split.csv), 2 CPU cores shared with a
training job: the checks take 4.2 s (6.1 s for the command, the rest is importing torch through the
``leukonet`` package); ``leakage`` 4.1 s, or 0.1 s with ``near=False``. Comparing all pairs of
20,000 pHashes takes 2.3 s.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import imagehash
import numpy as np
from PIL import Image
from rich.console import Console
from rich.table import Table
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from leukonet.classes import CLASSES
from leukonet.data.folder import Entry, load_rgb, scan_folder
from leukonet.data.manifest import read_manifest
from leukonet.data.split import SPLITS, read_split
from leukonet.errors import exit_on_user_error

# Max differing pHash bits (of 64) in a near duplicate. On PBC cells a JPEG re-encode (quality 40-70),
# a PNG copy or a resize (224 px to 2x) changes <= 2 bits, +10 % brightness <= 4; the two closest
# distinct cells of pbc-2500 differ by 6, the next by 8.
NEAR_DISTANCE = 4
DECODE_SIZE = 256  # px decoded for hashing: bounds the cost of big images; smaller makes pHash decoder-dependent
OUTLIER_FACTOR = 3.0  # a side below median / factor or above median * factor is an outlier
MAX_ASPECT = 2.0  # long side / short side beyond this is an outlier (cells are roughly round)
_BLOCK = 512  # rows of the pairwise pHash comparison done at a time (512 x N float32)
_TABLE_ROWS = 20  # rows printed per table; the JSON report has them all


@dataclass
class _Fingerprint:
    """What one file contributes to the checks."""

    sha256: str | None = None
    phash: np.ndarray | None = None  # 64 bools
    size: tuple[int, int] | None = None
    notes: list[str] = field(default_factory=list)
    error: str | None = None


def _fingerprint(path: Path, decode: bool) -> _Fingerprint:
    """Read ``path`` once; hash its bytes and, if ``decode``, decode it for pHash, size and notes."""
    try:
        data = path.read_bytes()
    except OSError:
        data = None  # load_rgb words the error from the path
    fp = _Fingerprint(sha256=hashlib.sha256(data).hexdigest() if data else None)
    if not decode:
        return fp
    try:
        pixels = load_rgb(path, DECODE_SIZE, fp.notes, data=data)
    except ValueError as err:
        fp.error = str(err).removeprefix(f"{path}: ")
        return fp
    with Image.open(io.BytesIO(data)) as im:  # header only: the size before load_rgb's resize
        fp.size = im.size
    fp.phash = imagehash.phash(Image.fromarray(pixels)).hash.ravel()
    return fp


def _fingerprints(root: Path, entries: Sequence[Entry], decode: bool) -> list[_Fingerprint]:
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        return list(pool.map(lambda e: _fingerprint(root / e.path, decode), entries))


def _near_pairs(bits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Index pairs i < j of hashes (rows of ``bits``) at most NEAR_DISTANCE bits apart, and their distances."""
    signs = np.where(bits, 1.0, -1.0).astype(np.float32)
    nbits, found = bits.shape[1], []
    for start in range(0, len(signs), _BLOCK):
        # Hamming distance of +-1 vectors is (nbits - dot) / 2: all pairs, by blocks of rows, at BLAS speed
        dot = signs[start : start + _BLOCK] @ signs.T
        i, j = np.nonzero(dot >= nbits - 2 * NEAR_DISTANCE - 0.5)
        keep = j > i + start
        i, j = i[keep], j[keep]
        found.append((i + start, j, np.rint((nbits - dot[i, j]) / 2).astype(int)))
    return tuple(np.concatenate(parts) for parts in zip(*found))


def _group(kind: str, members: list[int], entries: Sequence[Entry], split_of: dict[str, str]) -> dict[str, Any]:
    members = sorted(members, key=lambda i: entries[i].path)
    paths = [entries[i].path for i in members]
    classes = [CLASSES[entries[i].label] for i in members]
    splits = [split_of.get(p) for p in paths]
    if len({s for s in splits if s}) > 1:
        scope = "across_splits"
    elif len(set(classes)) > 1:
        scope = "across_classes"
    else:
        scope = "within_class"
    return {"kind": kind, "scope": scope, "paths": paths, "classes": classes, "splits": splits}


def _duplicates(
    entries: Sequence[Entry], prints: Sequence[_Fingerprint], split_of: dict[str, str]
) -> dict[str, list[dict[str, Any]]]:
    """Exact groups (same bytes) and near groups (distinct bytes, close pHash), in path order."""
    by_sha: dict[str, list[int]] = defaultdict(list)
    for i, fp in enumerate(prints):
        if fp.sha256 and fp.error is None:  # an undecodable file is skipped by training: no leak
            by_sha[fp.sha256].append(i)
    exact = [_group("exact", m, entries, split_of) for m in by_sha.values() if len(m) > 1]
    # near duplicates among distinct contents; each content stands for all its exact copies
    shas = [s for s, m in by_sha.items() if prints[m[0]].phash is not None]
    near = []
    if len(shas) > 1:
        i, j, dist = _near_pairs(np.stack([prints[by_sha[s][0]].phash for s in shas]))
        n = len(shas)
        _, component = connected_components(coo_matrix((np.ones(len(i)), (i, j)), shape=(n, n)), directed=False)
        for c in np.unique(component[i]):
            members = [by_sha[shas[k]] for k in np.flatnonzero(component == c)]
            group = _group("near", [m for copies in members for m in copies], entries, split_of)
            near.append({**group, "distance": int(dist[component[i] == c].max())})
    return {"exact": sorted(exact, key=lambda g: g["paths"]), "near": sorted(near, key=lambda g: g["paths"])}


def _split_of(splits: dict[str, list[Entry]] | None) -> dict[str, str]:
    return {e.path: s for s in SPLITS for e in (splits or {}).get(s, [])}


def duplicate_groups(root: Path, entries: Sequence[Entry], near: bool = True) -> list[list[str]]:
    """Paths that show the same picture: exact copies, and near copies when ``near``.
    A split keeps each group on one side, so no cell is both trained on and tested on."""
    found = _duplicates(entries, _fingerprints(Path(root), entries, decode=near), {})
    groups, seen = [], set()
    for g in found["near"] + found["exact"]:  # a near group already holds its members' exact copies
        if not seen.intersection(g["paths"]):
            groups.append(g["paths"])
            seen.update(g["paths"])
    return groups


def leakage(root: Path, splits: dict[str, list[Entry]], near: bool = True) -> list[dict[str, Any]]:
    """Duplicate groups (``kind`` exact|near, ``paths``, ``classes``, ``splits``) that span more than one split.

    Reads each file once; with ``near=False`` only hashes its bytes, without decoding. Files that
    cannot be read or decoded are left out, as training skips them (without decoding: unread ones).
    """
    entries = [e for s in SPLITS for e in splits.get(s, [])]
    split_of = _split_of(splits)
    groups = _duplicates(entries, _fingerprints(Path(root), entries, decode=near), split_of)
    return [g for kind in ("exact", "near") for g in groups[kind] if g["scope"] == "across_splits"]


def _size_outliers(sizes: dict[str, tuple[int, int]]) -> tuple[list[dict[str, Any]], list[float]]:
    """Files with a side beyond OUTLIER_FACTOR x the dataset's median side, or aspect > MAX_ASPECT."""
    if not sizes:
        return [], []
    median = np.median(np.array(list(sizes.values()), dtype=np.float64), axis=0)
    out = []
    for path, (w, h) in sizes.items():
        why = [
            f"{name} {side} px < 1/{OUTLIER_FACTOR:g} x median {ref:g}" if side < ref
            else f"{name} {side} px > {OUTLIER_FACTOR:g} x median {ref:g}"
            for name, side, ref in (("width", w, median[0]), ("height", h, median[1]))
            if not ref / OUTLIER_FACTOR <= side <= ref * OUTLIER_FACTOR
        ]
        if max(w, h) / min(w, h) > MAX_ASPECT:
            why.append(f"aspect ratio {max(w, h) / min(w, h):.2f} > {MAX_ASPECT:g}")
        if why:
            out.append({"path": path, "width": w, "height": h, "why": "; ".join(why)})
    return out, median.tolist()


def run_checks(root: Path, entries: Sequence[Entry], splits: dict[str, list[Entry]] | None = None) -> dict[str, Any]:
    """The full report on ``entries`` (paths relative to ``root``), split-aware when ``splits`` is given.

    Keys: ``counts`` (readable images per class, for ``all`` and each split), ``unreadable``
    (path, reason), ``converted`` (path, why), ``size_outliers`` (path, width, height, why) with
    ``median_size``, ``duplicates`` (``exact`` and ``near`` groups: kind, scope, paths, classes,
    splits, and distance for near), ``leakage`` and ``label_conflicts`` (how many groups span
    splits, and classes: a group may count in both), and the thresholds used.
    """
    root = Path(root)
    prints = _fingerprints(root, entries, decode=True)
    split_of = _split_of(splits)
    readable = [(e, fp) for e, fp in zip(entries, prints) if fp.error is None]
    counts = {"all": Counter(CLASSES[e.label] for e, _ in readable)}
    if splits is not None:
        counts |= {s: Counter(CLASSES[e.label] for e, _ in readable if split_of.get(e.path) == s) for s in SPLITS}
    outliers, median = _size_outliers({e.path: fp.size for e, fp in readable})
    duplicates = _duplicates(entries, prints, split_of)
    groups = duplicates["exact"] + duplicates["near"]
    return {
        "root": str(root),
        "files": len(entries),
        "readable": len(readable),
        "counts": {s: {c: n.get(c, 0) for c in CLASSES} for s, n in counts.items()},
        "unreadable": [{"path": e.path, "reason": fp.error} for e, fp in zip(entries, prints) if fp.error],
        "converted": [{"path": e.path, "why": "; ".join(fp.notes)} for e, fp in readable if fp.notes],
        "size_outliers": outliers,
        "median_size": median,
        "duplicates": duplicates,
        "leakage": sum(len({s for s in g["splits"] if s}) > 1 for g in groups),
        "label_conflicts": sum(len(set(g["classes"])) > 1 for g in groups),
        "thresholds": {"near_distance": NEAR_DISTANCE, "outlier_factor": OUTLIER_FACTOR, "max_aspect": MAX_ASPECT},
    }


def _inputs(target: Path, split_file: Path | None) -> tuple[Path, list[Entry], dict[str, list[Entry]] | None, dict]:
    """Root, entries, split and scan notes for a folder or manifest, as training would read them."""
    if target.is_file():
        root, notes = target.parent, {}
        entries, splits = read_manifest(target)
    else:
        scan = scan_folder(target)
        root, entries, splits = target, scan.entries, None
        notes = {"unknown_folders": scan.unknown_folders, "ignored_files": scan.ignored_files}
    if split_file is not None:
        splits = read_split(split_file)
        entries = [e for s in SPLITS for e in splits[s]]
    return root, entries, splits, notes


def _table(title: str, columns: Sequence[str], rows: list[Sequence[Any]]) -> Table:
    table = Table(title=f"{title} ({len(rows)})", title_justify="left")
    for c in columns:
        table.add_column(c, overflow="fold")
    for row in rows[:_TABLE_ROWS]:
        table.add_row(*(str(v) for v in row))
    if len(rows) > _TABLE_ROWS:
        table.caption = f"{len(rows) - _TABLE_ROWS} more in the JSON report"
    return table


def _print(report: dict[str, Any], console: Console) -> None:
    counts = Table(title="Readable images per class", title_justify="left")
    counts.add_column("class")
    for s in report["counts"]:
        counts.add_column(s, justify="right")
    for c in CLASSES:
        counts.add_row(c, *(str(report["counts"][s][c]) for s in report["counts"]))
    counts.add_row("total", *(str(sum(n.values())) for n in report["counts"].values()), style="bold")
    console.print(counts)
    for key in ("unknown_folders", "ignored_files"):
        if report.get(key):
            console.print(f"[yellow]{key.replace('_', ' ')}:[/yellow] {report[key]}")
    sections = [
        ("Unreadable", ("path", "reason"), [(u["path"], u["reason"]) for u in report["unreadable"]]),
        ("Converted", ("path", "why"), [(c["path"], c["why"]) for c in report["converted"]]),
        (
            f"Size outliers (median {' x '.join(f'{m:g}' for m in report['median_size'])} px)",
            ("path", "size", "why"),
            [(o["path"], f"{o['width']}x{o['height']}", o["why"]) for o in report["size_outliers"]],
        ),
        (
            "Duplicate groups",
            ("kind", "scope", "files (class, split)"),
            [
                (
                    g["kind"] + (f" (d={g['distance']})" if "distance" in g else ""),
                    g["scope"],
                    "\n".join(
                        f"{p} ({c}{', ' + s if s else ''})" for p, c, s in zip(g["paths"], g["classes"], g["splits"])
                    ),
                )
                for kind in ("exact", "near")
                for g in report["duplicates"][kind]
            ],
        ),
    ]
    for title, columns, rows in sections:
        if rows:
            console.print(_table(title, columns, rows))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the checks from the command line; the exit status (0, or 1 for --strict failures)."""
    parser = argparse.ArgumentParser(prog="python -m leukonet.data.check", description=__doc__.splitlines()[0])
    parser.add_argument("target", type=Path, metavar="ROOT_OR_MANIFEST", help="class-per-folder tree or manifest CSV")
    parser.add_argument("--split-file", type=Path, help="split.csv (path,label,split) to check for leakage")
    parser.add_argument("--json", type=Path, help="write the full report here")
    parser.add_argument("--strict", action="store_true", help="exit 1 on leakage or a label conflict")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    root, entries, splits, notes = _inputs(args.target, args.split_file)
    report = {**run_checks(root, entries, splits), **notes}
    console = Console()
    _print(report, console)
    dup = report["duplicates"]
    console.print(
        f"{report['root']}: {report['files']} files checked in {time.perf_counter() - start:.1f} s: "
        f"{len(report['unreadable'])} unreadable, {len(report['converted'])} converted, "
        f"{len(report['size_outliers'])} size outliers, {len(dup['exact'])} exact and {len(dup['near'])} near "
        f"duplicate groups; leakage: {report['leakage']} groups, label conflicts: {report['label_conflicts']} groups"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    failed = args.strict and (report["leakage"] or report["label_conflicts"])
    if failed:
        console.print("[red]--strict: leakage or label conflicts found[/red]")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(exit_on_user_error(main))
