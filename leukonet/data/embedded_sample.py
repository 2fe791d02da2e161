"""The embedded sample: 100 real PBC cells a class, shipped inside the package.

A fresh clone (or ``pip install``) then trains, predicts and serves on blood cells, not drawings, as
scikit-learn and torchvision ship small datasets. The cells are drawn with a fixed seed from the
2,500-cell PBC subset (Acevedo et al. 2020, CC BY 4.0: ``sample/README.md`` cites it), one per group
of duplicate pictures, and stored as the data module decodes them (224 px, bilinear) in JPEG.

Rebuild it byte for byte (same Pillow) from that folder, or check the shipped copy against it::

    python -m leukonet.data.embedded_sample PBC_DIR --out DIR     # writes DIR (must not exist)
    python -m leukonet.data.embedded_sample PBC_DIR --check       # compares with leukonet/data/sample
"""

from __future__ import annotations

import argparse
import filecmp
import io
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from leukonet.classes import CLASSES
from leukonet.data.check import duplicate_groups
from leukonet.data.citations import PBC
from leukonet.data.folder import Entry, load_rgb, scan_folder
from leukonet.errors import DataError

ROOT = Path(__file__).resolve().parent / "sample"
NAME = "pbc-sample"
PER_CLASS, SEED, SIZE, QUALITY = 100, 42, 224, 85

README = f"""# The embedded sample: 100 real PBC cells a class

{PER_CLASS} cells of each class ({", ".join(CLASSES)}), drawn with seed {SEED} from the 2,500-cell PBC
subset (one file per group of duplicate pictures, unreadable files left out), resized to {SIZE} x {SIZE} px
as leukonet decodes images (bilinear) and stored as JPEG (quality {QUALITY}). File names are the PBC
originals. `make run` trains on these cells when no `data.root` is given.

Source and licence (CC BY 4.0; cite it wherever results on these cells appear):
{PBC}

Changes made: resized from 360 x 363 px (some 366 x 369) to {SIZE} x {SIZE} px and re-encoded as JPEG.

Rebuild byte for byte from the 2,500-cell folder (same Pillow version):
`python -m leukonet.data.embedded_sample PBC_DIR --out DIR`, or compare with this copy:
`python -m leukonet.data.embedded_sample PBC_DIR --check`.
"""


def is_sample(root: str | Path) -> bool:
    return Path(root).resolve() == ROOT


def root() -> str:
    """The shipped sample's folder (the default ``data.root``)."""
    return str(ROOT)


def draw(pbc_root: Path, per_class: int = PER_CLASS, seed: int = SEED) -> list[tuple[Entry, np.ndarray]]:
    """The drawn cells as (entry, decoded RGB at SIZE px), sorted by path."""
    entries = scan_folder(pbc_root).entries
    pixels = {}
    for e in entries:
        try:
            pixels[e.path] = load_rgb(pbc_root / e.path, SIZE)
        except ValueError:
            continue  # e.g. PBC's macOS metadata file named .jpg
    readable = [e for e in entries if e.path in pixels]
    drop = {p for group in duplicate_groups(pbc_root, readable, near=True) for p in sorted(group)[1:]}
    rng = np.random.default_rng(seed)
    drawn = []
    for label, name in enumerate(CLASSES):
        pool = sorted((e for e in readable if e.label == label and e.path not in drop), key=lambda e: e.path)
        if len(pool) < per_class:
            raise DataError(f"{pbc_root}: {len(pool)} distinct readable {name} images, {per_class} needed")
        drawn += [pool[i] for i in sorted(rng.choice(len(pool), per_class, replace=False))]
    return [(e, pixels[e.path]) for e in drawn]


def encode(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=QUALITY)
    return buffer.getvalue()


def build(pbc_root: str | Path, out: str | Path) -> Path:
    """Write the sample into ``out`` (which must not exist): in a temporary folder first, renamed when complete."""
    pbc_root, out = Path(pbc_root), Path(out)
    if out.exists():
        raise DataError(f"{out} already exists; the sample is written only into a new folder")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent if out.parent.is_dir() else None))
    try:
        for entry, rgb in draw(pbc_root):
            target = tmp / CLASSES[entry.label] / Path(entry.path).name
            target.parent.mkdir(exist_ok=True)
            target.write_bytes(encode(rgb))
        (tmp / "README.md").write_text(README, encoding="utf-8")
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(tmp), out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def differences(a: Path, b: Path) -> list[str]:
    """Files that differ between two sample folders, or stand in only one (relative paths)."""
    files = {p.relative_to(d).as_posix() for d in (a, b) for p in d.rglob("*") if p.is_file()}
    return sorted(f for f in files if not ((a / f).is_file() and (b / f).is_file() and filecmp.cmp(a / f, b / f, shallow=False)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pbc", type=Path, help="the 2,500-cell PBC folder (<class>/*.jpg)")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--out", type=Path, help="a new folder to write the sample into")
    group.add_argument("--check", action="store_true", help=f"rebuild in a temporary folder and compare with {ROOT}")
    args = parser.parse_args(argv)
    try:
        if args.out:
            build(args.pbc, args.out)
            print(f"wrote {args.out}")
            return 0
        with tempfile.TemporaryDirectory() as tmp:
            diff = differences(build(args.pbc, Path(tmp) / "sample"), ROOT)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if diff:
        print(f"{len(diff)} file(s) differ from {ROOT}: {diff[:10]}", file=sys.stderr)
        return 1
    print(f"{ROOT} is identical to a rebuild from {args.pbc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
