"""Does the lab profile ``leukonet.adapt`` stores need all of a lab's cells? The profile is the median cell-kind
features of the lab's cells with a nucleus; measuring it on 1,000 cells took 43 s of a 2-core machine, a third of the
command's label-free wall time. Here: the profile from every cell vs from 300 drawn at random (3 draws), and how many
of the same cells the not-a-leukocyte check (``CellKind.kinds``) then calls differently.

    python experiments/adapt/probes/profile_cells.py ../shared/data   # about 2 min; profile_cells.json
"""

import json
import sys
import time
from pathlib import Path

import numpy as np

from leukonet.data.folder import decode_many
from leukonet.inference import ood
from leukonet.inference.cell_kind import IMAGE_SIZE, CellKind
from leukonet.provenance import machine

data = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data")
started = time.perf_counter()
out = {"command": "python experiments/adapt/probes/profile_cells.py " + " ".join(sys.argv[1:]), "machine": machine(),
       "labs": {}}
check = CellKind()
for lab in ("bccd-crops", "cellavision-100"):
    paths = sorted(p for p in (data / lab).rglob("*") if p.is_file())
    images = [im for im in decode_many(paths, IMAGE_SIZE) if not isinstance(im, str) and ood.has_leukocyte(im)]
    feats = CellKind.features(images)
    full = CellKind.profile(feats)
    verdicts = check.kinds(feats, full)
    rows = []
    for seed in range(3):
        n = len(feats) // 2
        pick = np.random.default_rng(seed).choice(len(feats), n, replace=False)
        part = CellKind.profile(feats[pick])
        changed = sum(a != b for a, b in zip(verdicts, check.kinds(feats, part)))
        rows.append({"seed": seed, "cells": int(n), "relative_distance": float(np.linalg.norm(part - full) / np.linalg.norm(full)),
                     "verdicts_changed": int(changed)})
    out["labs"][lab] = {"cells": len(feats), "verdicts": {k: verdicts.count(k) for k in sorted(set(verdicts))}, "draws": rows}
    print(lab, out["labs"][lab])
out["wall_s"] = round(time.perf_counter() - started, 1)
Path(__file__).with_name("profile_cells.json").write_text(json.dumps(out, indent=2) + "\n")
