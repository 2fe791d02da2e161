"""Do the suggested cells miss the lab's rare classes, and does anchoring each predicted class on its most confident
cell fix that? Label-free: which true classes the picks of ``leukonet.adapt.suggest.rank`` hold (uncertain cells
within each predicted class, the command's) against the same ranking whose first pick in each predicted class is the
cell the model is surest of (``anchored``), on each seed's adaptation pool as in ``../bench.py``. Nothing is trained:
a ranking that does not reach the rare cells cannot teach them.

    python experiments/adapt/probes/anchored_picks.py outputs/adapt/source-short-seed0/checkpoints/last.ckpt
    # 20 s; anchored_picks.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent)]

from bench import data_folder, ood, probabilities, target_halves  # noqa: E402
from leukonet.adapt.suggest import diverse_uncertain, rank  # noqa: E402
from leukonet.classes import CLASSES  # noqa: E402
from leukonet.provenance import machine, portable_path  # noqa: E402
from leukonet.training.model import CellClassifier  # noqa: E402


def anchored(feats: torch.Tensor, probs: np.ndarray, n: int, seed: int = 0) -> list[int]:
    """The most confident cell first, then ``diverse_uncertain`` over the others."""
    first = int(np.argmax(probs.max(1)))
    rest = np.setdiff1d(np.arange(len(feats)), [first])
    if min(n, len(feats)) == 1:
        return [first]
    return [first, *rest[diverse_uncertain(feats[torch.as_tensor(rest)], probs[rest], n - 1, seed)].tolist()]


def main() -> None:
    ckpt = Path(sys.argv[1])
    data = data_folder(None)
    model = CellClassifier.from_checkpoint(ckpt)
    out = {"checkpoint": portable_path(ckpt), "machine": machine(), "classes": list(CLASSES), "labs": {},
           "command": f"python experiments/adapt/probes/anchored_picks.py {portable_path(ckpt)}"}
    for lab, seed, pool, _ in target_halves(data, model.hparams.image_size, (0, 1, 2)):
        y, f = pool.labels, ood.features(model, pool.images)
        probs = probabilities(model, f)
        for k in (5, 10):
            budget = sum(min(k, int((y == c).sum())) for c in range(len(CLASSES)))
            out["labs"].setdefault(lab, []).append({
                "seed": seed, "k": k, "pool": np.bincount(y, minlength=5).tolist(),
                "uncertain": np.bincount(y[rank(f, probs, budget, seed)], minlength=5).tolist(),
                "anchored": np.bincount(y[rank(f, probs, budget, seed, within=anchored)], minlength=5).tolist()})
            print(lab, out["labs"][lab][-1], flush=True)
    HERE.joinpath("anchored_picks.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
