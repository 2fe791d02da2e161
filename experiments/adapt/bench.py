"""Adapting a PBC-trained checkpoint to two other labs (BCCD, cellavision-100): which method, measured on cells
it never saw.

Each target is split per seed into an adaptation pool and a held-out test half (stratified, seeded, near copies
together). Every row adapts a fresh copy of the checkpoint with ``leukonet.adapt.run.adapt_model`` (what
``python -m leukonet.adapt`` runs) and scores the held-out half and the PBC test split:

- ``none``; each label-free method and combinations, inductive (the pool's cells) and transductive (pool and
  test cells, unlabelled);
- k = 1, 3, 5, 10 labelled pool cells a class (capped by what the pool has), ``random`` (k of each class) or
  ``suggest`` (as many cells, ranked by ``leukonet.adapt.suggest`` on the label-free adapted model's features),
  adapted with ``--labelled-method``; a k that labels the whole pool (``--ks 100``) is one row, ``random``: what
  labelling every pool cell would buy.

The label-free method recommended is the inductive one whose smaller gain over no adaptation, of the two
targets, is the largest (``SELECTION``); ``--time-cli`` also times the command itself on 1,000 unlabelled cells and on a 10-a-class
fine-tune. Numbers are means over ``--seeds``.

    python experiments/adapt/bench.py --ckpt outputs/adapt/source-short-seed0/checkpoints/last.ckpt --seeds 0 1 2 --time-cli
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(REPO), str(REPO / "experiments" / "stain_robustness")]

from ablation import data_folder  # noqa: E402
from leukonet.adapt import batchnorm  # noqa: E402
from leukonet.adapt.cells import Cells, decode, per_class, source_cells  # noqa: E402
from leukonet.adapt.run import adapt_batchnorm, fit_to_lab, probabilities, tune_network  # noqa: E402
from leukonet.adapt.suggest import rank  # noqa: E402
from leukonet.classes import CLASSES  # noqa: E402
from leukonet.data.check import duplicate_groups  # noqa: E402
from leukonet.data.folder import scan_folder  # noqa: E402
from leukonet.data.split import read_split, stratified_split  # noqa: E402
from leukonet.inference import ood  # noqa: E402
from leukonet.inference.calibration import expected_calibration_error, retained  # noqa: E402
from leukonet.provenance import machine, portable_path, portable_text  # noqa: E402
from leukonet.training.model import CellClassifier  # noqa: E402

METHODS = {  # label-free rows: name -> method config (conf/method/*.yaml)
    name: OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "method" / f"{name}.yaml"))
    for name in ("none", "adabn", "bn_map", "self_train", "prior", "bn_map_self_train", "bn_map_center",
                 "bn_map_center_self_train", "self_train_prior", "bn_map_center_prior", "tent", "finetune",
                 "finetune_self_train")
}
TARGETS = {"bccd": "bccd-crops", "cellavision": "cellavision-100"}
KS = (1, 3, 5, 10)
MIN_SUPPORT = 10  # balanced accuracy also over the classes with at least this many test cells


def labelled_cells(root: Path, size: int) -> tuple[Cells, list]:
    entries = scan_folder(root).entries
    cells = decode([(root / e.path).resolve() for e in entries], size, [e.label for e in entries])
    return cells, entries


def halves(entries: list, root: Path, seed: int, groups: list) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the adaptation pool and the held-out test half (stratified, near copies together)."""
    split = stratified_split(entries, (0.5, 0.0, 0.5), seed, groups)
    index = {e.path: i for i, e in enumerate(entries)}
    return (np.array(sorted(index[e.path] for e in split["train"])), np.array(sorted(index[e.path] for e in split["test"])))


def scores(model, feats: torch.Tensor, y: np.ndarray) -> dict:
    """Accuracy, balanced accuracy (all classes present; those with >= MIN_SUPPORT cells), macro-F1, recall per
    class, ECE and coverage at the review threshold, from the backbone features of labelled cells."""
    from sklearn.metrics import f1_score

    probs = probabilities(model, feats)
    pred = probs.argmax(1)
    present = [c for c in range(len(CLASSES)) if (y == c).any()]
    recall = {CLASSES[c]: float((pred[y == c] == c).mean()) for c in present}
    big = [CLASSES[c] for c in present if (y == c).sum() >= MIN_SUPPORT]
    threshold = model.chosen_review_threshold()
    kept = retained(probs, y, threshold) if threshold is not None else {"coverage": None, "accuracy": None}
    return {"n": int(len(y)), "accuracy": float((pred == y).mean()), "balanced_accuracy": float(np.mean(list(recall.values()))),
            "balanced_accuracy_10": float(np.mean([recall[c] for c in big])), "macro_f1": float(f1_score(y, pred, labels=present, average="macro")),
            "recall": recall, "ece": expected_calibration_error(probs, y),
            "coverage_at_threshold": kept["coverage"], "accuracy_of_retained": kept["accuracy"]}


class Adapted:
    """The checkpoint after one backbone step (BatchNorm, then the whole-network step if the method has one) on some
    of the lab's cells, with every feature the rows need computed once: the training cells', the cells adapted on,
    the held-out half's and PBC's test split's. Each row then fits the head, calibration and class mix on a copy
    (``leukonet.adapt.run.fit_to_lab``, what the command runs)."""

    def __init__(self, original, source: Cells, on: Cells, test: Cells, pbc: Cells, step: tuple, before: np.ndarray,
                 moments: dict, labels: np.ndarray | None = None, seed: int = 0) -> None:
        started = time.perf_counter()
        self.model = copy.deepcopy(original)
        mode, center, net = step
        adapt_batchnorm(self.model, source, on, mode, moments.get(center), center)  # training cells' moments: once
        if net is not None:
            labels = np.full(len(on), -1) if labels is None else labels
            tune_network(self.model, source, on, labels, OmegaConf.create({"network": json.loads(net)}), seed)
        self.source = (ood.features(self.model, source.images), source.labels)
        self.on = ood.features(self.model, on.images)
        self.seconds = time.perf_counter() - started  # what adaptation itself spends on the backbone
        self.test, self.pbc = ood.features(self.model, test.images), ood.features(self.model, pbc.images)
        self.test_y, self.pbc_y, self.before = test.labels, pbc.labels, before

    def row(self, method: dict, labels: np.ndarray, seed: int) -> dict:
        model = copy.deepcopy(self.model)
        started = time.perf_counter()
        summary, _ = fit_to_lab(model, self.source, self.on, labels, OmegaConf.create(method), self.before, seed=seed,
                                refit_ood=False)
        wall = self.seconds + time.perf_counter() - started
        return {"target": scores(model, self.test, self.test_y), "pbc_test": {"accuracy": scores(model, self.pbc, self.pbc_y)["accuracy"]},
                "wall_s": round(wall, 1), "labelled": int((labels >= 0).sum()),
                "estimated_proportions": summary["estimated_proportions"]}


def backbone_step(method: dict, labelled: bool = False) -> tuple[str, float | None, str | None]:
    """What a method does to the backbone: its BatchNorm mode, the centre share of its moments, and its network step
    (as JSON; None where there is none, or where it needs labels and ``labelled`` is false: then it does nothing)."""
    net = method.get("network") or {}
    objective = net.get("objective", "none")
    active = objective != "none" and (labelled or objective != "labels")
    return method["bn"], method.get("bn_center") if method["bn"] == "map" else None, json.dumps(net, sort_keys=True) if active else None


def setting(ckpt: Path, data: Path) -> tuple[CellClassifier, Cells, Cells]:
    """The checkpoint, 100 of its training cells a class (what the command adapts with) and PBC's test split."""
    model = CellClassifier.from_checkpoint(ckpt)
    size = model.hparams.image_size
    source = source_cells(OmegaConf.create({"per_class": 100, "seed": 0}), ckpt, size)
    pbc_test = read_split(ckpt.resolve().parents[1] / "split.csv")["test"]
    return model, source, decode([(data / "pbc-2500" / e.path).resolve() for e in pbc_test], size, [e.label for e in pbc_test])


def target_halves(data: Path, size: int, seeds) -> Iterator[tuple[str, int, Cells, Cells]]:
    """Each lab, seed, adaptation pool and held-out half, as the rows use them (for the probes)."""
    for name, folder in TARGETS.items():
        root = data / folder
        cells, entries = labelled_cells(root, size)
        groups = duplicate_groups(root, entries)
        for seed in seeds:
            pool_i, test_i = halves(entries, root, seed, groups)
            yield name, seed, cells.subset(pool_i), cells.subset(test_i)


def write_probe(path: Path, ckpt: Path, seeds, rows: dict[str, dict[str, list[dict]]], started: float) -> None:
    """A probe's rows (lab -> row -> one entry a seed) and their means into ``path`` with the command and the
    machine; the means printed."""
    table: dict[str, dict[str, dict]] = {}
    for name, per in rows.items():
        for key, rs in per.items():
            v = {m: float(np.mean([r["target"][m] for r in rs])) for m in ("accuracy", "balanced_accuracy", "balanced_accuracy_10", "ece")}
            v["pbc_test_accuracy"] = float(np.mean([r["pbc_test"]["accuracy"] for r in rs]))
            if "picked_classes" in rs[0]:
                v["picked_classes"] = np.mean([r["picked_classes"] for r in rs], 0).round(2).tolist()
            table.setdefault(name, {})[key] = v
            print(f"{name:12s} {key:24s} acc {100 * v['accuracy']:5.1f}  bal {100 * v['balanced_accuracy']:5.1f}  "
                  f"bal10 {100 * v['balanced_accuracy_10']:5.1f}  PBC {100 * v['pbc_test_accuracy']:5.1f}  {v.get('picked_classes', '')}")
    out = {"checkpoint": portable_path(ckpt), "seeds": list(seeds), "machine": machine(),
           "command": portable_text(" ".join(["python", *sys.argv]), REPO),
           "wall_s": round(time.perf_counter() - started, 1), "table": table, "rows": rows}
    path.write_text(json.dumps(out, indent=2) + "\n")


def run_target(name: str, root: Path, model, source: Cells, pbc: Cells, args) -> dict:
    cells, entries = labelled_cells(root, model.hparams.image_size)
    groups = duplicate_groups(root, entries)
    all_feats = ood.features(model, cells.images)
    steps = sorted({backbone_step(METHODS[m]) for m in [*args.methods, *args.labelled_methods]}, key=str)
    moments = {c: batchnorm.input_moments(model, source.images, c) for c in {c for b, c, _ in steps if b == "map"}}
    rows: dict[str, list[dict]] = {}

    def add(key: str, adapted: Adapted, method: dict, labels: np.ndarray, seed: int) -> None:
        rows.setdefault(key, []).append(adapted.row(method, labels, seed))
        t = rows[key][-1]["target"]
        print(f"{name} seed {seed} {key}: accuracy {t['accuracy']:.3f}, balanced {t['balanced_accuracy']:.3f}", flush=True)

    for seed in args.seeds:
        pool_i, test_i = halves(entries, root, seed, groups)
        pool, test = cells.subset(pool_i), cells.subset(test_i)
        both = cells.subset(np.concatenate([pool_i, test_i]))
        before = probabilities(model, all_feats[torch.as_tensor(pool_i)])
        adapted = {bn: Adapted(model, source, pool, test, pbc, bn, before, moments) for bn in steps}
        for method in args.methods:  # inductive: the pool's cells, unlabelled
            cfg = METHODS[method]
            add(method if method == "none" else f"{method}/inductive", adapted[backbone_step(cfg)], cfg, np.full(len(pool), -1), seed)
        # transductive (pool and test cells, unlabelled), for the methods named
        before_both = probabilities(model, all_feats[torch.as_tensor(np.concatenate([pool_i, test_i]))])
        for bn in {backbone_step(METHODS[m]) for m in args.transductive}:
            on_both = Adapted(model, source, both, test, pbc, bn, before_both, moments)
            for method in (m for m in args.transductive if backbone_step(METHODS[m]) == bn):
                add(f"{method}/transductive", on_both, METHODS[method], np.full(len(both), -1), seed)
        # which cells to label: what `leukonet.adapt.suggest n=<budget>` picks, on the features of the checkpoint
        # adapted without labels (the labelled method's BatchNorm step on the pool)
        for labelled_method in args.labelled_methods:
            labelled_cfg = METHODS[labelled_method]
            free = adapted[backbone_step(labelled_cfg)]
            free_probs = probabilities(free.model, free.on)
            tuned = backbone_step(labelled_cfg, labelled=True)
            for k in args.ks:
                budget = sum(min(k, int((pool.labels == c).sum())) for c in range(len(CLASSES)))
                strategies = [("random", per_class(pool.labels, k, seed)),
                              ("suggest", np.array(rank(free.on, free_probs, budget, seed)))]
                for strategy, chosen in strategies[:1] if budget == len(pool) else strategies:  # the whole pool: one row
                    labels = np.full(len(pool), -1)
                    labels[chosen] = pool.labels[chosen]
                    on = free if tuned == backbone_step(labelled_cfg) else Adapted(  # the network tuned on these labels
                        model, source, pool, test, pbc, tuned, before, moments, labels, seed)
                    add(f"k{k}/{strategy}/{labelled_method}", on, labelled_cfg, labels, seed)
    return rows


def mean(rows: list[dict], *path: str) -> float | None:
    values = []
    for r in rows:
        for p in path:
            r = r.get(p) if isinstance(r, dict) else None
        if r is not None:
            values.append(r)
    return float(statistics.mean(values)) if values else None


def summarise(rows: list[dict]) -> dict:
    out = {m: mean(rows, "target", m) for m in ("accuracy", "balanced_accuracy", "balanced_accuracy_10", "macro_f1", "ece",
                                                "coverage_at_threshold", "accuracy_of_retained")}
    out["balanced_accuracy_sd"] = float(statistics.pstdev([r["target"]["balanced_accuracy"] for r in rows]))
    out["recall"] = {c: mean(rows, "target", "recall", c) for c in CLASSES}
    out["pbc_test_accuracy"] = mean(rows, "pbc_test", "accuracy")
    out["wall_s"] = mean(rows, "wall_s")
    out["labelled"] = mean(rows, "labelled")
    out["n_test"] = mean(rows, "target", "n")
    out["estimated_proportions"] = {c: mean(rows, "estimated_proportions", c) for c in CLASSES}
    return out


def time_cli(ckpt: Path, data: Path, method: str, labelled_method: str, work: Path) -> dict:
    """Wall time of the command itself: label-free on 1,000 unlabelled cells (BCCD's 351, cellavision's 100 and 549
    PBC-other cells: timing only), and a 10-a-class fine-tune on BCCD (41 labelled cells, the rest unlabelled)."""
    work.mkdir(parents=True, exist_ok=True)
    files = [p for d in ("bccd-crops", "cellavision-100") for p in sorted((data / d).rglob("*")) if p.is_file()]
    files += sorted(p for p in (data / "pbc-other").rglob("*.jpg"))[: 1000 - len(files)]
    manifest = work / "thousand.csv"
    manifest.write_text("path\n" + "\n".join(str(p.resolve()) for p in files) + "\n")
    bccd = scan_folder(data / "bccd-crops").entries
    chosen = per_class(np.array([e.label for e in bccd]), 10, 0)
    labels = work / "bccd_k10.csv"
    with labels.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows([str((data / "bccd-crops" / bccd[i].path).resolve()), CLASSES[bccd[i].label]] for i in chosen)
    out = {}
    for key, extra in (("label_free_1000", [f"target.manifest={manifest}", f"method={method}"]),
                       ("labelled_k10_bccd", [f"target.root={data / 'bccd-crops'}", f"target.labels={labels}",
                                              f"method={labelled_method}"])):
        cmd = [sys.executable, "-m", "leukonet.adapt", f"ckpt_path={ckpt}", f"hydra.run.dir={work / key}", *extra]
        started = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
        report = json.loads((work / key / "adaptation.json").read_text())
        out[key] = {"wall_s": round(time.perf_counter() - started, 1), "cells": report["cells"],
                    "labelled": report["labelled"], "command": portable_text(" ".join(["python", *cmd[1:]]), REPO)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", type=Path, required=True, help="a +experiment=stain_robust checkpoint trained on pbc-2500")
    p.add_argument("--data", type=Path, default=None, help="the folder with pbc-2500/, bccd-crops/, cellavision-100/")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--transductive", nargs="*", default=["self_train", "bn_map_center_self_train"], choices=list(METHODS),
                   help="methods also run on the pool and the test cells together (unlabelled)")
    p.add_argument("--ks", type=int, nargs="+", default=list(KS))
    p.add_argument("--labelled-methods", nargs="+", default=["self_train", "bn_map_center_self_train"], choices=list(METHODS),
                   help="how the k labelled cells (and the unlabelled rest) adapt the model; each gets its k rows")
    p.add_argument("--time-cli", action="store_true", help="also time the command itself (after the rows)")
    p.add_argument("--time-cli-only", action="store_true",
                   help="only time the command, with the methods recommended in --out's results.json, and add it there")
    p.add_argument("--markdown-only", action="store_true", help="rewrite --out's results.md from its results.json")
    p.add_argument("--budget", default="short", help="how the checkpoint was trained, for the record")
    p.add_argument("--out", type=Path, default=HERE)
    args = p.parse_args()
    data = data_folder(args.data)
    if args.markdown_only:
        results = json.loads((args.out / "results.json").read_text())
        write({**results, **choose(results["rows"])}, args.out)
        return
    if args.time_cli_only:
        results = json.loads((args.out / "results.json").read_text())
        results.update(choose(results["rows"]))
        results["cli_timing"] = time_cli(args.ckpt, data, results["best_unsupervised"]["method"],
                                         results["labelled_method"], REPO / "outputs" / "adapt" / "timing")
        write(results, args.out)
        return
    started = time.perf_counter()
    model, source, pbc = setting(args.ckpt, data)

    table = {name: {k: summarise(v) for k, v in run_target(name, data / folder, model, source, pbc, args).items()}
             for name, folder in TARGETS.items()}
    results = {
        "checkpoint": portable_path(args.ckpt), "budget": args.budget, "seeds": args.seeds, "image_size": model.hparams.image_size,
        "command": portable_text(" ".join(["python", "experiments/adapt/bench.py", *sys.argv[1:]]), REPO),
        "machine": machine(), "wall_s": None, "rows": table,
    }
    args.out.mkdir(parents=True, exist_ok=True)  # the rows first: --markdown-only can finish from them
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    results.update(choose(table))
    best, labelled = results["best_unsupervised"]["method"], results["labelled_method"]
    if args.time_cli:
        results["cli_timing"] = time_cli(args.ckpt, data, best, labelled, REPO / "outputs" / "adapt" / "timing")
    results["wall_s"] = round(time.perf_counter() - started, 1)
    write(results, args.out)


SELECTION = {
    "label_free": "the inductive method whose smaller gain in balanced accuracy over no adaptation, of the two labs, is "
                  "the largest (it must hold for any lab, not on average)",
    "labelled": "the method with the highest mean over both labs of balanced accuracy over the classes with at least "
                f"{MIN_SUPPORT} held-out cells, at k = 10 suggested (each lab has 1-2 held-out basophils: one moves the "
                "all-class balanced accuracy by 10 points)",
}


def choose(table: dict) -> dict:
    """The label-free method and the labelled one to recommend (rules in ``SELECTION``), and their rows under the keys
    the issue names (no_adaptation, best_unsupervised, kN)."""
    rows = table[next(iter(TARGETS))]
    gain = lambda key: min(table[t][key]["balanced_accuracy"] - table[t]["none"]["balanced_accuracy"] for t in TARGETS)  # noqa: E731
    row = lambda m: "none" if m == "none" else f"{m}/inductive"  # noqa: E731
    best = max([k.split("/")[0] for k in rows if k.endswith("/inductive")] or ["none"], key=lambda m: gain(row(m)))
    ks = sorted({int(k.split("/")[0][1:]) for k in rows if k.startswith("k") and "/" in k})
    # a lab whose whole pool is labelled at k has no suggested row there (random and suggested are the same cells)
    in_all = lambda key: all(key in table[t] for t in TARGETS)  # noqa: E731
    suggested = [k for k in ks if any(key.startswith(f"k{k}/suggest/") and in_all(key) for key in rows)]
    top, picks = (10 if 10 in suggested else suggested[-1], "suggest") if suggested else (ks[-1], "random")
    both = lambda key, metric: statistics.mean(table[t][key][metric] for t in TARGETS)  # noqa: E731
    labelled = max((k.split("/")[2] for k in rows if k.startswith(f"k{top}/{picks}/") and in_all(k)),
                   key=lambda m: both(f"k{top}/{picks}/{m}", "balanced_accuracy_10"))
    return {
        "selection": SELECTION,
        "no_adaptation": {t: table[t]["none"] for t in TARGETS},
        "best_unsupervised": {"method": best, "mode": "inductive", **{t: table[t][row(best)] for t in TARGETS},
                              "pbc_test": {"accuracy": both(row(best), "pbc_test_accuracy")}},
        "labelled_method": labelled,
        **{f"k{k}": {s: {t: table[t][f"k{k}/{s}/{labelled}"] for t in TARGETS} for s in ("random", "suggest")
                     if in_all(f"k{k}/{s}/{labelled}")} for k in ks},
    }


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown(results))
    print(f"wrote {out / 'results.md'}")


def recommendation(r: dict) -> list[str]:
    """What to tell a lab, from the numbers: a label-free method only if it beats no adaptation on every target."""
    targets, b = list(TARGETS), r["best_unsupervised"]
    gains = {t: b[t]["balanced_accuracy"] - r["no_adaptation"][t]["balanced_accuracy"] for t in targets}
    out = []
    if all(g > 0 for g in gains.values()):
        out.append(f"- Without labels: `method={b['method']}` (balanced accuracy "
                   + ", ".join(f"{t} {100 * g:+.1f} points" for t, g in gains.items()) + ").")
    else:
        out.append("- Without labels: no method beat no adaptation on both targets (the best, `"
                   + b["method"] + "`: " + ", ".join(f"{t} {100 * g:+.1f} points" for t, g in gains.items())
                   + " of balanced accuracy); adapt a lab's model with its labelled cells, and use the label-free "
                     "report only for the class mix it estimates.")
    with_suggested = [key for key in r if key.startswith("k") and key[1:].isdigit() and "suggest" in r[key]]
    if not with_suggested:  # every k labelled a whole pool somewhere: no suggested row on both labs
        k = max((key for key in r if key.startswith("k") and key[1:].isdigit()), key=lambda x: int(x[1:]))
        out.append(f"- With labels: `method={r['labelled_method']} target.labels=...` ({k[1:]} a class, random: " + ", ".join(
            f"{t} {pct(r['no_adaptation'][t]['accuracy'])} -> {pct(r[k]['random'][t]['accuracy'])} % accuracy" for t in targets) + ").")
        return out
    k = "k10" if "k10" in with_suggested else max(with_suggested, key=lambda x: int(x[1:]))
    wins = {t: r[k]["suggest"][t]["accuracy"] - r[k]["random"][t]["accuracy"] for t in targets}
    out.append(f"- With labels: `method={r['labelled_method']} target.labels=...`, the cells to label from "
               f"`leukonet.adapt.suggest` ({k[1:]} a class: " + ", ".join(
                   f"{t} {pct(r['no_adaptation'][t]['accuracy'])} -> {pct(r[k]['suggest'][t]['accuracy'])} % accuracy, "
                   f"suggested {100 * w:+.1f} points over random" for t, w in wins.items()) + ").")
    return out


def pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}"


def markdown(r: dict) -> str:
    targets = list(TARGETS)
    lines = ["# Adapting a PBC-trained checkpoint to other labs", "",
             f"Checkpoint `{r['checkpoint']}` ({r['budget']} budget, {r['image_size']} px, `+experiment=stain_robust`, "
             f"trained on pbc-2500's seed-42 split: Acevedo et al., Data in Brief 30:105474, 2020, CC BY 4.0). Targets: "
             "BCCD crops (MIT) and cellavision-100 (Zheng et al., Micron 2018), each split per seed into an adaptation "
             f"pool and a held-out half; means over seeds {r['seeds']}. Held-out numbers in %; bal. = balanced accuracy "
             f"(bal.10: classes with at least {MIN_SUPPORT} test cells); PBC = the adapted model on PBC's test split.", "",
             f"Command: `{r['command']}`  ", f"Machine: {r['machine']}"
             + ("" if r.get("wall_s") is None else f"; total {r['wall_s']} s"), ""]
    header = "| row | " + " | ".join(f"{t} acc | {t} bal. | {t} bal.10 | {t} F1 | {t} ECE | {t} PBC" for t in targets) + " | s |"
    lines += ["## Every row", "", header, "|---|" + "---:|" * (6 * len(targets) + 1)]
    keys = list(dict.fromkeys(key for t in targets for key in r["rows"][t]))  # a lab without a row: dashes
    for key in keys:
        cells = []
        for t in targets:
            s = r["rows"][t].get(key)
            cells += ["—"] * 6 if s is None else [
                pct(s["accuracy"]), f"{pct(s['balanced_accuracy'])} ± {pct(s['balanced_accuracy_sd'])}",
                pct(s["balanced_accuracy_10"]), pct(s["macro_f1"]), f"{s['ece']:.3f}", pct(s["pbc_test_accuracy"])]
        seconds = max(r["rows"][t][key]["wall_s"] for t in targets if key in r["rows"][t])
        lines.append(f"| {key} | " + " | ".join(cells) + f" | {seconds:.0f} |")
    lines += ["", "## Recall per class (held-out)", "", "| row | target | " + " | ".join(CLASSES) + " |",
              "|---|---|" + "---:|" * len(CLASSES)]
    for key in keys:
        for t in (t for t in targets if key in r["rows"][t]):
            lines.append(f"| {key} | {t} | " + " | ".join(pct(r["rows"][t][key]["recall"][c]) for c in CLASSES) + " |")
    lines += ["", "## Calibration after adaptation (held-out)", "",
              "Temperature and review threshold: refitted on the lab's labelled cells from 25 on (k = 10 at BCCD: 41 "
              "cells; they also trained the head), else the checkpoint's own, fitted on PBC validation.", "",
              "| row | " + " | ".join(f"{t} ECE | {t} coverage | {t} acc. of retained" for t in targets) + " |",
              "|---|" + "---:|" * (3 * len(targets))]
    for key in keys:
        lines.append(f"| {key} | " + " | ".join(
            "— | — | —" if key not in r["rows"][t] else f"{r['rows'][t][key]['ece']:.3f} | "
            f"{pct(r['rows'][t][key]['coverage_at_threshold'])} | {pct(r['rows'][t][key]['accuracy_of_retained'])}"
            for t in targets) + " |")
    b = r["best_unsupervised"]
    lines += ["", "## Summary", "",
              f"- Without labels, the method chosen (rules below) is **{b['method']}**: "
              + "; ".join(f"{t} {pct(r['no_adaptation'][t]['balanced_accuracy'])} -> {pct(b[t]['balanced_accuracy'])} % balanced, "
                          f"{pct(r['no_adaptation'][t]['accuracy'])} -> {pct(b[t]['accuracy'])} % accuracy" for t in targets)
              + f"; PBC test accuracy of the adapted models {pct(b['pbc_test']['accuracy'])} % "
                f"(unadapted {pct(statistics.mean(r['no_adaptation'][t]['pbc_test_accuracy'] for t in targets))} %)."]
    for k in (key for key in r if key.startswith("k") and key[1:].isdigit()):
        lines.append(f"- {k[1:]} labelled cells a class (`{r['labelled_method']}`): "
                     + "; ".join(t + ",".join(f" {s} {pct(r[k][s][t]['accuracy'])} % / {pct(r[k][s][t]['balanced_accuracy'])} % bal."
                                               for s in ("random", "suggest") if s in r[k]) for t in targets)
                     + ("" if "suggest" in r[k] else " (a lab's whole pool labelled: no suggested row on both labs)"))
    lines += ["", "## Recommendation (chosen on both targets together)", "",
              f"Rules: without labels, {r['selection']['label_free']}; with labels, {r['selection']['labelled']}.", "",
              *recommendation(r)]
    if "cli_timing" in r:
        c = r["cli_timing"]
        lines += ["", "## The command's wall time", ""]
        lines += [f"- {k}: {v['wall_s']} s ({v['cells']} cells, {v['labelled']} labelled): `{v['command']}`" for k, v in c.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
