"""The LightningDataModule: one owner for the split, the decoding and the transforms.

With ``root`` unset it generates synthetic cells (the configs' default root is the embedded sample of real
PBC cells, ``leukonet.data.embedded_sample``), so every command runs on a fresh clone. Images are decoded
once (in threads) at set-up: undecodable files are found there, named and skipped, never mid-epoch, and the
decoded uint8 pixels stay in memory for every epoch.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import albumentations as A
import lightning as L
import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader, Dataset, Sampler

from leukonet.classes import CLASSES
from leukonet.data import embedded_sample, synthetic
from leukonet.data.check import duplicate_groups
from leukonet.data.citations import citation_for
from leukonet.data.folder import Entry, decode_many, scan_folder
from leukonet.data.manifest import read_manifest
from leukonet.data.split import SPLITS, read_split, stratified_split, write_split
from leukonet.data.transforms import eval_transform, train_transform
from leukonet.errors import DataError
from leukonet.training.distributed import eval_sampler, train_sampler
from leukonet.training.seeding import EpochShuffle, epoch_seed


class CellDataset(Dataset):
    """Decoded cells (N, H, W, 3 uint8) with labels; returns (uint8 CHW tensor, label).

    With ``seed`` set, image ``i`` is augmented with a generator seeded from (seed, epoch, i): the
    same in every run, worker layout and resume."""

    def __init__(self, pixels: np.ndarray, labels: np.ndarray, transform, seed: int | None = None) -> None:
        self.pixels, self.labels, self.transform = pixels, labels, transform
        self.seed, self.epoch = seed, 0

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self.seed is not None:
            self.transform.set_random_seed(epoch_seed(self.seed, self.epoch, i))
        return self.transform(image=self.pixels[i])["image"], int(self.labels[i])


class CellDataModule(L.LightningDataModule):
    """Leukocyte images from ``root/<class>/*`` (or synthetic ones), split 70/15/15 by class."""

    def __init__(
        self,
        root: str | None = None,
        manifest: str | None = None,
        name: str | None = None,
        synthetic_cfg: dict | None = None,
        split_file: str | None = None,
        split_fractions: Sequence[float] = (0.7, 0.15, 0.15),
        split_seed: int = 42,
        duplicates: str = "near",
        allow_leakage: bool = False,
        image_size: int = 224,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        augment: Mapping[str, A.BasicTransform | None] | None = None,
        output_dir: str | None = None,
        citation: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.synthetic_cfg = dict(synthetic_cfg or {})
        self.manifest = Path(manifest) if manifest else None
        self.is_synthetic = not root and not manifest
        # entry paths are relative to root: the manifest's folder, the data folder, or the synthetic cache
        self.root = self.manifest.parent if self.manifest else Path(root or self.synthetic_cfg["dir"])
        self.name = name or ("synthetic" if self.is_synthetic else self.manifest.stem if self.manifest
                             else embedded_sample.NAME if embedded_sample.is_sample(self.root) else self.root.name)
        self.split_file = split_file
        self.split_fractions = tuple(split_fractions)
        self.split_seed = split_seed
        if duplicates not in ("near", "exact", "off"):
            raise ValueError(f"data.duplicates must be 'near', 'exact' or 'off', got {duplicates!r}")
        self.duplicates, self.allow_leakage = duplicates, allow_leakage
        self.duplicate_groups: list[list[str]] = []
        self.image_size = image_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.augment = augment
        self.seed = seed
        self.output_dir = Path(output_dir) if output_dir else None
        self.citation = citation or citation_for(self.name, self.is_synthetic)
        self.splits: dict[str, list[Entry]] = {}
        self.skipped: list[dict[str, str]] = []
        self._data: dict[str, CellDataset] = {}

    # -- Lightning hooks -------------------------------------------------------------
    def prepare_data(self) -> None:
        if self.is_synthetic:
            cfg = {k: v for k, v in self.synthetic_cfg.items() if k != "dir"}
            synthetic.generate_dataset(self.root, **cfg)

    def setup(self, stage: str | None = None) -> None:
        if self._data:
            return
        self.prepare_data()  # idempotent; outside Lightning (evaluate) nobody else calls it
        entries, given, scan_notes = self._listed_entries()
        pixels = self._decode(entries)
        readable = [e for e in entries if e.path in pixels]
        if self.duplicates != "off":
            self.duplicate_groups = duplicate_groups(self.root, readable, near=self.duplicates == "near")
        if given is not None:  # a split file: keep its partition, minus unreadable files
            splits = {s: [e for e in given[s] if e.path in pixels] for s in SPLITS}
            self._refuse_leakage(splits)
        else:  # copies of one picture stay together
            splits = stratified_split(readable, self.split_fractions, self.split_seed, self.duplicate_groups)
        if stage in (None, "fit") and (
            missing := [c for i, c in enumerate(CLASSES) if not any(e.label == i for e in splits["train"])]
        ):
            raise DataError(
                f"{self.root}: no training images for {missing}; every class needs a folder "
                f"(names like 'neutrophil', 'NEUT', 'Neutrophils' are recognised) with images in it"
            )
        self.splits = splits
        for s in SPLITS:
            tf = train_transform(self.augment, self.image_size) if s == "train" else eval_transform(self.image_size)
            stacked = np.stack([pixels[e.path] for e in splits[s]]) if splits[s] else np.zeros((0, self.image_size, self.image_size, 3), np.uint8)
            labels = np.array([e.label for e in splits[s]], dtype=np.int64)
            self._data[s] = CellDataset(stacked, labels, tf, seed=self.seed if s == "train" else None)
        self._write_outputs(scan_notes)

    def train_dataloader(self) -> DataLoader:
        """This epoch's shuffle and augmentation, from (seed, epoch). Lightning asks for it every epoch
        (``trainer.reload_dataloaders_every_n_epochs=1``), resumed epochs included."""
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        self._data["train"].epoch = epoch
        shuffle = EpochShuffle(len(self._data["train"]), self.seed, epoch)
        return self.loader("train", sampler=train_sampler(shuffle, self.trainer))  # under DDP: this process's share

    # under DDP each process scores its own share of the images, none twice (leukonet.training.distributed)
    def val_dataloader(self) -> DataLoader:
        return self.loader("val", sampler=eval_sampler(self._data["val"], self.trainer, "val"))

    def test_dataloader(self) -> DataLoader:
        return self.loader("test", sampler=eval_sampler(self._data["test"], self.trainer, "test"))

    # -- helpers -----------------------------------------------------------------------
    def train_pixels(self) -> np.ndarray:
        """The decoded training images, unaugmented (N, H, W, 3 uint8): what a stain reference is fitted on."""
        self.setup("fit")
        return self._data["train"].pixels

    def entries(self, split: str) -> list[Entry]:
        return self.splits[split]

    def path_of(self, entry: Entry) -> Path:
        return self.root / entry.path

    def _listed_entries(self) -> tuple[list[Entry], dict[str, list[Entry]] | None, dict[str, list[str]]]:
        """Every image to use, its given partition (split file, else the manifest's), and scan notes."""
        if self.manifest and not self.split_file:
            entries, given = read_manifest(self.manifest)
            return entries, given, {}
        if self.split_file:
            splits = read_split(self.split_file)
            gone = [e.path for s in SPLITS for e in splits[s] if not (self.root / e.path).is_file()]
            if gone:
                raise DataError(
                    f"{self.split_file} lists {len(gone)} file(s) missing under {self.root}, "
                    f"e.g. {gone[:3]}; is data.root the folder the split was made from?"
                )
            return [e for s in SPLITS for e in splits[s]], splits, {}
        scan = scan_folder(self.root)
        return scan.entries, None, {"unknown_folders": scan.unknown_folders, "ignored_files": scan.ignored_files}

    def _refuse_leakage(self, splits: dict[str, list[Entry]]) -> None:
        """A given split that puts copies of one picture on two sides measures memory, not skill."""
        split_of = {e.path: s for s in SPLITS for e in splits[s]}
        leaks = [g for g in self.duplicate_groups if len({split_of.get(p) for p in g} - {None}) > 1]
        if not leaks:
            return
        example = ", ".join(f"{p} ({split_of.get(p)})" for p in leaks[0])
        message = (
            f"{self.split_file or self.manifest}: {len(leaks)} group(s) of duplicate images span splits, "
            f"e.g. {example}. List them with: python -m leukonet.data.check {self.manifest or self.root} "
            f"--split-file {self.split_file or '...'}; remove the copies, or set data.allow_leakage=true"
        )
        if not self.allow_leakage:
            raise DataError(message)
        warnings.warn(message, stacklevel=2)

    def _decode(self, entries: list[Entry]) -> dict[str, np.ndarray]:
        """Decode every image once, in threads; report each unreadable one by name and drop it."""

        results = decode_many([self.root / e.path for e in entries], self.image_size)
        pixels = {}
        for e, r in zip(entries, results):
            if isinstance(r, str):
                self.skipped.append({"path": e.path, "reason": r})
                warnings.warn(f"skipping {r}", stacklevel=2)
            else:
                pixels[e.path] = r
        return pixels

    def loader(self, split: str, sampler: Sampler | None = None) -> DataLoader:
        train = split == "train"
        return DataLoader(
            self._data[split],
            batch_size=self.batch_size if train else self.eval_batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=False,
            generator=torch.Generator().manual_seed(self.seed),  # workers' seeds: not from the global generator
            # this process's share under DDP: a share smaller than a batch must still train
            drop_last=train and len(sampler if sampler is not None else self._data[split]) > self.batch_size,
        )

    def summary(self) -> dict[str, Any]:
        counts = {s: Counter(CLASSES[e.label] for e in self.splits[s]) for s in SPLITS}
        return {
            "dataset": self.name,
            "root": str(self.root),
            "synthetic": self.is_synthetic,
            "counts": {s: {c: counts[s].get(c, 0) for c in CLASSES} for s in SPLITS},
            "total": {s: len(self.splits[s]) for s in SPLITS},
            "skipped": self.skipped,
            "duplicate_groups": self.duplicate_groups,
        }

    def _write_outputs(self, scan_notes: dict[str, list[str]]) -> None:
        summary = {**self.summary(), **scan_notes}
        is_zero = self.trainer is None or self.trainer.is_global_zero
        if self.output_dir and is_zero:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            write_split(self.splits, self.output_dir / "split.csv")
            (self.output_dir / "data_summary.json").write_text(json.dumps(summary, indent=2))
        if is_zero:
            self._print_summary(summary)

    def _print_summary(self, summary: dict[str, Any]) -> None:
        table = Table(title=f"Data: {self.name} ({self.root})")
        table.add_column("class")
        for s in SPLITS:
            table.add_column(s, justify="right")
        for c in CLASSES:
            table.add_row(c, *(str(summary["counts"][s][c]) for s in SPLITS))
        table.add_row("total", *(str(summary["total"][s]) for s in SPLITS), style="bold")
        console = Console(stderr=True)
        console.print(table)
        if self.skipped:
            console.print(f"[yellow]{len(self.skipped)} unreadable file(s) skipped:[/yellow]")
            for s in self.skipped:
                console.print(f"  {s['reason']}")
