"""Probe (issue 17): do frozen ImageNet EfficientNet-Lite0 features with each lab's profile subtracted (what made the
cell-kind check hold across labs) carry the five classes to BCCD and cellavision-100?

Features of PBC train (200 a class, seed 0) / test, BCCD, cellavision are cached in features.npz next to this file
(not committed: 18 MB, recomputed in about 3 min).
A logistic regression is fitted on PBC train, scored on PBC test and on both labs: no centring, each lab's
median subtracted, each lab standardised; then k labelled target cells a class added (pool/held-out halves).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score

from leukonet.classes import CLASSES
from leukonet.inference.cell_kind import features

HERE = Path(__file__).parent
DATA = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data")
REPO = HERE.parents[2]


def load(paths):
    import cv2
    out = []
    for p in paths:
        im = cv2.imread(str(p), cv2.IMREAD_COLOR)
        out.append(None if im is None else cv2.cvtColor(im, cv2.COLOR_BGR2RGB))
    return out


def feats(paths):
    ims = load(paths)
    keep = [i for i, im in enumerate(ims) if im is not None]
    return keep, features([ims[i] for i in keep], 32)  # the cell-kind check's two views, side by side


def main():
    cache = HERE / "features.npz"
    if not cache.exists():
        rows = [l.split(",") for l in (REPO / "experiments/two_phase/split.csv").read_text().splitlines()[1:]]
        rng = np.random.default_rng(0)
        sets = {}
        for name, split, cap in (("pbc_train", "train", 200), ("pbc_test", "test", None)):
            paths, labels = [], []
            for c, cls in enumerate(CLASSES):
                files = [DATA / "pbc-2500" / p for p, lab, s in rows if lab == cls and s.strip() == split]
                if cap:
                    files = [files[i] for i in rng.permutation(len(files))[:cap]]
                paths += files
                labels += [c] * len(files)
            sets[name] = (paths, labels)
        for name, folder in (("bccd", "bccd-crops"), ("cellavision", "cellavision-100")):
            paths, labels = [], []
            for c, cls in enumerate(CLASSES):
                files = sorted((DATA / folder / cls).iterdir())
                paths += files
                labels += [c] * len(files)
            sets[name] = (paths, labels)
        arrays = {}
        for name, (paths, labels) in sets.items():
            t = time.time()
            keep, f = feats(paths)
            arrays[name + "_x"] = f
            arrays[name + "_y"] = np.array(labels)[keep]
            print(name, f.shape, f"{time.time() - t:.0f} s", flush=True)
        np.savez(cache, **arrays)
    z = np.load(cache)
    X = {k[:-2]: z[k] for k in z.files if k.endswith("_x")}
    Y = {k[:-2]: z[k] for k in z.files if k.endswith("_y")}
    results = {}
    views = {"both": slice(None), "image": slice(0, 1280), "zoom": slice(1280, None)}
    for vname, sl in views.items():
        for centring in ("none", "median", "standardise"):
            def prep(x, ref):
                x = x[:, sl]
                ref = ref[:, sl]
                if centring == "none":
                    return x
                if centring == "median":
                    return x - np.median(ref, 0)
                return (x - ref.mean(0)) / (ref.std(0) + 1e-3)
            src = np.concatenate([X["pbc_train"], X["pbc_test"]])  # the training lab's profile: all its cells
            for C in (0.01, 0.1):
                clf = LogisticRegression(C=C, max_iter=3000, class_weight="balanced")
                clf.fit(prep(X["pbc_train"], src), Y["pbc_train"])
                row = {"pbc_test": float((clf.predict(prep(X["pbc_test"], src)) == Y["pbc_test"]).mean())}
                for lab in ("bccd", "cellavision"):
                    pred = clf.predict(prep(X[lab], X[lab]))
                    row[lab] = {"acc": float((pred == Y[lab]).mean()),
                                "bal": float(balanced_accuracy_score(Y[lab], pred))}
                key = f"{vname}/{centring}/C{C}"
                results[key] = row
                print(key, json.dumps(row), flush=True)
    # k labelled target cells a class (pool half), scored on the held-out half; median centring
    for vname in ("both", "zoom"):
        sl = views[vname]
        for k in (0, 3, 10):
            for lab in ("bccd", "cellavision"):
                accs, bals = [], []
                for seed in range(3):
                    rng = np.random.default_rng(seed)
                    pool, test = [], []
                    for c in range(5):
                        idx = rng.permutation(np.flatnonzero(Y[lab] == c))
                        h = len(idx) // 2
                        pool += list(idx[:h]); test += list(idx[h:])
                    pool, test = np.array(pool), np.array(test)
                    lab_med = np.median(X[lab][:, sl], 0)
                    src_med = np.median(np.concatenate([X["pbc_train"], X["pbc_test"]])[:, sl], 0)
                    xs = X["pbc_train"][:, sl] - src_med
                    ys = Y["pbc_train"]
                    chosen = np.concatenate([rng.permutation(pool[Y[lab][pool] == c])[:k] for c in range(5)]).astype(int)
                    xt = X[lab][chosen][:, sl] - lab_med
                    w = np.concatenate([np.ones(len(xs)), np.full(len(xt), 10.0)])
                    clf = LogisticRegression(C=0.1, max_iter=3000, class_weight=None)
                    clf.fit(np.concatenate([xs, xt]), np.concatenate([ys, Y[lab][chosen]]), sample_weight=w)
                    pred = clf.predict(X[lab][test][:, sl] - lab_med)
                    accs.append((pred == Y[lab][test]).mean()); bals.append(balanced_accuracy_score(Y[lab][test], pred))
                key = f"k{k}/{vname}/{lab}"
                results[key] = {"acc": float(np.mean(accs)), "bal": float(np.mean(bals))}
                print(key, results[key], flush=True)
    (HERE / "frozen_features.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
