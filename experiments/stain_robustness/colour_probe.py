"""What does a PBC-trained model's call on another lab's cells hang on? Change the external crops, then score them.

With zoom, BCCD's eosinophils are still called neutrophils (16 % recall at the full budget). This script scores a
trained checkpoint on an image folder after one change at a time, with recall per class, to tell the suspects
apart: the hue (BCCD's leukocytes sit 7-26° below PBC's), the saturation (about half PBC's), the detail
(the zoomed training cells carry fewer pixels than BCCD's), the colour of the whole set (the external set's
pooled CIE-LAB mean and spread set to the reference set's, one mapping for all its images, unlike per-image
Reinhard normalisation, which lets a cell's own colour move its mapping), and the amount of each stain (each crop's
violet and pink concentrations, from RomanowskyStainJitter's colour deconvolution, scaled so their 99th percentiles
are the reference set's median: BCCD's nuclei hold about half PBC's violet). It also tabulates the leukocytes' hue
and saturation per class in both sets. It diagnoses; none of these changes is offered as a fix, since each is
tuned by looking at the external set.

    python experiments/stain_robustness/colour_probe.py --ckpt RUN/checkpoints/best.ckpt [RUN2/...]

Writes ``results.json`` and ``results.md`` in ``--out`` (default: ``colour_probe/`` here).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(REPO), str(HERE)]  # leukonet from this checkout (also without an editable install); zoom_out.py

from leukonet.classes import CLASSES  # noqa: E402
from leukonet.data.transforms import stain_basis, stain_concentrations, stained_image  # noqa: E402
from leukonet.provenance import portable_text  # noqa: E402
from leukonet.training.model import CellClassifier  # noqa: E402
from zoom_out import load_folder, save_json, score  # noqa: E402  (the scoring of zoom_out.py)

HUES = (-40.0, -20.0, 20.0, 27.0, 40.0)  # degrees on the hue circle
SATURATIONS = (0.5, 1.5, 2.0)
DETAIL = (2.0, 3.0)  # each crop shrunk by the factor and enlarged back: that much less detail


def shift_hue_saturation(image: np.ndarray, degrees: float = 0.0, saturation: float = 1.0) -> np.ndarray:
    """``image`` with its hue turned by ``degrees`` and its saturation times ``saturation`` (HSV in float: no rounding)."""
    hsv = cv2.cvtColor(image.astype(np.float32) / 255, cv2.COLOR_RGB2HSV)
    hsv[..., 0] = (hsv[..., 0] + degrees) % 360
    hsv[..., 1] = np.clip(hsv[..., 1] * saturation, 0, 1)
    return np.rint(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB) * 255).clip(0, 255).astype(np.uint8)


def less_detail(image: np.ndarray, factor: float) -> np.ndarray:
    """``image`` shrunk ``factor`` times and enlarged back to its size (bilinear): its finest detail gone."""
    h, w = image.shape[:2]
    small = Image.fromarray(image).resize((max(1, round(w / factor)), max(1, round(h / factor))),
                                          Image.Resampling.BILINEAR, reducing_gap=2.0)
    return np.asarray(small.resize((w, h), Image.Resampling.BILINEAR))


def lab_stats(images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of CIE-LAB (OpenCV's 8-bit scaling) over every pixel of ``images``."""
    total, squares, n = np.zeros(3), np.zeros(3), 0
    for im in images:
        lab = cv2.cvtColor(im, cv2.COLOR_RGB2LAB).reshape(-1, 3).astype(np.float64)
        total, squares, n = total + lab.sum(0), squares + (lab**2).sum(0), n + len(lab)
    mean = total / n
    return mean, np.sqrt(squares / n - mean**2)


def match_lab(image: np.ndarray, source: tuple[np.ndarray, np.ndarray], target: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """``image``'s LAB values moved from the ``source`` set's mean and spread to the ``target`` set's."""
    lab = cv2.cvtColor(image, cv2.COLOR_RGB2LAB).astype(np.float64)
    lab = (lab - source[0]) / source[1] * target[1] + target[0]
    return cv2.cvtColor(np.rint(lab).clip(0, 255).astype(np.uint8), cv2.COLOR_LAB2RGB)


BASIS = stain_basis()  # violet, pink and residual OD vectors of RomanowskyStainJitter's colour deconvolution
INVERSE = np.linalg.inv(BASIS)  # float64: a diagnostic, not a hot path


def stain_levels(image: np.ndarray) -> np.ndarray:
    """99th percentile of the violet and of the pink concentration: how much of each stain the darkest parts hold."""
    return np.percentile(stain_concentrations(image, INVERSE)[:, :2], 99, axis=0)


def match_stain(image: np.ndarray, target: np.ndarray) -> np.ndarray:
    """``image`` with each stain's concentration scaled so its 99th percentile is ``target``'s (residual kept)."""
    conc = stain_concentrations(image, INVERSE)
    conc[:, :2] *= target / np.maximum(np.percentile(conc[:, :2], 99, axis=0), 1e-3)
    return stained_image(conc, BASIS, image.shape)


def circular_mean(degrees: np.ndarray, weights: np.ndarray | None = None) -> float:
    """The (weighted) mean direction of angles in degrees, in [0, 360); 0 where every weight is 0."""
    angle, w = np.radians(degrees), np.ones_like(degrees) if weights is None else weights
    return float(np.degrees(np.arctan2((np.sin(angle) * w).sum(), (np.cos(angle) * w).sum())) % 360)


def hue_and_saturation(image: np.ndarray, centre: float) -> tuple[float, float]:
    """Saturation-weighted circular mean hue (degrees) and mean saturation (0-1) of the central ``centre`` of ``image``
    (its share of the width and height), where the leukocyte is."""
    h, w = image.shape[:2]
    dh, dw = round(h * centre / 2), round(w * centre / 2)
    hsv = cv2.cvtColor(image[h // 2 - dh : h // 2 + dh, w // 2 - dw : w // 2 + dw].astype(np.float32) / 255, cv2.COLOR_RGB2HSV)
    return circular_mean(hsv[..., 0], weights=hsv[..., 1]), float(hsv[..., 1].mean())


def colour_by_class(images: list[np.ndarray], labels: list[int], centre: float) -> dict[int, dict[str, float]]:
    """Per class: the mean over its images of :func:`hue_and_saturation` (hue averaged on the circle)."""
    out = {}
    for c in sorted(set(labels)):
        hs = np.array([hue_and_saturation(im, centre) for im, y in zip(images, labels) if y == c])
        out[c] = {"hue": round(circular_mean(hs[:, 0]), 1), "saturation": round(float(hs[:, 1].mean()), 3), "n": len(hs)}
    return out


def changes(external: list[np.ndarray], reference: list[np.ndarray],
            levels: np.ndarray) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """Each probe by name: the crops as they are, then one change at a time (``levels``: the reference's stain levels)."""
    source, target = lab_stats(external), lab_stats(reference)
    return {
        "as is": lambda im: im,
        **{f"hue {d:+g}°": (lambda im, d=d: shift_hue_saturation(im, degrees=d)) for d in HUES},
        **{f"saturation x{s:g}": (lambda im, s=s: shift_hue_saturation(im, saturation=s)) for s in SATURATIONS},
        **{f"detail /{f:g}": (lambda im, f=f: less_detail(im, f)) for f in DETAIL},
        "set colour matched to the reference": lambda im: match_lab(im, source, target),
        "stain amounts matched to the reference": lambda im: match_stain(im, levels),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=Path, nargs="+", required=True, help="checkpoints to score")
    shared = Path(os.environ.get("LEUKONET_DATA") or REPO.parent / "shared" / "data")
    p.add_argument("--data", type=Path, default=shared / "bccd-crops", help="the external set, class per folder (default: %(default)s)")
    p.add_argument("--reference", type=Path, default=shared / "pbc-2500",
                   help="the training set, for the set-wide colour match (default: %(default)s)")
    p.add_argument("--reference-images", type=int, default=300, help="images of --reference drawn (seed 0) for its colour")
    p.add_argument("--centre", type=float, nargs=2, default=[0.8, 0.3], metavar=("DATA", "REFERENCE"),
                   help="share of each crop's width and height measured for the colour table: about the leukocyte's "
                        "(BCCD's crops: 70-90 %%, PBC's: about a third; default: %(default)s)")
    p.add_argument("--out", type=Path, default=HERE / "colour_probe")
    args = p.parse_args(argv)
    for name, folder in (("--data", args.data), ("--reference", args.reference)):
        if not folder.is_dir():
            raise SystemExit(f"{name} {folder}: not a folder (set LEUKONET_DATA or pass {name})")

    images, labels = load_folder(args.data)
    reference, reference_labels = load_folder(args.reference)
    picked = np.random.default_rng(0).choice(len(reference), min(args.reference_images, len(reference)), replace=False)
    levels = {"data": np.median([stain_levels(im) for im in images], axis=0),
              "reference": np.median([stain_levels(reference[i]) for i in picked], axis=0)}
    probes = changes(images, [reference[i] for i in picked], levels["reference"])
    colour = {"data": colour_by_class(images, labels.tolist(), args.centre[0]),
              "reference": colour_by_class([reference[i] for i in picked], reference_labels[picked].tolist(), args.centre[1])}
    results = {"data": str(args.data), "n": len(images), "reference": str(args.reference), "reference_images": len(picked),
               "colour": {k: {CLASSES[c]: v for c, v in by.items()} for k, by in colour.items()}, "centre": args.centre,  # folder labels index CLASSES
               "stain_levels": {k: dict(zip(("violet", "pink"), np.round(v, 3).tolist())) for k, v in levels.items()},
               "checkpoints": {}}
    for ckpt in args.ckpt:
        model = CellClassifier.from_checkpoint(ckpt)
        rows = results["checkpoints"][str(ckpt)] = {}
        for name, change in probes.items():
            rows[name] = score(model, images, labels, change)
            print(ckpt, name, round(rows[name]["balanced_accuracy"], 3),
                  {c: round(r, 2) for c, r in rows[name]["recall"].items()}, flush=True)
    save_json(results, args.out, Path(__file__), argv)
    lines = ["# What the calls on external crops hang on", "",
             f"Balanced accuracy, accuracy and recall per class (%) on `{args.data.name}` (n={len(images)}) after one "
             f"change to every crop; the set-wide colour match and the stain amounts use {len(picked)} images of `{args.reference.name}`.", "",
             f"- Command: `{results['command']}`", f"- Machine: {results['machine']}", "",
             f"Colour of the leukocytes (central {args.centre[0]:g} of `{args.data.name}`'s crops, {args.centre[1]:g} of "
             f"`{args.reference.name}`'s): saturation-weighted mean hue (degrees) and mean saturation (0-1) per class", "",
             f"| class | hue, {args.data.name} | hue, {args.reference.name} | saturation, {args.data.name} | "
             f"saturation, {args.reference.name} |", "|---|---:|---:|---:|---:|"]
    ext, ref = results["colour"]["data"], results["colour"]["reference"]
    lines += [f"| {c} | {ext[c]['hue']:.0f} | {ref[c]['hue']:.0f} | {ext[c]['saturation']:.2f} | {ref[c]['saturation']:.2f} |"
              for c in CLASSES if c in ext and c in ref]
    sl = results["stain_levels"]
    lines += ["", "Stain levels (99th percentile of each crop's violet and pink concentration, in OD, median over the crops): "
              f"`{args.data.name}` violet {sl['data']['violet']:.2f}, pink {sl['data']['pink']:.2f}; `{args.reference.name}` "
              f"violet {sl['reference']['violet']:.2f}, pink {sl['reference']['pink']:.2f}", ""]
    classes = list(next(iter(next(iter(results["checkpoints"].values())).values()))["recall"])
    for ckpt, rows in results["checkpoints"].items():
        lines += [f"`{ckpt}`", "", "| change | balanced acc | acc | " + " | ".join(classes) + " |",
                  "|---|---:|---:|" + "---:|" * len(classes)]
        lines += [f"| {name} | {100 * r['balanced_accuracy']:.1f} | {100 * r['accuracy']:.1f} | "
                  + " | ".join(f"{100 * r['recall'][c]:.0f}" for c in classes) + " |" for name, r in rows.items()]
        lines.append("")
    (args.out / "results.md").write_text(portable_text("\n".join(lines), REPO))
    return results


if __name__ == "__main__":
    main()
