"""The cells adaptation reads: the new lab's (a folder in any layout, or a CSV list), the few it labelled, and
the training lab's (the checkpoint's own run, or a folder given). Every problem is named before any work."""

from __future__ import annotations

import csv
import hashlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from leukonet.classes import CLASSES, canonical_class
from leukonet.data.folder import decode_many
from leukonet.data.transforms import eval_transform
from leukonet.errors import DataError

MIN_CELLS = 30  # fewer target cells than this give BatchNorm moments and a class mix too noisy to use


@dataclass
class Cells:
    """Decoded cells at the model's size: ``images`` (N, 3, H, W) uint8, their ``paths``, and labels (-1: none)."""

    paths: list[Path]
    images: torch.Tensor
    labels: np.ndarray
    unreadable: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, index) -> Cells:
        index = np.asarray(index, dtype=np.int64)
        return Cells([self.paths[i] for i in index], self.images[torch.as_tensor(index)], self.labels[index])


def decode(paths: list[Path], image_size: int, labels: list[int] | None = None) -> Cells:
    """Decode ``paths`` at ``image_size`` (as training does); unreadable files are listed and left out."""
    results = decode_many(paths, image_size)
    tf = eval_transform(image_size)
    keep = [i for i, r in enumerate(results) if not isinstance(r, str)]
    unreadable = [{"file": str(paths[i]), "reason": r} for i, r in enumerate(results) if isinstance(r, str)]
    for u in unreadable:
        warnings.warn(f"skipping {u['reason']}", stacklevel=2)
    images = torch.stack([tf(image=results[i])["image"] for i in keep]) if keep else torch.zeros(0, 3, image_size, image_size, dtype=torch.uint8)
    y = np.array([labels[i] for i in keep] if labels is not None else [-1] * len(keep), dtype=np.int64)
    return Cells([paths[i] for i in keep], images, y, unreadable)


def target_cells(target: DictConfig, image_size: int, min_cells: int = MIN_CELLS) -> Cells:
    """The lab's cells: ``target.root`` (a folder, searched recursively; class folders are not needed and not
    read) or ``target.manifest`` (a CSV whose ``path`` column lists them)."""
    from leukonet.predict import input_files  # the same inputs predict accepts

    given = target.get("root") or target.get("manifest")
    if not given:
        raise DataError("give the new lab's cells: target.root=DIR (any layout) or target.manifest=CSV (a path column)")
    try:
        files = [p.resolve() for p in input_files(given)]
    except DataError as err:
        raise DataError(f"target: {err}") from None
    cells = decode(files, image_size)
    if len(cells) < min_cells:
        raise DataError(f"target {given}: {len(cells)} readable cell image(s) ({len(cells.unreadable)} unreadable); "
                        f"adaptation needs at least {min_cells} to estimate a lab's statistics and class mix")
    return cells


def read_labels(csv_path: str | Path, cells: Cells) -> np.ndarray:
    """Labels (-1: unlabelled) for ``cells`` from a ``path,label`` CSV (rows with an empty label are skipped);
    paths relative to the CSV's folder, or absolute. Refuses a path that is not one of the target's cells, and a label that names no known class."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DataError(f"target.labels={csv_path} does not exist")
    index = {p: i for i, p in enumerate(cells.paths)}
    labels = np.full(len(cells), -1, dtype=np.int64)
    missing, unknown = [], []
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not {"path", "label"} <= set(reader.fieldnames or []):
            raise DataError(f"{csv_path}: expected a header with path,label; got {reader.fieldnames}")
        for line, row in enumerate(reader, start=2):
            if not (row["label"] or "").strip():  # not labelled yet (a to_label.csv being filled in)
                continue
            path = (csv_path.parent / (row["path"] or "")).resolve()
            cls = canonical_class(row["label"] or "")
            if cls is None:
                unknown.append(f"line {line}: {row['label']!r}")
            elif path not in index:
                missing.append(f"line {line}: {row['path']}")
            else:
                labels[index[path]] = CLASSES.index(cls)
    if unknown:
        raise DataError(f"{csv_path}: {len(unknown)} label(s) name no class we know ({', '.join(CLASSES)}): {unknown[:5]}")
    if missing:
        raise DataError(f"{csv_path}: {len(missing)} path(s) are not among the target's readable cells "
                        f"(paths are taken from the CSV's folder): {missing[:5]}")
    if (labels < 0).all():
        raise DataError(f"{csv_path} labels none of the target's cells")
    return labels


def source_cells(source: DictConfig, ckpt_path: Path, image_size: int) -> Cells:
    """The training lab's training cells: ``source.root``/``source.manifest`` with ``source.split_file``, else the
    checkpoint's own run: its data config (``RUN/.hydra/config.yaml``) and split (``RUN/split.csv``); at most
    ``source.per_class`` of each class (drawn with ``source.seed``), which is plenty for moments and a head."""
    from hydra.utils import instantiate

    overrides = {"image_size": image_size, "augment": None, "duplicates": "off", "output_dir": None}
    if source.get("root") or source.get("manifest"):
        data = {"_target_": "leukonet.data.datamodule.CellDataModule",
                **{k: source.get(k) for k in ("root", "manifest", "split_file")}}
    else:
        run = ckpt_path.resolve().parent.parent
        config, split = run / ".hydra" / "config.yaml", run / "split.csv"
        if not (config.is_file() and split.is_file()):
            raise DataError(f"{ckpt_path}: cannot find the run it came from ({config} and {split}); give the "
                            "training cells: source.root=DIR (or source.manifest=CSV) and source.split_file=RUN/split.csv")
        data = OmegaConf.load(config).data  # resolved inside the run's whole config (paths.data_dir, ...)
        overrides["split_file"] = str(split)
    datamodule = instantiate(data, **overrides)
    datamodule.setup("fit")
    entries = datamodule.entries("train")
    cells = Cells([datamodule.path_of(e).resolve() for e in entries],
                  torch.as_tensor(np.ascontiguousarray(datamodule.train_pixels())).permute(0, 3, 1, 2),
                  np.array([e.label for e in entries], dtype=np.int64))
    return cells.subset(per_class(cells.labels, source.get("per_class"), int(source.get("seed") or 0)))


def per_class(labels: np.ndarray, cap: int | None, seed: int = 0) -> np.ndarray:
    """Indices of at most ``cap`` cells of each class (all with ``cap`` None), drawn with ``seed``, sorted."""
    if cap is None:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    picks = [rng.permutation(np.flatnonzero(labels == c))[:cap] for c in np.unique(labels)]
    return np.sort(np.concatenate(picks))


def copies_of_training(target: Cells, train: Cells) -> int:
    """How many target cells are training cells: the same file, or a file with the same bytes."""
    def digest(p: Path) -> str:
        return hashlib.sha1(p.read_bytes()).hexdigest()

    known = set(train.paths) | {digest(p) for p in train.paths}
    return sum(p in known or digest(p) in known for p in target.paths)
