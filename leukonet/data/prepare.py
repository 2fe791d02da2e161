"""Turn a downloaded leukocyte dataset, in whatever layout it ships, into one manifest CSV.

Public datasets come as class-per-folder trees, zips with macOS junk, label tables of numbered
images, or NumPy archives. Training reads one format only (``data.manifest=...``), so this
command converts each layout once, maps the labels onto our five classes, keeps the source's
split when it has one, and reports every file or row it leaves out, with the reason::

    python -m leukonet.data.prepare FORMAT SOURCE --out MANIFEST.csv [options]

Each format is a small function returning ``(rows, left_out)``: rows with absolute paths,
and counts of what was left out keyed by reason. ``write`` makes the paths relative to the
manifest's folder. The source is only read; images that must be materialised (zip members,
NumPy arrays, crops) go to a folder named on the command line.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import re
import string
import warnings
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image
from rich.console import Console
from rich.table import Table

from leukonet.classes import CLASSES, canonical_class
from leukonet.data.folder import IMAGE_EXTENSIONS, scan_folder
from leukonet.data.manifest import write_manifest
from leukonet.data.split import SPLITS
from leukonet.errors import DataError, exit_on_user_error

Row = dict[str, str]

# The eight PBC folders; BloodMNIST (PBC downscaled) numbers its labels 0-7 in this order.
PBC_CLASSES = ("basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet")
BCCD_PATTERN = "BloodImage_{id:05d}.jpg"
ID_COLUMNS = ("image", "image id", "id", "image_id")
LABEL_COLUMNS = ("category", "class label", "label", "class")


class LeftOut(Counter[str]):
    """How many files or rows were left out, by reason, with a few examples of each."""

    def __init__(self) -> None:
        super().__init__()
        self.examples: dict[str, list[str]] = {}

    def add(self, reason: str, example: str | None = None, n: int = 1) -> None:
        self[reason] += n
        if example is not None and len(shown := self.examples.setdefault(reason, [])) < 3:
            shown.append(example)


def _not_ours(name: str) -> str:
    return f"{name}: not one of our five classes"


def _is_image(file: str | Path | IO[bytes]) -> bool:
    """Whether PIL recognises an image there (reads the header only)."""
    try:
        with Image.open(file):
            return True
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError):
        return False


def _image_problem(path: Path, seen: set[Path]) -> str | None:
    """Why a listed image cannot be used, or None when it can."""
    if path in seen:
        return "listed more than once"
    seen.add(path)
    if not path.is_file():
        return "image file not found"
    return None if _is_image(path) else "not a readable image"


def _row(path: Path, label: str, source: str, split: str | None = None) -> Row:
    return {"path": str(path.resolve()), "label": label, "source": source, "split": split or ""}


def _fresh_dir(path: Path, force: bool) -> None:
    """Refuse to write images into a non-empty folder unless forced."""
    if path.exists() and not path.is_dir():
        raise DataError(f"{path} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise DataError(f"{path} exists and is not empty; pass --force to write into it (same names are replaced)")


def _check_outside(path: Path, source: Path) -> None:
    """Refuse an output that is the source or lies inside it: the source is never modified."""
    path, source = path.resolve(), source.resolve()
    if path == source or (source.is_dir() and path.is_relative_to(source)):
        raise DataError(f"{path} is inside the source {source}, which is never modified; write it elsewhere")


# -- folder -------------------------------------------------------------------------------------
def from_folder(root: Path) -> tuple[list[Row], LeftOut]:
    """A class-per-folder tree, folder names matched by alias (``NEUT``, ``Lymphocytes``...)."""
    with warnings.catch_warnings():  # unknown folders are reported below, with their file counts
        warnings.simplefilter("ignore")
        scan = scan_folder(root)
    left = LeftOut()
    for name in scan.unknown_folders:
        left.add(_not_ours(f"folder {name}/"), n=sum(f.is_file() for f in (root / name).rglob("*")))
    for rel in scan.ignored_files:
        left.add("not an image file", rel)
    rows = []
    for e in scan.entries:
        if _is_image(root / e.path):
            rows.append(_row(root / e.path, CLASSES[e.label], f"{root.resolve().name}/{e.path}"))
        else:
            left.add("not a readable image", e.path)
    return rows, left


# -- csv and table: shared reading ----------------------------------------------------------------
def _read_table(file: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Header and (line number, row) pairs of a CSV file; unreadable files raise DataError."""
    if not file.is_file():
        raise DataError(f"{file} does not exist or is not a file")
    try:
        with open(file, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows = [(reader.line_num, row) for row in reader]
            return list(reader.fieldnames or []), rows
    except (UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{file}: not a readable UTF-8 CSV file ({err})") from err


def _column(fieldnames: list[str], wanted: Iterable[str]) -> str | None:
    """The first header that matches one of ``wanted``, ignoring case and surrounding spaces."""
    by_name = {f.strip().lower(): f for f in fieldnames}
    return next((by_name[w.lower()] for w in wanted if w.lower() in by_name), None)


def _number(value: str) -> int | str:
    """``"7"`` and ``"7.0"`` as 7, anything else unchanged (ids and codes written by pandas)."""
    try:
        return int(value)
    except ValueError:
        try:
            as_float = float(value)
        except ValueError:
            return value
        return int(as_float) if as_float.is_integer() else value


def _classify(value: str, codes: dict[str, str] | None = None) -> tuple[str | None, str]:
    """(class, "") for a usable label, else (None, why it is left out)."""
    value = value.strip()
    if not value:
        return None, "empty label"
    if len([part for part in re.split(r"[,;]", value) if part.strip()]) > 1:
        return None, "several labels"  # canonical_class would read "NEUTROPHIL, EOSINOPHIL" as neutrophil
    if codes is not None:
        cls = codes.get(str(_number(value)))
        return (cls, "") if cls else (None, f"label {value!r} not in --codes")
    cls = canonical_class(value)
    return (cls, "") if cls else (None, _not_ours(f"label {value!r}"))


# -- csv -------------------------------------------------------------------------------------------
def from_csv(file: Path) -> tuple[list[Row], LeftOut]:
    """A CSV with columns path,label (and optionally split); paths relative to the CSV's folder."""
    fieldnames, lines = _read_table(file)
    path_col, label_col = _column(fieldnames, ["path"]), _column(fieldnames, ["label"])
    if path_col is None or label_col is None:
        raise DataError(f"{file}: expected a header with columns path,label; found {fieldnames}")
    split_col = _column(fieldnames, ["split"])
    rows, left, seen = [], LeftOut(), set()
    for line, row in lines:
        raw = (row.get(path_col) or "").strip()
        cls, reason = _classify(row.get(label_col) or "")
        split = (row.get(split_col) or "").strip() if split_col else ""
        if split and split not in SPLITS:
            raise DataError(f"{file}:{line}: split must be one of {SPLITS} or empty, got {split!r}")
        if not raw:
            left.add("empty path", f"line {line}")
        elif cls is None:
            left.add(reason, raw)
        elif problem := _image_problem(file.parent / raw, seen):
            left.add(problem, raw)
        else:
            rows.append(_row(file.parent / raw, cls, f"{file.name}:{line}", split))
    return rows, left


# -- pbc -------------------------------------------------------------------------------------------
def _pbc_select(names: Iterable[str], source: Path, left: LeftOut) -> list[tuple[str, str, str]]:
    """(name, path from the class folders' parent, class) of each leukocyte image among ``names``.

    ``names`` are '/'-separated file paths inside the download. The class folders may sit at
    its top or up to two levels down (``PBC_dataset_normal_DIB/<class>/``, possibly nested).
    """
    parts: dict[str, tuple[str, ...]] = {}
    for name in names:
        p = tuple(name.split("/"))
        if p[0] == "__MACOSX":
            left.add("macOS metadata (__MACOSX/)", name)
        elif any(c.startswith(".") for c in p):
            left.add("hidden file (macOS metadata)", name)
        else:
            parts[name] = p
    roots = {p[:i] for p in parts.values() for i in range(min(3, len(p) - 1)) if p[i].lower() in PBC_CLASSES}
    if not roots:
        top = sorted({p[0] for p in parts.values()})
        raise DataError(
            f"{source}: found no PBC class folders ({', '.join(PBC_CLASSES)}) within two levels; "
            f"expected PBC_dataset_normal_DIB/<class>/*.jpg, found {top[:10]}"
        )
    depth = min(len(r) for r in roots)
    if len(shallowest := sorted(r for r in roots if len(r) == depth)) > 1:
        raise DataError(f"{source}: several sets of PBC class folders: {['/'.join(r) for r in shallowest]}; pass one")
    root = shallowest[0]
    kept = []
    for name, p in parts.items():
        if p[:depth] != root or len(p) < depth + 2:
            left.add("outside the class folders", name)
        elif (cls := canonical_class(p[depth])) is None:
            left.add(_not_ours(p[depth]))
        elif Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
            left.add("not an image file", name)
        else:
            kept.append((name, "/".join(p[depth:]), cls))
    return kept


def _safe_member(name: str) -> str | None:
    """A zip member's path with '/' separators, or None if it could land outside the target (zip-slip)."""
    norm = name.replace("\\", "/")
    parts = norm.split("/")
    if norm.startswith("/") or re.match(r"[A-Za-z]:", norm) or ".." in parts:
        return None
    return "/".join(p for p in parts if p not in ("", "."))


def _pbc_zip(source: Path, extract_to: Path, force: bool) -> tuple[list[Row], LeftOut]:
    """Extract the PBC zip's leukocyte images, refusing members that would land outside ``extract_to``."""
    left = LeftOut()
    try:
        zf = zipfile.ZipFile(source)
    except (zipfile.BadZipFile, OSError) as err:
        raise DataError(f"{source}: not a readable zip file ({err})") from err
    with zf:
        members = {}
        for info in zf.infolist():
            if info.is_dir():
                continue
            if (safe := _safe_member(info.filename)) is None:
                left.add("unsafe path in the zip (absolute or '..')", info.filename)
            elif safe in members:
                left.add("listed more than once", info.filename)
            else:
                members[safe] = info
        kept = _pbc_select(members, source, left)
        _fresh_dir(extract_to, force)
        base, rows = extract_to.resolve(), []
        for name, rel, cls in kept:
            target = (base / rel).resolve()
            if not target.is_relative_to(base):  # a symlink already in the target folder
                left.add("unsafe path in the zip (absolute or '..')", name)
                continue
            try:
                data = zf.read(members[name])
            except (zipfile.BadZipFile, OSError) as err:
                raise DataError(f"{source}: member {name} is corrupt ({err})") from err
            if not _is_image(io.BytesIO(data)):
                left.add("not a readable image", name)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            rows.append(_row(target, cls, f"{source.name}:{name}"))
    return rows, left


def from_pbc(source: Path, extract_to: Path, force: bool = False) -> tuple[list[Row], LeftOut]:
    """The PBC dataset (Acevedo et al. 2020) as downloaded: its folder, used in place, or its zip.

    From the zip, only the kept images are extracted, into ``extract_to`` (unused for a folder).
    Erythroblasts, immature granulocytes (ig) and platelets are left out and counted.
    """
    if source.is_dir():
        left = LeftOut()
        names = sorted(f.relative_to(source).as_posix() for f in source.rglob("*") if f.is_file())
        rows = []
        for name, _, cls in _pbc_select(names, source, left):
            if _is_image(source / name):
                rows.append(_row(source / name, cls, f"{source.resolve().name}/{name}"))
            else:
                left.add("not a readable image", name)
        return rows, left
    if not source.is_file():
        raise DataError(f"{source} does not exist")
    return _pbc_zip(source, extract_to, force)


# -- table -----------------------------------------------------------------------------------------
def from_table(
    file: Path,
    images: Path,
    pattern: str = BCCD_PATTERN,
    id_column: str | None = None,
    label_column: str | None = None,
    codes: dict[str, str] | None = None,
) -> tuple[list[Row], LeftOut]:
    """A table of numbered images with a class label (or a code in ``codes``) for each.

    The image of a row is ``images / pattern.format(id=...)`` (ids that are whole numbers are
    formatted as ints). Columns are found by name, ignoring case, unless given.
    """
    if {f for _, f, _, _ in string.Formatter().parse(pattern) if f is not None} != {"id"}:
        raise DataError(f"--pattern {pattern!r} must contain {{id}} and no other field, e.g. {BCCD_PATTERN}")
    if not images.is_dir():
        raise DataError(f"image folder {images} does not exist or is not a folder")
    fieldnames, lines = _read_table(file)
    id_wanted = [id_column] if id_column else ID_COLUMNS
    label_wanted = [label_column] if label_column else LABEL_COLUMNS
    id_col, label_col = _column(fieldnames, id_wanted), _column(fieldnames, label_wanted)
    if id_col is None or label_col is None:
        raise DataError(
            f"{file}: expected an id column (one of {list(id_wanted)}) and a label column (one of "
            f"{list(label_wanted)}), any case; found columns {fieldnames}"
        )
    rows, left, seen = [], LeftOut(), set()
    for line, row in lines:
        ident = (row.get(id_col) or "").strip()
        label = row.get(label_col) or ""
        cls, reason = _classify(label, codes)
        if not ident:
            left.add("empty id", f"line {line}")
            continue
        if cls is None:
            left.add(reason, f"id {ident}: {label.strip()!r}")
            continue
        try:
            name = pattern.format(id=_number(ident))
        except (ValueError, TypeError):
            left.add("id does not fit --pattern", f"id {ident}")
            continue
        if problem := _image_problem(images / name, seen):
            left.add(problem, name)
        else:
            rows.append(_row(images / name, cls, f"{file.name}:{line}"))
    return rows, left


def parse_codes(text: str) -> dict[str, str]:
    """``"1=neutrophil,2=eosinophil"`` as {"1": "neutrophil", ...}; argparse type for --codes."""
    codes = {}
    for item in filter(None, (i.strip() for i in text.split(","))):
        code, sep, name = item.partition("=")
        cls = canonical_class(name)
        if not sep or not code.strip() or cls is None:
            raise argparse.ArgumentTypeError(f"{item!r}: expected CODE=CLASS with CLASS one of {', '.join(CLASSES)}")
        codes[str(_number(code.strip()))] = cls
    return codes


# -- bloodmnist ------------------------------------------------------------------------------------
def from_bloodmnist(file: Path, images_out: Path, force: bool = False) -> tuple[list[Row], LeftOut]:
    """MedMNIST's BloodMNIST .npz: kept images are written as PNG to ``images_out/<split>/<class>/``."""
    try:
        npz = np.load(file, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise DataError(f"{file}: not a readable .npz file ({err})") from err
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise DataError(f"{file}: a single array, not an .npz archive of <split>_images and <split>_labels")
    left, rows = LeftOut(), []
    with npz:
        wanted = [f"{s}_{kind}" for s in SPLITS for kind in ("images", "labels")]
        if missing := [k for k in wanted if k not in npz.files]:
            raise DataError(f"{file}: missing keys {missing}; found keys {npz.files} (expected {wanted})")
        _fresh_dir(images_out, force)
        for split in SPLITS:
            images, labels = npz[f"{split}_images"], npz[f"{split}_labels"]
            if labels.ndim == 2 and labels.shape[1] == 1:
                labels = labels[:, 0]
            if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or labels.shape != (len(images),):
                raise DataError(
                    f"{file}: expected {split}_images uint8 (N, S, S, 3) and {split}_labels (N, 1); got "
                    f"{images.dtype} {images.shape} and {labels.shape}"
                )
            if not np.issubdtype(labels.dtype, np.integer) or labels.min(initial=0) < 0 or labels.max(initial=0) > 7:
                raise DataError(f"{file}: {split}_labels must be integers 0-7, got {np.unique(labels)[:10]}")
            for i, (pixels, label) in enumerate(zip(images, labels.tolist())):
                if (cls := canonical_class(PBC_CLASSES[label])) is None:
                    left.add(_not_ours(f"{PBC_CLASSES[label]} (label {label})"))
                    continue
                target = images_out / split / cls / f"{split}_{i:05d}.png"
                target.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(target)
                rows.append(_row(target, cls, f"{file.name}:{split}_images[{i}]", split))
    return rows, left


# -- writing and reporting -------------------------------------------------------------------------
def manifest_path(path: str | Path, out_dir: Path) -> str:
    """``path`` relative to the manifest's folder when possible (not across drives), else absolute."""
    path = Path(path).resolve()
    try:
        return Path(os.path.relpath(path, out_dir.resolve())).as_posix()
    except ValueError:
        return path.as_posix()


def write(rows: list[Row], out: Path) -> int:
    """Write the manifest with paths relative to its folder; return how many rows."""
    return write_manifest([{**r, "path": manifest_path(r["path"], out.parent)} for r in rows], out)


def summarize(rows: list[Row], left: dict[str, int], out: Path) -> None:
    """Print images per class and split, and what was left out and why."""
    console = Console()
    counts = Counter((r["label"], r.get("split") or "no split") for r in rows)
    columns = [s for s in (*SPLITS, "no split") if any(k[1] == s for k in counts)]
    console.print(f"wrote {out}: {len(rows)} images", soft_wrap=True)
    table = Table()
    table.add_column("class")
    for name in columns + (["total"] if len(columns) > 1 else []):
        table.add_column(name, justify="right")
    for cls in CLASSES:
        per = [counts[cls, s] for s in columns]
        table.add_row(cls, *map(str, per + ([sum(per)] if len(columns) > 1 else [])))
    totals = [sum(counts[c, s] for c in CLASSES) for s in columns]
    table.add_row("total", *map(str, totals + ([len(rows)] if len(columns) > 1 else [])), style="bold")
    console.print(table)
    if empty := [c for c in CLASSES if not any(counts[c, s] for s in columns)]:
        console.print(f"[yellow]no images for {', '.join(empty)}: training needs every class[/yellow]")
    if left:
        dropped = Table(title=f"left out: {sum(left.values())}")
        dropped.add_column("reason")
        dropped.add_column("count", justify="right")
        dropped.add_column("examples", overflow="fold")
        examples = getattr(left, "examples", {})
        for reason, n in sorted(left.items(), key=lambda kv: (-kv[1], kv[0])):
            dropped.add_row(reason, str(n), ", ".join(examples.get(reason, [])))
        console.print(dropped)
    else:
        console.print("nothing left out")
    console.print(f"use it with: data.manifest={out}", soft_wrap=True)


# -- command line ----------------------------------------------------------------------------------
Adapter = Callable[[argparse.Namespace, Path], tuple[list[Row], dict[str, int]]]


def _run_fields(args: argparse.Namespace, out: Path) -> tuple[list[Row], dict[str, int]]:
    """Crop the leukocyte of each labelled field (leukonet.data.cells) and list the crops."""
    from leukonet.data.cells import prepare_fields  # imported on use: only this format needs it

    _check_outside(args.crops_out, args.source)
    _fresh_dir(args.crops_out, args.force)
    return prepare_fields(args.source, args.crops_out)


def run(args: argparse.Namespace) -> None:
    """Convert ``args.source`` with the chosen format, write the manifest, print the summary."""
    out: Path = args.out
    if out.is_dir():
        raise DataError(f"--out {out} is a folder; name the manifest file to write")
    if out.exists() and not args.force:
        raise DataError(f"{out} already exists; pass --force to overwrite it")
    for source in (args.source, getattr(args, "images", None)):
        if source is not None:
            _check_outside(out, source)
    rows, left = args.adapter(args, out)
    if not rows:
        raise DataError(f"{args.source}: no usable images; left out: {dict(left)}")
    write(rows, out)
    summarize(rows, left, out)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", type=Path, required=True, metavar="MANIFEST.csv", help="manifest to write")
    common.add_argument("--force", action="store_true", help="overwrite --out and write into non-empty image folders")
    parser = argparse.ArgumentParser(
        prog="python -m leukonet.data.prepare",
        description="Write a manifest (path,label,source,split) for data.manifest=... from a dataset as downloaded.",
    )
    sub = parser.add_subparsers(dest="format", required=True, metavar="FORMAT")

    def add(name: str, source: str, help: str, adapter: Adapter) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help, description=help)
        p.add_argument("source", type=Path, metavar=source)
        p.set_defaults(adapter=adapter)
        return p

    add("folder", "ROOT", "class-per-folder tree (ROOT/<class>/*), folder names matched by alias",
        lambda a, out: from_folder(a.source))
    add("csv", "FILE", "CSV with columns path,label[,split]; paths relative to the CSV's folder",
        lambda a, out: from_csv(a.source))
    pbc = add("pbc", "SOURCE", "PBC dataset (Acevedo et al. 2020): its folder or its .zip; keeps the 5 leukocyte classes",
              lambda a, out: from_pbc(a.source, a.extract_to or out.parent / f"{out.stem}_images", a.force))
    pbc.add_argument("--extract-to", type=Path, metavar="DIR",
                     help="where the zip's kept images go (default: <manifest stem>_images/ beside the manifest)")
    table = add("table", "FILE", "CSV of numbered images and class labels or codes (e.g. BCCD labels.csv)",
                lambda a, out: from_table(a.source, a.images, a.pattern, a.id_column, a.label_column, a.codes))
    table.add_argument("--images", type=Path, required=True, metavar="DIR", help="folder holding the images")
    table.add_argument("--pattern", default=BCCD_PATTERN, help="image file name from the id (default: %(default)s)")
    table.add_argument("--id-column", help=f"id column (default: first of {', '.join(ID_COLUMNS)}, any case)")
    table.add_argument("--label-column", help=f"label column (default: first of {', '.join(LABEL_COLUMNS)}, any case)")
    table.add_argument("--codes", type=parse_codes, metavar="CODE=CLASS,...",
                       help="labels are codes: 1=neutrophil,2=eosinophil,...")
    blood = add("bloodmnist", "FILE.npz", "MedMNIST BloodMNIST .npz; keeps its train/val/test split",
                lambda a, out: from_bloodmnist(a.source, a.images_out, a.force))
    blood.add_argument("--images-out", type=Path, required=True, metavar="DIR", help="where the PNG images are written")
    fields = add("fields", "DIR", "class-per-folder whole-field images, one leukocyte each (e.g. LISC): crop the cells",
                 _run_fields)
    fields.add_argument("--crops-out", type=Path, required=True, metavar="DIR", help="where the crops are written")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    exit_on_user_error(lambda: run(args))


if __name__ == "__main__":
    main()
