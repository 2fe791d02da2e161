"""Which of a lab's unlabelled cells to label first: ``python -m leukonet.adapt.suggest ckpt_path=CKPT
target.root=DIR n=40`` writes ``to_label.csv`` (rank, path, the model's guess) and ``to_label.png`` (a contact
sheet in that order) into the run directory.

Diversity first, then uncertainty: the cells' features (of the checkpoint given, best one already adapted
without labels) are grouped into ``n`` clusters (k-means on unit-length features), largest first; from each,
the most uncertain (highest entropy) of the half of its cells nearest its centre. A few labels spread over
every kind of cell the lab has teach more than many of one kind (Hacohen et al. 2022, "Active learning on a
budget"), and within a kind, a cell the model hesitates on teaches more than one it already gets.
Cells already in ``target.labels`` are left out. ``experiments/adapt/`` compares it with random picks.
"""

from __future__ import annotations

import csv
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


def rank(feats: torch.Tensor, probs: np.ndarray, n: int, seed: int = 0) -> list[int]:
    """Indices of ``n`` cells to label, in the order to label them."""
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
