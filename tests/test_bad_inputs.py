"""Every kind of bad or odd input: converted, skipped with its reason, or refused with a clear error.

The data module decodes every image at set-up, so a bad file is named there and never reaches an
epoch: one short fit on a tree holding all of them must finish. docs/bad_inputs.md lists the outcomes.
"""

from __future__ import annotations

import io
import json
import re
import struct
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from leukonet.data.datamodule import CellDataModule
from leukonet.data.folder import load_rgb
from leukonet.data.manifest import write_manifest
from leukonet.data.split import read_split
from leukonet.data.synthetic import generate_dataset
from leukonet.errors import DataError
from leukonet.training.model import CellClassifier

RNG_RGB = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)


def _jpeg(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", **kw)
    return buf.getvalue()


def _png_declaring(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims width x height (CRC fixed), like a decompression bomb."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    png = bytearray(buf.getvalue())
    png[16:24] = struct.pack(">II", width, height)  # IHDR data starts after signature, length and type
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    return bytes(png)


def _save(im: Image.Image, **kw) -> Callable[[Path], None]:
    return lambda path: im.save(path, **kw)


def _alpha() -> Image.Image:
    """Opaque red on top, fully transparent black below."""
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[:20, :, 0] = rgba[:20, :, 3] = 255
    return Image.fromarray(rgba)


GRADIENT_16 = np.linspace(1000, 5000, 40 * 40).reshape(40, 40).astype(np.uint16)
GREY = RNG_RGB[..., 0]
PALETTE_FRAMES = [Image.new("RGB", (40, 40), c).convert("P") for c in ((0, 0, 255), (0, 255, 0))]


@dataclass(frozen=True)
class Case:
    """A file to write under the data root, and what must come of it."""

    name: str
    path: str
    write: Callable[[Path], None]
    expect: str  # regex: the reason it is refused, or the conversion notes ("" for none)
    refused: bool = False
    pixels: Callable[[np.ndarray], bool] | None = None  # a property of load_rgb(path) at full size


CASES = [
    Case("zero-byte file", "neutrophil/empty.jpg", lambda p: p.write_bytes(b""), r"empty file \(0 bytes\)", True),
    Case(
        "truncated JPEG", "neutrophil/truncated.jpg", lambda p: p.write_bytes(_jpeg(Image.fromarray(RNG_RGB))[:800]),
        r"corrupt or truncated image data \(OSError: image file is truncated", True,
    ),
    Case(
        "text file named .jpg", "lymphocyte/notes.jpg", lambda p: p.write_text("not an image"),
        r"not a readable image \(no known image format; 12 bytes\)", True,
    ),
    Case(
        "1x1 px image", "lymphocyte/dot.png", _save(Image.new("RGB", (1, 1))),
        r"too small: 1x1 px, need at least 8 px a side", True,
    ),
    Case(
        "decompression bomb, 100000x100000 declared", "monocyte/bomb.png",
        lambda p: p.write_bytes(_png_declaring(100_000, 100_000)),
        r"too large, refused before decoding: Image size \(10000000000 pixels\) exceeds limit", True,
    ),
    Case(
        "decompression bomb, 10000x6000 declared", "monocyte/bomb_60mp.png",
        lambda p: p.write_bytes(_png_declaring(10_000, 6_000)),
        r"too large, refused before decoding: 10000x6000 px declared, more than 50 megapixels", True,
    ),
    Case(
        "PNG with alpha", "eosinophil/alpha.png", _save(_alpha()),
        r"^converted from RGBA with transparency \(composited on white\)$",
        pixels=lambda a: (a[:20] == (255, 0, 0)).all() and (a[20:] == 255).all(),
    ),
    Case(
        "16-bit greyscale TIFF", "monocyte/deep.tif", _save(Image.fromarray(GRADIENT_16)),
        r"^16-bit scaled to 8-bit \(range 1000\.\.5000\)$",
        pixels=lambda a: a.min() == 0 and a.max() == 255 and (np.diff(a[..., 0].ravel().astype(int)) >= 0).all(),
    ),
    Case(
        "16-bit greyscale PNG", "monocyte/deep.png", _save(Image.fromarray(GRADIENT_16)),
        r"^16-bit scaled to 8-bit \(range 1000\.\.5000\)$", pixels=lambda a: a.min() == 0 and a.max() == 255,
    ),
    Case(
        "greyscale PNG", "basophil/grey.png", _save(Image.fromarray(GREY)), r"^converted from greyscale \(L\)$",
        pixels=lambda a: all((a[..., c] == GREY).all() for c in range(3)),
    ),
    Case(
        "palette GIF, 2 frames", "basophil/palette.gif",
        _save(PALETTE_FRAMES[0], save_all=True, append_images=PALETTE_FRAMES[1:]),
        r"^first of 2 frames; converted from palette \(P\)$", pixels=lambda a: (a == (0, 0, 255)).all(),
    ),
    Case(
        "CMYK JPEG", "eosinophil/cmyk.jpg", _save(Image.new("CMYK", (40, 40), (255, 0, 0, 0))),
        r"^converted from CMYK$",
        pixels=lambda a: (a == (0, 255, 255)).all(),
    ),
    Case(
        "non-ASCII name (PNG)", "neutrophil/neutrófilo_µ.png", _save(Image.fromarray(RNG_RGB)), r"^$",
        pixels=lambda a: (a == RNG_RGB).all(),
    ),
    Case(
        "non-ASCII name (JPEG)", "lymphocyte/好.jpg", _save(Image.fromarray(RNG_RGB)), r"^$",
        pixels=lambda a: a.shape == (40, 40, 3),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_load_rgb(case: Case, tmp_path: Path) -> None:
    path = tmp_path / case.path
    path.parent.mkdir(parents=True)
    case.write(path)
    notes: list[str] = []
    if case.refused:
        with pytest.raises(ValueError, match=re.escape(f"{path}: ") + case.expect):
            load_rgb(path, 32, notes)
        return
    small = load_rgb(path, 32, notes)
    assert small.shape == (32, 32, 3) and small.dtype == np.uint8
    assert re.search(case.expect, "; ".join(notes))
    assert case.pixels(load_rgb(path))


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'gone.png'}: file not found")):
        load_rgb(tmp_path / "gone.png")


def test_bomb_in_pils_warning_range_is_refused_too(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_declaring(10_000, 10_000))  # 100 MP: PIL warns (limit 89 MP); we refuse
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(ValueError, match="10000x10000 px declared"):
        load_rgb(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # as under python -W error
        with pytest.raises(ValueError, match=r"too large, refused before decoding: Image size \(100000000 pixels\)"):
            load_rgb(path)


@pytest.fixture(scope="module")
def bad_tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[CellDataModule, list[str]]:
    """8 synthetic cells a class, every case above, and an unknown class folder; set up once."""
    root = generate_dataset(tmp_path_factory.mktemp("bad") / "cells", n_per_class=8, size=40)
    for case in CASES:
        case.write(root / case.path)
    (root / "platelet").mkdir()
    Image.fromarray(RNG_RGB).save(root / "platelet" / "p.png")
    dm = CellDataModule(root=str(root), image_size=32, batch_size=8, num_workers=0, output_dir=str(root.parent / "run"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.setup("fit")
    return dm, [str(w.message) for w in caught]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_datamodule_skips_or_keeps(case: Case, bad_tree: tuple[CellDataModule, list[str]]) -> None:
    dm, messages = bad_tree
    skipped = {s["path"]: s["reason"] for s in json.loads((dm.output_dir / "data_summary.json").read_text())["skipped"]}
    if case.refused:
        assert re.fullmatch(re.escape(f"{dm.root / case.path}: ") + case.expect + ".*", skipped[case.path])
        assert f"skipping {skipped[case.path]}" in messages
    else:
        assert case.path not in skipped
        assert case.path in {e.path for s in read_split(dm.output_dir / "split.csv").values() for e in s}


def test_unknown_class_folder_is_ignored_and_reported(bad_tree: tuple[CellDataModule, list[str]]) -> None:
    dm, messages = bad_tree
    assert json.loads((dm.output_dir / "data_summary.json").read_text())["unknown_folders"] == ["platelet"]
    assert any("ignoring folders that name no leukocyte class: ['platelet']" in m for m in messages)


def test_training_never_dies_on_a_bad_file(bad_tree: tuple[CellDataModule, list[str]]) -> None:
    dm, _ = bad_tree
    model = CellClassifier(
        backbone="test_efficientnet", pretrained=False, image_size=32,
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3),
    )
    trainer = L.Trainer(
        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.fit(model, datamodule=dm)
    kept = 5 * 8 + sum(not c.refused for c in CASES)
    assert trainer.state.finished and trainer.current_epoch == 1
    assert sum(len(dm.entries(s)) for s in ("train", "val", "test")) == kept


@pytest.mark.parametrize("empty_folder", [True, False], ids=["empty class folder", "class missing"])
def test_a_class_without_images_is_refused(empty_folder: bool, tmp_path: Path) -> None:
    for c in ("eosinophil", "lymphocyte", "monocyte", "neutrophil"):
        (tmp_path / c).mkdir()
        for i in range(4):
            Image.fromarray(np.roll(RNG_RGB, i, axis=0)).save(tmp_path / c / f"{i}.png")
    if empty_folder:
        (tmp_path / "basophil").mkdir()
    dm = CellDataModule(root=str(tmp_path), image_size=32, num_workers=0)
    with pytest.raises(DataError, match=r"no training images for \['basophil'\]"):
        dm.setup("fit")


def test_manifest_row_whose_file_is_gone_is_skipped(cells: Path, tmp_path: Path) -> None:
    rows = [{"path": str(p), "label": p.parent.name} for p in sorted(cells.glob("*/*.png"))]
    rows.append({"path": str(cells / "neutrophil" / "gone.png"), "label": "neutrophil"})
    write_manifest(rows, tmp_path / "manifest.csv")
    dm = CellDataModule(manifest=str(tmp_path / "manifest.csv"), image_size=32, num_workers=0)
    with pytest.warns(UserWarning, match=re.escape(f"{cells / 'neutrophil' / 'gone.png'}: file not found")):
        dm.setup("fit")
    assert [s["path"] for s in dm.skipped] == [str(cells / "neutrophil" / "gone.png")]
    assert sum(len(dm.entries(s)) for s in ("train", "val", "test")) == 100
