"""Why a head re-fit loses on another lab even before any of its cells joins: the head re-fitted on the training
cells alone (no target cell), from their clean features (what ``leukonet.adapt.head`` trains on) or from views
augmented as in training (the run's own ``data.augment``: rotation, crop, flips, perspective, colour, zoom 1-3x),
scored on all of BCCD's cells (MIT). 150 steps of 128 cells, AdamW lr 1e-3, as the command's head fit.

    python experiments/adapt/probes/source_refit.py outputs/adapt/source-short-seed0/checkpoints/last.ckpt   # source_refit.json
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent)]

from bench import data_folder, labelled_cells, ood, scores, setting  # noqa: E402
from leukonet.data.transforms import train_transform  # noqa: E402
from leukonet.provenance import machine, portable_path  # noqa: E402


def augmented_features(model, source, ckpt: Path, views: int = 1) -> torch.Tensor:
    """The training cells' features from ``views`` views of each (view-major), augmented as the checkpoint's run
    trained (its ``data.augment``), seeded."""
    config = OmegaConf.load(ckpt.resolve().parents[1] / ".hydra" / "config.yaml")
    augment = train_transform(instantiate(config.data.augment), model.hparams.image_size)
    augment.set_random_seed(0)  # albumentations' own generator: the views are the same every run
    return ood.features(model, torch.stack([augment(image=im.permute(1, 2, 0).numpy())["image"]
                                            for _ in range(views) for im in source.images])).clone()


def main() -> None:
    ckpt = Path(sys.argv[1])
    data = data_folder(Path(sys.argv[2]) if len(sys.argv) > 2 else None)
    model, source, _ = setting(ckpt, data)
    bccd, _ = labelled_cells(data / "bccd-crops", model.hparams.image_size)
    bccd_feats = ood.features(model, bccd.images)

    def score(m) -> dict:
        s = scores(m, bccd_feats, bccd.labels)
        return {k: round(s[k], 4) for k in ("accuracy", "balanced_accuracy")}

    augmented = augmented_features(model, source, ckpt, views=4)
    clean, y = ood.features(model, source.images).clone(), torch.as_tensor(source.labels)
    out = {"checkpoint": portable_path(ckpt), "machine": machine(), "bccd_cells": len(bccd),
           "command": f"python experiments/adapt/probes/source_refit.py {portable_path(ckpt)}", "no_refit": score(model)}
    for name, (x, t) in {"clean": (clean, y), "augmented_1_view": (augmented[: len(source)], y),
                         "augmented_4_views": (augmented, y.repeat(4))}.items():
        m = copy.deepcopy(model)
        optimizer = torch.optim.AdamW(m.head.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.01)
        g = torch.Generator().manual_seed(0)
        torch.manual_seed(0)  # the head's dropout
        m.head.train()
        for _ in range(150):
            i = torch.randint(len(x), (128,), generator=g)
            loss = F.cross_entropy(m.head(x[i]).float(), t[i])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        m.head.eval()
        out[f"refit_{name}"] = score(m)
        print(name, out[f"refit_{name}"], "no refit", out["no_refit"], flush=True)
    (HERE / "source_refit.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
