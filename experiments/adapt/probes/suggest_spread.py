"""Would suggested cells do better spread over the classes the model predicts? ``leukonet.adapt.suggest`` clusters
the lab's cells in feature space and takes one hesitant cell a cluster: on BCCD 16-19 of its 41 cells are
eosinophils, the class the model hesitates on, and only 4-6 are lymphocytes or monocytes (``suggested_classes.json``),
so its picks trail random's k-of-each-class in balanced accuracy (``../suggest/``). Here the same bench rows with the
budget first shared equally over the *predicted* classes (capped by how many cells each has, the rest to the
others), then ``rank`` within each: a lab's technologist needs no labels for that.

    python experiments/adapt/probes/suggest_spread.py --ckpt outputs/adapt/source-short-seed0/checkpoints/last.ckpt \
        --seeds 0 1 2 --methods none --transductive --ks 5 10 --labelled-methods finetune --budget short \
        --out experiments/adapt/probes/suggest_spread
"""

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench  # noqa: E402
from leukonet.adapt.suggest import rank  # noqa: E402


def quotas(counts: np.ndarray, n: int) -> np.ndarray:
    """``n`` shared as equally as the classes' ``counts`` allow (water-filling)."""
    quota = np.zeros(len(counts), int)
    while quota.sum() < min(n, counts.sum()):
        open_ = np.flatnonzero(quota < counts)
        share = max(1, (n - quota.sum()) // len(open_))
        for c in open_[np.argsort(-(counts[open_] - quota[open_]), kind="stable")]:
            if quota.sum() >= n:
                break
            quota[c] += min(share, counts[c] - quota[c])
    return quota


def spread_rank(feats, probs: np.ndarray, n: int, seed: int = 0) -> list[int]:
    predicted = probs.argmax(1)
    picks = []
    for c, q in enumerate(quotas(np.bincount(predicted, minlength=probs.shape[1]), n)):
        members = np.flatnonzero(predicted == c)
        if q:
            picks += [int(members[i]) for i in rank(feats[members], probs[members], int(q), seed)]
    return picks


if __name__ == "__main__":
    bench.rank = spread_rank
    bench.main()
    out = Path(sys.argv[sys.argv.index("--out") + 1])
    results = json.loads((out / "results.json").read_text())
    results["command"] = results["command"].replace("experiments/adapt/bench.py", "experiments/adapt/probes/suggest_spread.py")
    bench.write(results, out)
