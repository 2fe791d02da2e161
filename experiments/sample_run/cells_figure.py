"""The README's first picture: a few cells of each class from the embedded sample (docs/images/sample_cells.png).

    python experiments/sample_run/cells_figure.py
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from matplotlib.figure import Figure  # noqa: E402
from PIL import Image  # noqa: E402

from leukonet.classes import CLASSES  # noqa: E402
from leukonet.data.embedded_sample import ROOT  # noqa: E402

PER_CLASS = 6


def main(out: Path = REPO / "docs" / "images" / "sample_cells.png") -> None:
    fig = Figure(figsize=(0.85 * 2 * len(CLASSES), 0.85 * 3 + 0.45), layout="constrained")
    axes = fig.subplots(3, len(CLASSES) * 2, squeeze=False)  # 3 rows x (2 per class) = 6 cells a class
    for col, name in enumerate(CLASSES):
        files = sorted((ROOT / name).glob("*.jpg"))[:PER_CLASS]
        for i, f in enumerate(files):
            ax = axes[i // 2, 2 * col + i % 2]
            with Image.open(f) as im:
                ax.imshow(im.resize((112, 112)))
        axes[0, 2 * col].set_title(name, fontsize=9, loc="left")
    for ax in axes.ravel():
        ax.set_axis_off()
    fig.suptitle("The embedded sample: 100 real cells a class (PBC, Acevedo et al. 2020, CC BY 4.0)", fontsize=9)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out} ({out.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
