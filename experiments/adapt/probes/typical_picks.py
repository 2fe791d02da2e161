"""With fewer labels than the network's fine-tuning floor (the head alone re-fitted), which cells should a lab
label: the most uncertain of each cluster (the command's pick today), or the most typical (TypiClust, Hacohen et
al. 2022: at a low budget, typical cells teach more than hard ones)? Both spread over the predicted classes as
``leukonet.adapt.suggest.rank`` does; random k of each class (the labels' oracle) beside them. Same pools, held-out
halves and head fit as ``experiments/adapt/bench.py`` (``fit_to_lab`` with ``method=finetune``: under 30 labelled
cells it re-fits only the head).

    python experiments/adapt/probes/typical_picks.py outputs/adapt/source-short-seed0/checkpoints/last.ckpt
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.cluster import KMeans

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent)]

from bench import (METHODS, Adapted, backbone_step, data_folder, ood, probabilities, setting,  # noqa: E402
                   target_halves, write_probe)
from leukonet.adapt.cells import per_class  # noqa: E402
from leukonet.adapt.suggest import diverse_uncertain, rank  # noqa: E402
from leukonet.classes import CLASSES  # noqa: E402


def most_typical(feats: torch.Tensor, probs: np.ndarray, n: int, seed: int = 0) -> list[int]:
    """One cell a k-means cluster (largest first): the one with the highest typicality (inverse mean distance to
    its nearest neighbours in the cluster, at most 20; TypiClust)."""
    n = min(n, len(feats))
    x = torch.nn.functional.normalize(feats.float(), dim=1).numpy()
    kmeans = KMeans(n_clusters=n, n_init=4, random_state=seed).fit(x)
    picks = []
    for c in np.argsort(-np.bincount(kmeans.labels_, minlength=n), kind="stable"):
        members = np.flatnonzero(kmeans.labels_ == c)
        d = np.linalg.norm(x[members, None] - x[None, members], axis=2)
        near = np.sort(d, axis=1)[:, 1: min(20, len(members) - 1) + 1]
        typicality = 1 / (near.mean(1) + 1e-9) if near.size else np.ones(len(members))
        picks.append(int(members[np.argmax(typicality)]))
    return picks


def main() -> None:
    ckpt = Path(sys.argv[1])
    data = data_folder(Path(sys.argv[2]) if len(sys.argv) > 2 else None)
    seeds, ks = (0, 1, 2), (1, 3, 5)
    started = time.perf_counter()
    model, source, pbc = setting(ckpt, data)
    method = METHODS["finetune"]
    rows: dict[str, dict[str, list[dict]]] = {}
    for name, seed, pool, test in target_halves(data, model.hparams.image_size, seeds):
        free = Adapted(model, source, pool, test, pbc, backbone_step(method), probabilities(model, ood.features(model, pool.images)), {})
        probs = probabilities(free.model, free.on)
        for k in ks:
            budget = sum(min(k, int((pool.labels == c).sum())) for c in range(len(CLASSES)))
            picks = {"random": per_class(pool.labels, k, seed), "none": np.array([], int),
                     "uncertain": np.array(rank(free.on, probs, budget, seed)),
                     "typical": np.array(rank(free.on, probs, budget, seed, within=most_typical)),
                     "uncertain_unspread": np.array(diverse_uncertain(free.on, probs, budget, seed))}
            for strategy, chosen in picks.items():
                if strategy == "none" and k != ks[0]:
                    continue
                labels = np.full(len(pool), -1)
                labels[chosen] = pool.labels[chosen]
                row = free.row(method, labels, seed)
                row["picked_classes"] = np.bincount(pool.labels[chosen], minlength=len(CLASSES)).tolist()
                key = "none" if strategy == "none" else f"k{k}/{strategy}"
                rows.setdefault(name, {}).setdefault(key, []).append(row)
                t = row["target"]
                print(f"{name} seed {seed} {key}: accuracy {t['accuracy']:.3f}, balanced {t['balanced_accuracy']:.3f}, "
                      f"picked {row['picked_classes']}", flush=True)
    write_probe(HERE / "typical_picks.json", ckpt, seeds, rows, started)


if __name__ == "__main__":
    main()
