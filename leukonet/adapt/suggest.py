"""Which of a lab's unlabelled cells to label first: ``python -m leukonet.adapt.suggest ckpt_path=CKPT
target.root=DIR n=40`` writes ``to_label.csv`` (rank, path, the model's guess) and ``to_label.png`` (a contact
sheet in that order) into the run directory.

Spread over the predicted classes, then diversity, then uncertainty: the budget is shared equally over the classes
the model predicts; within each, the cells' features (of the checkpoint given, best one already adapted without
labels) are grouped into as many clusters as it has picks (k-means on unit-length features), largest first; from
each, the most uncertain (highest entropy) of the half of its cells nearest its centre. A few labels spread over
every kind of cell the lab has teach more than many of one kind (Hacohen et al. 2022, "Active learning on a
budget"), and within a kind, a cell the model hesitates on teaches more than one it already gets.
Cells already in ``target.labels`` are left out. ``experiments/adapt/`` compares it with random picks.
"""

from __future__ import annotations

import csv
import itertools
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from sklearn.cluster import KMeans

from leukonet.adapt import head
from leukonet.adapt.cells import read_labels, target_cells
from leukonet.errors import DataError, RunExistsError, exit_on_user_error
from leukonet.inference import ood
from leukonet.inference.report import plot_gallery
from leukonet.train import CONF
from leukonet.training.model import CellClassifier


def quotas(counts: np.ndarray, n: int) -> np.ndarray:
    """``n`` shared over classes as equally as their ``counts`` allow (what a class lacks goes to the others)."""
    quota = np.zeros(len(counts), int)
    while quota.sum() < min(n, counts.sum()):
        open_ = np.flatnonzero(quota < counts)
        share = max(1, (n - quota.sum()) // len(open_))
        for c in open_[np.argsort(-(counts[open_] - quota[open_]), kind="stable")]:
            if quota.sum() >= n:
                break
            quota[c] += min(share, counts[c] - quota[c])
    return quota


def diverse_uncertain(feats: torch.Tensor, probs: np.ndarray, n: int, seed: int = 0) -> list[int]:
    """Indices of ``n`` cells: one a k-means cluster (largest first), the most uncertain of its central half."""
    n = min(n, len(feats))
    x = torch.nn.functional.normalize(feats.float(), dim=1).numpy()
    kmeans = KMeans(n_clusters=n, n_init=4, random_state=seed).fit(x)
    distance = np.linalg.norm(x - kmeans.cluster_centers_[kmeans.labels_], axis=1)
    entropy = -(probs * np.log(np.clip(probs, 1e-12, None))).sum(1)
    picks = []
    sizes = np.bincount(kmeans.labels_, minlength=n)
    for c in np.argsort(-sizes, kind="stable"):
        members = np.flatnonzero(kmeans.labels_ == c)
        central = members[np.argsort(distance[members], kind="stable")][: max(1, (len(members) + 1) // 2)]
        picks.append(int(central[np.argmax(entropy[central])]))
    return picks


def rank(feats: torch.Tensor, probs: np.ndarray, n: int, seed: int = 0, within=diverse_uncertain) -> list[int]:
    """Indices of ``n`` cells to label, in the order to label them: the budget shared equally over the classes the
    model predicts (``quotas``), ``within`` each (``diverse_uncertain``; ``experiments/adapt/probes/typical_picks.py``
    tries the most typical cells), then one of each class in turn (most predicted first), so that any first few of the
    list still span the classes. Without the spread, clusters follow what the
    model finds hard: 16-19 of BCCD's 41 picks were eosinophils, 4-6 lymphocytes (``experiments/adapt/probes/``);
    spread, 10 a class beat random ones in accuracy on both labs (``experiments/adapt/full_suggest/``)."""
    predicted = probs.argmax(1)
    counts = np.bincount(predicted, minlength=probs.shape[1])
    quota = quotas(counts, n)
    per_class = []
    for c in np.argsort(-counts, kind="stable"):
        members = np.flatnonzero(predicted == c)
        if quota[c]:
            picks = within(feats[torch.as_tensor(members)], probs[members], int(quota[c]), seed)
            per_class.append(members[picks].tolist())
    return [i for turn in itertools.zip_longest(*per_class) for i in turn if i is not None]


def suggest(cfg: DictConfig) -> list[dict]:
    out_dir = Path(cfg.paths.output_dir)
    out_csv, out_png = out_dir / "to_label.csv", out_dir / "to_label.png"
    if out_csv.exists():
        raise RunExistsError(f"{out_csv} exists; choose another hydra.run.dir=...")
    if int(cfg.n) < 1:
        raise DataError(f"n must be at least 1, got {cfg.n}")
    ckpt = Path(cfg.ckpt_path)
    if not ckpt.is_file():
        raise DataError(f"ckpt_path={ckpt} does not exist")
    model = CellClassifier.from_checkpoint(ckpt)
    cells = target_cells(cfg.target, model.hparams.image_size, min_cells=1)
    known = read_labels(cfg.target.labels, cells) >= 0 if cfg.target.get("labels") else np.zeros(len(cells), bool)
    open_cells = np.flatnonzero(~known)
    if not len(open_cells):
        raise DataError("every target cell is already labelled")
    feats = ood.features(model, cells.images[torch.as_tensor(open_cells)])
    probs = torch.softmax(head.logits(model, feats) / model.temperature, 1).numpy()
    names = model.hparams.class_names
    rows = []
    for r, i in enumerate(rank(feats, probs, int(cfg.n), int(cfg.seed)), start=1):
        p = probs[i]
        rows.append({"rank": r, "path": str(cells.paths[open_cells[i]]), "label": "",
                     "model_guess": names[int(p.argmax())], "confidence": round(float(p.max()), 4)})
    out_dir.mkdir(parents=True, exist_ok=True)
    with out_csv.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot_gallery(out_png, [(r["path"], f"#{r['rank']}: {r['model_guess']}?\n({r['confidence']:.0%})") for r in rows],
                 title=f"Cells to label first ({len(rows)}), in order; the model's guess")
    print(f"{len(rows)} cells to label: {out_csv} (fill in the label column; then "
          f"python -m leukonet.adapt ... target.labels={out_csv}) and the contact sheet {out_png}")
    return rows


@hydra.main(version_base="1.3", config_path=CONF, config_name="suggest")
def main(cfg: DictConfig) -> None:
    exit_on_user_error(lambda: suggest(cfg))


if __name__ == "__main__":
    main()
