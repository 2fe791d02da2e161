"""Can the scale gap be closed at test time? Shrink each external crop by padding it, then score it.

BCCD's crops frame the leukocyte 2-3x as large as PBC's (the zoom finding of the ablation). The obvious
training-free fix is to pad each external crop to 1.5-3x its side before the usual resize, so the cell
takes the share of the picture it has in the training crops. This script measures that on trained
checkpoints: balanced accuracy and accuracy on an image folder for each padding factor, padding by
reflection (as the augmentations fill edges) and by the crop's background colour (95th percentile).

    python experiments/stain_robustness/zoom_out.py \\
        --ckpt outputs/stain_robustness/medium/baseline/seed0/checkpoints/best.ckpt \\
               outputs/stain_robustness/medium/zoom_stain_reinhard/seed0/checkpoints/best.ckpt

Writes ``results.json`` and ``results.md`` in ``--out`` (default: ``zoom_out/`` here).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_recall

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))  # leukonet from this checkout, also without an editable install

from leukonet.data.folder import load_rgb, resize_square, scan_folder  # noqa: E402
from leukonet.data.transforms import eval_transform  # noqa: E402
from leukonet.provenance import machine, portable_text  # noqa: E402
from leukonet.training.model import CellClassifier  # noqa: E402

MODES = ("reflect", "background")


def zoom_out(image: np.ndarray, factor: float, mode: str) -> np.ndarray:
    """``image`` centred in a square ``factor`` times its longer side, the border filled by ``mode``."""
    h, w = image.shape[:2]
    side = round(max(h, w) * factor)
    top, left = (side - h) // 2, (side - w) // 2
    border = (top, side - h - top, left, side - w - left)
    if mode == "reflect":
        return cv2.copyMakeBorder(image, *border, cv2.BORDER_REFLECT_101)
    background = np.percentile(image.reshape(-1, 3), 95, axis=0)  # the brightest: the slide between cells
    return cv2.copyMakeBorder(image, *border, cv2.BORDER_CONSTANT, value=[int(v) for v in background])


def shrink(image: np.ndarray, size: int) -> np.ndarray:
    """Resized to ``size`` x ``size`` as the data module's decoding does (so x1 scores as evaluate)."""
    return np.array(resize_square(Image.fromarray(image), size))


@torch.no_grad()
def score(model: CellClassifier, images: list[np.ndarray], labels: torch.Tensor,
          change: Callable[[np.ndarray], np.ndarray]) -> dict:
    """Balanced accuracy, accuracy and recall per class of ``model`` on ``images``, each changed by ``change``
    at its own size, then resized as evaluate does."""
    size = model.hparams.image_size
    transform = eval_transform(size)
    x = torch.stack([transform(image=shrink(change(im), size))["image"] for im in images])
    preds = torch.cat([model(x[i : i + 64]).argmax(1) for i in range(0, len(x), 64)])
    n = len(model.hparams.class_names)
    recall = multiclass_recall(preds, labels, n, average=None).tolist()
    return {"balanced_accuracy": multiclass_accuracy(preds, labels, n, average="macro").item(),
            "accuracy": multiclass_accuracy(preds, labels, n, average="micro").item(),
            "recall": dict(zip(model.hparams.class_names, recall))}


def load_folder(data: Path) -> tuple[list[np.ndarray], torch.Tensor]:
    """Every readable image of a class-per-folder set at its own size, with its label (unreadable ones: named, skipped)."""
    images, labels = [], []
    for e in scan_folder(data).entries:
        try:
            images.append(load_rgb(data / e.path))
            labels.append(e.label)
        except ValueError as err:
            print(f"skipped {err}", file=sys.stderr)
    return images, torch.tensor(labels)


def save_json(results: dict, out: Path, script: Path, argv: list[str] | None) -> None:
    """``results`` with the machine and the command that made them, written to ``out/results.json``."""
    results["machine"] = machine()
    results["command"] = shlex.join(["python", str(script.resolve().relative_to(REPO)), *(argv if argv is not None else sys.argv[1:])])
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(portable_text(json.dumps(results, indent=2) + "\n", REPO))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=Path, nargs="+", required=True, help="checkpoints to score")
    p.add_argument("--data", type=Path, default=None,
                   help="class-per-folder images (default: bccd-crops in $LEUKONET_DATA or ../shared/data)")
    p.add_argument("--factors", type=float, nargs="+", default=[1.0, 1.5, 2.0, 2.5, 3.0])
    p.add_argument("--out", type=Path, default=HERE / "zoom_out")
    args = p.parse_args(argv)
    data = args.data or Path(os.environ.get("LEUKONET_DATA") or REPO.parent / "shared" / "data") / "bccd-crops"
    if not data.is_dir():
        raise SystemExit(f"--data {data}: not a folder (set LEUKONET_DATA or pass --data)")
    if any(f < 1 for f in args.factors):
        raise SystemExit(f"--factors {args.factors}: each must be at least 1 (1: the crop as it is)")

    images, labels = load_folder(data)
    results = {"data": str(data), "n": len(images), "factors": args.factors, "modes": list(MODES), "checkpoints": {}}
    for ckpt in args.ckpt:
        model = CellClassifier.from_checkpoint(ckpt)
        rows = results["checkpoints"][str(ckpt)] = {}
        for mode in MODES:
            rows[mode] = {str(f): score(model, images, labels, lambda im, f=f, mode=mode: zoom_out(im, f, mode)) for f in args.factors}
            print(ckpt, mode, {f: round(r["balanced_accuracy"], 3) for f, r in rows[mode].items()}, flush=True)
    save_json(results, args.out, Path(__file__), argv)
    lines = ["# Test-time zoom-out on external crops", "",
             f"Balanced accuracy (accuracy) on `{data.name}` (n={len(images)}) with each crop padded to the factor "
             "times its side before the model's resize; 1 = the crop as it is.", "",
             f"- Command: `{results['command']}`", f"- Machine: {results['machine']}", "",
             "| checkpoint | padding | " + " | ".join(f"x{f:g}" for f in args.factors) + " |",
             "|---|---|" + "---:|" * len(args.factors)]
    for ckpt, rows in results["checkpoints"].items():
        for mode, by_factor in rows.items():
            lines.append(f"| `{ckpt}` | {mode} | " + " | ".join(
                f"{100 * r['balanced_accuracy']:.1f} ({100 * r['accuracy']:.1f})" for r in by_factor.values()) + " |")
    (args.out / "results.md").write_text(portable_text("\n".join(lines) + "\n", REPO))
    return results


if __name__ == "__main__":
    main()
