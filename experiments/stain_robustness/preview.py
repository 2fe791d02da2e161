"""Preview grids of the stain, optics and scale augmentation: docs/augmentations/<name>.png.

One grid per transform of ``conf/data/augment/stain_robust.yaml`` that report.yaml lacks (forced
to p=1, so every draw shows it), one per transform that ``+experiment=stain_robust`` (the ablation's
recommendation) adds or sets differently (``experiment_<name>`` for the latter), plus the whole report,
stain_robust and recommended pipelines with their own probabilities. Rows: one cell per class; first
column the cell as loaded, then ``--draws`` draws.
Also writes docs/augmentations.md listing the grids with each entry's config comment.

    python experiments/stain_robustness/preview.py                 # PBC cells if found, else synthetic
    python experiments/stain_robustness/preview.py --data ../shared/data/pbc-2500
    python experiments/stain_robustness/preview.py --synthetic

Cell images are only read; the grids written are our own figures.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import sys
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from leukonet.classes import CLASSES
from leukonet.data import synthetic
from leukonet.data.citations import citation_for
from leukonet.data.folder import load_rgb, scan_folder
from leukonet.train import CONF

REPO = Path(__file__).resolve().parents[2]
AUGMENT = Path(CONF) / "data" / "augment"
MAX_BYTES = 290_000


def find_pbc() -> Path | None:
    for base in (os.environ.get("LEUKONET_DATA"), REPO.parent / "shared" / "data"):
        if base and (Path(base) / "pbc-2500").is_dir():
            return Path(base) / "pbc-2500"
    return None


def load_cells(data: Path | None, size: int) -> tuple[list[np.ndarray], str]:
    """One cell per class: the first readable file of each class folder, else a synthetic cell."""
    if data is None:
        rng = np.random.default_rng(0)
        return [synthetic.render_cell(c, rng, size=size) for c in CLASSES], "synthetic cells"
    entries = scan_folder(data).entries
    cells = []
    for i in range(len(CLASSES)):
        for path in sorted(e.path for e in entries if e.label == i):
            try:
                cells.append(load_rgb(data / path, size))
                break
            except ValueError:  # junk files (.DS_Store copies): try the next
                continue
    return cells, f"{data.name} cells"


def entry_comments(path: Path) -> dict[str, str]:
    """``name:  # comment`` and its ``  # ...`` continuation lines, joined."""
    out: dict[str, str] = {}
    name = None
    for line in path.read_text().splitlines():
        if m := re.match(r"^\s*(\w+):\s*#\s*(.*)$", line):
            name, out[m[1]] = m[1], m[2].strip()
        elif name and (m := re.match(r"^\s+#\s*(.*)$", line)):
            out[name] += " " + m[1].strip()
        else:
            name = None
    return out


def augment_configs(size: int) -> dict[str, dict]:
    """The augment entries (plain dicts, None where switched off) of report, stain_robust and the experiment."""
    def build(override: str) -> dict:
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            cfg = compose(config_name="train", overrides=[override, f"data.image_size={size}"])
        return OmegaConf.to_container(cfg.data.augment, resolve=True)

    return {"report": build("data/augment=report"), "stain_robust": build("data/augment=stain_robust"),
            "experiment": build("+experiment=stain_robust")}


def pipeline(entries: dict) -> A.Compose:
    """The transforms of switched-on entries, in order."""
    return A.Compose([instantiate(c) for c in entries.values() if c is not None])


def single(config: dict) -> A.Compose:
    """One transform at p=1, so every draw shows it."""
    return A.Compose([instantiate({**config, "p": 1.0})])


def grid(cells: list[np.ndarray], transform: A.Compose, draws: int, seed: int, size: int) -> Image.Image:
    """Each cell and its draws (made at the training size), shrunk to ``size`` px, 2 px white borders."""

    def shrink(x: np.ndarray) -> np.ndarray:
        return cv2.resize(x, (size, size), interpolation=cv2.INTER_AREA)

    rows = []
    for r, cell in enumerate(cells):
        row = [shrink(cell)]
        for d in range(draws):
            transform.set_random_seed(seed + 1000 * r + d)
            row.append(shrink(transform(image=cell)["image"]))
        rows.append(np.concatenate([np.pad(x, ((2, 2), (2, 2), (0, 0)), constant_values=255) for x in row], axis=1))
    return Image.fromarray(np.concatenate(rows, axis=0))


def save_small(img: Image.Image, path: Path) -> None:
    """PNG; quantised to 256 colours if the full-colour one would exceed MAX_BYTES."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    if buf.tell() > MAX_BYTES:
        buf = io.BytesIO()
        img.quantize(256, method=Image.Quantize.MEDIANCUT).save(buf, format="PNG", optimize=True)
    path.write_bytes(buf.getvalue())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, help="a folder of class folders (default: PBC-2500 if found)")
    ap.add_argument("--synthetic", action="store_true", help="use synthetic cells even if PBC is found")
    ap.add_argument("--out", type=Path, default=REPO / "docs", help="writes OUT/augmentations.md and OUT/augmentations/")
    ap.add_argument("--train-size", type=int, default=224, help="data.image_size: the size augmented at")
    ap.add_argument("--size", type=int, default=96, help="the size each cell is shown at in the grid")
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    data = None if args.synthetic else (args.data or find_pbc())
    cells, source = load_cells(data, args.train_size)
    configs = augment_configs(args.train_size)
    report, robust, experiment = configs["report"], configs["stain_robust"], configs["experiment"]
    comments = {**entry_comments(AUGMENT / "report.yaml"), **entry_comments(AUGMENT / "stain_robust.yaml")}
    comments["report"] = "the report's whole augmentation (conf/data/augment/report.yaml), each transform at its own p"
    comments["stain_robust"] = "the whole stain_robust augmentation, each transform at its own p (he_stain off)"
    comments["experiment"] = ("the recommended augmentation, `+experiment=stain_robust` (conf/experiment/stain_robust.yaml), "
                              "each transform at its own p")
    in_experiment = entry_comments(Path(CONF) / "experiment" / "stain_robust.yaml")

    figures: dict[str, A.Compose] = {}
    for name, c in robust.items():
        if name not in report and c is not None:
            figures[name] = single(c)
    for name, c in experiment.items():
        if c is not None and c != robust.get(name):
            shown = name if name not in robust else f"experiment_{name}"
            figures[shown] = single(c)
            comments[shown] = in_experiment.get(name, f"{name} as +experiment=stain_robust sets it")
    figures["report"] = pipeline(report)
    figures["stain_robust"] = pipeline(robust)
    figures["experiment"] = pipeline(experiment)

    folder = args.out / "augmentations"
    folder.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Augmentation previews",
        "",
        f"Rows: {source} (one per class: {', '.join(CLASSES)}), augmented at the training size "
        f"({args.train_size} px, as pixel sizes in the configs mean) and shown at {args.size} px; first column as "
        f"loaded, then {args.draws} random draws. Single transforms are shown at p=1; the pipelines at their configured p.",
        "Configs: `conf/data/augment/report.yaml` (the default), `conf/data/augment/stain_robust.yaml`",
        "(`data/augment=stain_robust`) and the recommendation `conf/experiment/stain_robust.yaml`",
        "(`+experiment=stain_robust`: the report's augmentation with zoom added). Regenerate with",
        "`python experiments/stain_robustness/preview.py` (PBC-2500 cells if found, else synthetic).",
        "",
    ]
    for name, transform in figures.items():
        save_small(grid(cells, transform, args.draws, args.seed, args.size), folder / f"{name}.png")
        lines.append(f"- [`{name}`](augmentations/{name}.png): {comments.get(name, '')}")
        print(folder / f"{name}.png", (folder / f"{name}.png").stat().st_size, "bytes", file=sys.stderr)
    cite = citation_for(data.name if data else "synthetic", synthetic=data is None)
    if cite:
        lines += ["", f"Cells: {cite} Shown reduced and augmented."]
    (args.out / "augmentations.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
