"""Frame every cell the same way, in training and test, instead of teaching scale with zoom?

PBC's crops show the leukocyte across about 36 % of the width, BCCD's across 60-70 %: zoom augmentation teaches the
model the second framing. This script tries the deterministic alternative: it writes copies of both sets in which
each image is re-cropped around its main cell (``leukonet.data.cells``, as ``predict`` crops fields) so the cell spans
``--fraction`` of the width, and the seed-42 split of the originals (same images, ``.png`` names). An image in
which no cell is found (a nucleus cut by the crop's edge: 53 of BCCD's 351, none of PBC's) is kept whole.

    python experiments/stain_robustness/reframe.py --fraction 0.65      # -> outputs/stain_robustness/reframed-0.65/
    python experiments/stain_robustness/ablation.py --data outputs/stain_robustness/reframed-0.65 \\
        --override data.split_file=outputs/stain_robustness/reframed-0.65/split.csv ...

Re-cropping removes what absolute size says about the class in both sets, like ``predict``'s field crops.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import cv2

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(REPO), str(HERE)]  # leukonet from this checkout (also without an editable install); ablation.py

from ablation import data_folder  # noqa: E402
from leukonet.data.cells import crop_cell, find_cells, main_cell  # noqa: E402
from leukonet.data.datamodule import CellDataModule  # noqa: E402
from leukonet.data.folder import load_rgb, scan_folder  # noqa: E402
from leukonet.data.split import write_split  # noqa: E402

SIDE = 256  # pixels of each written crop; training resizes to data.image_size


def reframe(image, fraction: float):
    """``image`` re-cropped so its main cell spans ``fraction`` of the width (whole, resized, when none is found)."""
    cell = main_cell(image, find_cells(image))
    if cell is None:
        return cv2.resize(image, (SIDE, SIDE), interpolation=cv2.INTER_AREA if min(image.shape[:2]) > SIDE else cv2.INTER_LINEAR), False
    return crop_cell(image, cell, fraction, out_size=SIDE), True


def write_set(source: Path, target: Path, fraction: float) -> dict:
    found = kept_whole = 0
    for e in scan_folder(source).entries:
        try:
            image = load_rgb(source / e.path)
        except ValueError as err:  # named and skipped, as training does
            print(f"[reframe] skipped {err}", file=sys.stderr)
            continue
        crop, ok = reframe(image, fraction)
        found, kept_whole = found + ok, kept_whole + (not ok)
        out = (target / e.path).with_suffix(".png")
        out.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(out), cv2.cvtColor(crop, cv2.COLOR_RGB2BGR))
    return {"cell_found": found, "kept_whole": kept_whole}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=None, help="folder holding pbc-2500/ and bccd-crops/ "
                   "(default: $LEUKONET_DATA or ../shared/data)")
    p.add_argument("--fraction", type=float, default=0.65, help="share of the width the cell spans (BCCD's median: 0.65)")
    p.add_argument("--out", type=Path, default=None, help="default: outputs/stain_robustness/reframed-<fraction>")
    args = p.parse_args(argv)
    data = data_folder(args.data)
    out = args.out or REPO / "outputs" / "stain_robustness" / f"reframed-{args.fraction:g}"
    if out.exists():
        raise SystemExit(f"{out} exists: remove it or pass another --out (nothing is overwritten)")
    counts = {name: write_set(data / name, out / name, args.fraction) for name in ("pbc-2500", "bccd-crops")}
    dm = CellDataModule(root=str(data / "pbc-2500"))  # the split every ablation run uses (seed 42, near duplicates together)
    dm.setup()
    write_split({s: [replace(e, path=str(Path(e.path).with_suffix(".png"))) for e in dm.splits[s]] for s in dm.splits},
                out / "split.csv")
    (out / "reframe.json").write_text(json.dumps({"fraction": args.fraction, "side": SIDE, "sets": counts}, indent=2) + "\n")
    print(f"[reframe] {out}: {counts}")
    return counts


if __name__ == "__main__":
    main()
