"""How many labelled cells of a new lab close the gap? PBC plus k of BCCD's cells a class, tested on the others.

Outside issue 5's protocol on purpose (there BCCD never trains): augmentation and normalisation alone leave BCCD at
about 60 % balanced accuracy, so this asks what a lab that labels a few of its own cells gets. For each seed it
draws k cells of each BCCD class (at most half of a class: 1 of the 3 basophils; near copies of a drawn cell
join it), writes a manifest (PBC's seed-42
split, plus the drawn cells in ``train``, each listed ``--repeat`` times so they weigh in the epoch) and a BCCD split
file (drawn cells: ``train``; the rest: ``test``), trains zoom's recipe on the manifest (the checkpoint still chosen
by PBC validation loss), and scores BCCD's test cells with it and with the same recipe's checkpoint trained on PBC
alone (``--reference``: the ablation's zoom runs of that seed), so both are measured on the same cells.

    python experiments/stain_robustness/few_shot.py --k 10 --seeds 0 1 2 --jobs 2

Runs go to ``outputs/stain_robustness/few_shot/<budget>-k<k>-r<repeat>/seed<s>/``; ``results.json`` and ``results.md``
to ``--out`` (default: ``few_shot/`` here).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(REPO), str(HERE)]  # leukonet from this checkout (also without an editable install); ablation.py

from ablation import BUDGETS, METRICS, PROTOCOLS, VARIANTS, data_folder, run  # noqa: E402
from leukonet.classes import CLASSES  # noqa: E402
from leukonet.data.check import duplicate_groups  # noqa: E402
from leukonet.data.datamodule import CellDataModule  # noqa: E402
from leukonet.data.folder import scan_folder  # noqa: E402
from leukonet.data.manifest import write_manifest  # noqa: E402
from leukonet.data.split import SPLITS, write_split  # noqa: E402
from leukonet.provenance import machine, portable_text  # noqa: E402


def draw(entries: list, k: int, seed: int) -> set[str]:
    """k paths of each class (at most half of the class), drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    picked = set()
    for c in range(len(CLASSES)):
        paths = sorted(e.path for e in entries if e.label == c)
        picked |= set(rng.choice(paths, min(k, len(paths) // 2), replace=False).tolist())
    return picked


def prepare(pbc_splits: dict, pbc_root: Path, bccd_root: Path, k: int, repeat: int, seed: int, run_dir: Path) -> dict:
    """The run's manifest and BCCD split file; returns how many BCCD cells of each class train and test."""
    bccd = scan_folder(bccd_root).entries
    drawn = draw(bccd, k, seed)
    for group in duplicate_groups(bccd_root, bccd):  # a near copy of a drawn cell trains too: it must not be tested on
        if drawn & set(group):
            drawn |= set(group)
    rows = [{"path": str(pbc_root / e.path), "label": CLASSES[e.label], "source": "pbc", "split": s}
            for s in SPLITS for e in pbc_splits[s]]
    rows += [{"path": str(bccd_root / e.path), "label": CLASSES[e.label], "source": "bccd", "split": "train"}
             for e in bccd if e.path in drawn for _ in range(repeat)]
    run_dir.mkdir(parents=True, exist_ok=True)
    write_manifest(rows, run_dir / "manifest.csv")
    write_split({"train": [e for e in bccd if e.path in drawn], "val": [], "test": [e for e in bccd if e.path not in drawn]},
                run_dir / "bccd_split.csv")
    return {part: {c: sum(1 for e in bccd if CLASSES[e.label] == c and (e.path in drawn) == (part == "train"))
                   for c in CLASSES} for part in ("train", "test")}


def scores(metrics: Path) -> dict:
    m = json.loads(metrics.read_text())
    return {**{k: m[k] for k in METRICS}, "recall": {c: m["per_class"][c]["recall"] for c in m["class_names"]}}


def one_seed(seed: int, args: argparse.Namespace, pbc_splits: dict, work: Path) -> dict:
    run_dir = work / f"seed{seed}"
    if run_dir.exists():
        raise SystemExit(f"{run_dir} exists: remove it or pass another --work (runs are never overwritten)")
    reference = Path(str(args.reference).format(seed=seed))
    reference = reference if reference.is_absolute() else REPO / reference
    if not reference.is_file():  # before training, not after
        raise SystemExit(f"{reference}: no such checkpoint (--reference names the PBC-only runs, {{seed}} for the seed)")
    started = time.perf_counter()
    counts = prepare(pbc_splits, args.data / "pbc-2500", args.data / "bccd-crops", args.k, args.repeat, seed, run_dir)
    train = [sys.executable, "-m", "leukonet.train", *VARIANTS["zoom"][1], *BUDGETS[args.budget],
             f"data.manifest={run_dir / 'manifest.csv'}", f"seed={seed}", f"hydra.run.dir={run_dir / 'train'}",
             "~callbacks.progress_bar", "trainer.enable_progress_bar=false", *args.override]
    run(train, run_dir / "train.log", args.threads)
    out = {"seed": seed, "bccd_cells": counts, "wall_s": None, "command": shlex.join(train)}
    for name, ckpt in (("with_bccd", run_dir / "train" / "checkpoints" / "best.ckpt"), ("pbc_only", reference)):
        run([sys.executable, "-m", "leukonet.evaluate", f"ckpt_path={ckpt}", f"data.root={args.data / 'bccd-crops'}",
             f"data.split_file={run_dir / 'bccd_split.csv'}", f"hydra.run.dir={run_dir / name}"], run_dir / f"{name}.log", args.threads)
        out[name] = scores(run_dir / name / "metrics.json")
    out["pbc_test"] = {k: json.loads((run_dir / "train" / "metrics.json").read_text())[k] for k in METRICS}
    out["wall_s"] = round(time.perf_counter() - started, 1)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=None, help="folder holding pbc-2500/ and bccd-crops/ "
                   "(default: $LEUKONET_DATA or ../shared/data)")
    p.add_argument("--k", type=int, default=10, help="BCCD cells drawn a class (at most half of the class)")
    p.add_argument("--repeat", type=int, default=10, help="times each drawn cell is listed in the training split")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--budget", choices=list(BUDGETS), default="short")
    p.add_argument("--reference", default="outputs/stain_robustness/short/zoom/seed{seed}/checkpoints/best.ckpt",
                   help="the PBC-only checkpoint of each seed ({seed}; relative to the repository), scored on the same BCCD cells "
                        "(default: %(default)s)")
    p.add_argument("--work", type=Path, default=None, help="default: outputs/stain_robustness/few_shot/<budget>-k<k>-r<repeat>")
    p.add_argument("--out", type=Path, default=HERE / "few_shot")
    p.add_argument("--override", nargs="+", default=[], metavar="KEY=VALUE", help="Hydra overrides added to the training runs")
    p.add_argument("--jobs", type=int, default=1, help="seeds at once, each with cores/jobs torch threads")
    args = p.parse_args(argv)
    args.threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None
    args.data = data_folder(args.data)
    work = (args.work or REPO / "outputs" / "stain_robustness" / "few_shot" / f"{args.budget}-k{args.k}-r{args.repeat}").resolve()
    dm = CellDataModule(root=str(args.data / "pbc-2500"))  # the split every ablation run uses
    dm.setup()
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        runs = list(pool.map(lambda s: one_seed(s, args, dm.splits, work), args.seeds))
    summary = {name: {m: {"mean": statistics.fmean(r[name][m] for r in runs),
                          "std": statistics.stdev([r[name][m] for r in runs]) if len(runs) > 1 else None} for m in METRICS}
               | {"recall_mean": {c: statistics.fmean(r[name]["recall"][c] for r in runs) for c in CLASSES}}
               for name in ("pbc_only", "with_bccd")}
    results = {"k": args.k, "repeat": args.repeat, "budget": args.budget,
               "protocol": PROTOCOLS[args.budget] + "; zoom's recipe; checkpoint = lowest PBC validation loss",
               "summary": summary, "pbc_test_with_bccd": {m: statistics.fmean(r["pbc_test"][m] for r in runs) for m in METRICS},
               "runs": runs, "wall_s": round(time.perf_counter() - started, 1), "machine": machine(),
               "command": shlex.join(["python", str(Path(__file__).resolve().relative_to(REPO)), *(argv if argv is not None else sys.argv[1:])]),
               "citations": ["PBC: Acevedo et al., Data in Brief 30:105474, 2020 (CC BY 4.0)", "BCCD dataset (MIT licence)"]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(portable_text(json.dumps(results, indent=2) + "\n", REPO))

    def cell(name: str, m: str) -> str:
        x = summary[name][m]
        return f"{100 * x['mean']:.1f}" + (f" ± {100 * x['std']:.1f}" if x["std"] is not None else "")

    test = runs[0]["bccd_cells"]["test"]
    lines = [f"# PBC plus {args.k} labelled BCCD cells a class", "",
             "Trained on PBC-2500 (Acevedo et al., Data in Brief 30:105474, 2020, CC BY 4.0; its seed-42 split) plus "
             f"k={args.k} cells of each BCCD class (at most half of a class; each listed {args.repeat} times), drawn anew "
             "for each seed; scored on the other BCCD cells (BCCD dataset, MIT licence: "
             + ", ".join(f"{n} {c}s" for c, n in test.items()) + "). Outside issue 5's protocol: BCCD trains here.", "",
             f"- Protocol: {results['protocol']}", f"- Machine: {results['machine']}", f"- Command: `{results['command']}`",
             f"- Seeds: {' '.join(str(r['seed']) for r in runs)}; each {min(r['wall_s'] for r in runs) / 60:.1f}-"
             f"{max(r['wall_s'] for r in runs) / 60:.1f} min", "",
             "| trained on | BCCD test acc % | balanced acc % | macro-F1 % | " + " | ".join(f"{c} recall %" for c in CLASSES) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(CLASSES)]
    for name, what in (("pbc_only", "PBC only (the ablation's zoom runs)"), ("with_bccd", f"PBC + {args.k} BCCD cells a class")):
        lines.append(f"| {what} | {cell(name, 'accuracy')} | {cell(name, 'balanced_accuracy')} | {cell(name, 'macro_f1')} | "
                     + " | ".join(f"{100 * summary[name]['recall_mean'][c]:.0f}" for c in CLASSES) + " |")
    lines += ["", f"PBC test accuracy of the runs with BCCD cells: {100 * results['pbc_test_with_bccd']['accuracy']:.1f} %.", ""]
    (args.out / "results.md").write_text(portable_text("\n".join(lines), REPO))
    print(f"[few_shot] BCCD test balanced accuracy: PBC only {cell('pbc_only', 'balanced_accuracy')} %, "
          f"with {args.k} BCCD cells a class {cell('with_bccd', 'balanced_accuracy')} %; results in {args.out}")
    return results


if __name__ == "__main__":
    main()
