"""Which classes do the suggested cells cover? The cells `python -m leukonet.adapt.suggest n=<k-a-class budget>`
would pick from each seed's adaptation pool (as in ``../bench.py``) against random's k of each class, counted by
their true class: the why behind suggested cells' lower all-class balanced accuracy in ``../suggest/``.

    python experiments/adapt/probes/suggested_classes.py outputs/adapt/source-short-seed0/checkpoints/last.ckpt
    # about 1 min; suggested_classes.json
"""

import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parents[2]), str(HERE.parents[1] / "stain_robustness")]

from bench import TARGETS, halves, labelled_cells  # noqa: E402
from ablation import data_folder  # noqa: E402
from leukonet.adapt.cells import per_class  # noqa: E402
from leukonet.adapt.run import probabilities  # noqa: E402
from leukonet.adapt.suggest import rank  # noqa: E402
from leukonet.classes import CLASSES  # noqa: E402
from leukonet.data.check import duplicate_groups  # noqa: E402
from leukonet.inference import ood  # noqa: E402
from leukonet.provenance import machine, portable_path  # noqa: E402
from leukonet.training.model import CellClassifier  # noqa: E402

ckpt = Path(sys.argv[1])
data = data_folder(None)
model = CellClassifier.from_checkpoint(ckpt)
out = {"checkpoint": portable_path(ckpt), "machine": machine(), "classes": list(CLASSES), "labs": {}}
for lab, folder in TARGETS.items():
    cells, entries = labelled_cells(data / folder, model.hparams.image_size)
    feats = ood.features(model, cells.images)
    groups = duplicate_groups(data / folder, entries)
    rows = []
    for seed in (0, 1, 2):
        pool_i, _ = halves(entries, data / folder, seed, groups)
        y, f = cells.labels[pool_i], feats[pool_i]
        for k in (5, 10):
            budget = sum(min(k, int((y == c).sum())) for c in range(len(CLASSES)))
            suggested = np.array(rank(f, probabilities(model, f), budget, seed))
            rows.append({"seed": seed, "k": k, "pool": np.bincount(y, minlength=5).tolist(),
                         "random": np.bincount(y[per_class(y, k, seed)], minlength=5).tolist(),
                         "suggest": np.bincount(y[suggested], minlength=5).tolist()})
            print(lab, rows[-1], flush=True)
    out["labs"][lab] = rows
HERE.joinpath("suggested_classes.json").write_text(json.dumps(out, indent=1) + "\n")
