"""Which augmentation and normalisation make a PBC-trained model work on another lab's cells (issue 5)?

Trains each variant below on PBC-2500 (Acevedo et al., Data in Brief 30:105474, 2020, CC BY 4.0) with
several seeds, scores its test split and the external BCCD crops (never used for training or model
selection: each run keeps its checkpoint by PBC validation loss), and writes ``results.json`` and
``results.md``: mean and spread over the seeds, per domain, per variant.

    python experiments/stain_robustness/ablation.py                     # the first 11 variants, seeds 0 1 2
    python experiments/stain_robustness/ablation.py --budget full       # the recipe's epoch limits, 224 px
    python experiments/stain_robustness/ablation.py --variants baseline reinhard --seeds 0
    python experiments/stain_robustness/ablation.py --tta ...           # BCCD also with d4 test-time augmentation

Runs go to ``outputs/stain_robustness/<budget>/<variant>/seed<k>/`` (``--work``); a run whose two reports
exist is not run again, so an interrupted ablation is continued by calling it again. Runs go seed by seed
(every variant with seed 0 first), so a partial ablation still compares all variants; ``--finished-only`` trains
nothing and summarises the runs that are finished (variants may then have different numbers of seeds).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))  # leukonet from this checkout, also without an editable install

from leukonet.provenance import machine, portable_text  # noqa: E402

# the additions of conf/data/augment/stain_robust.yaml (he_stain is there at p=0: off)
ADDITIONS = ("scale", "stain", "gray", "defocus", "blur", "noise", "jpeg")


def only(*kept: str) -> list[str]:
    """stain_robust's augmentation with only ``kept`` of its additions (the report's transforms always stay)."""
    return ["+experiment=two_phase_lite0", "data/augment=stain_robust", *(f"~data.augment.{a}" for a in ADDITIONS if a not in kept)]


BASELINE = ["+experiment=two_phase_lite0"]  # the report's recipe and augmentation
# tight crops: BCCD's crops frame the leukocyte at 2-3x the size PBC's do (the cell fills 70-90 % of the width
# there, about a third here); zoom into the centre 1-3x, half the time (an entry of this script, not of conf/ yet)
ZOOM = "+data.augment.zoom={_target_:albumentations.Affine,scale:[1.0,3.0],keep_ratio:true,border_mode:4,p:0.5}"
# stain jitter wide enough for another lab's staining: BCCD's nuclei carry about half PBC's violet stain (99th
# percentile of the violet concentration per image, median over images: 1.51 against 2.93 optical density), far
# outside stain_robust's x0.75-1.25; each stain x0.4-1.3 and shifted ±0.1 OD, on 80 % of the images
WIDE_STAIN = ["data.augment.stain.scale_range=[0.4,1.3]", "data.augment.stain.shift_range=[-0.1,0.1]", "data.augment.stain.p=0.8"]
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "baseline": ("the report's augmentation (rotation, flips, crop, perspective, colour jitter)", BASELINE),
    "stain": ("+ Romanowsky stain jitter (colour deconvolution)", only("stain")),
    "scale": ("+ scale jitter 0.7-1.4x", only("scale")),
    "zoom": ("+ zoom into the centre 1-3x (tighter crops)", [*BASELINE, ZOOM]),
    "optics": ("+ greyscale, defocus, blur, noise and JPEG (camera and optics)", only("gray", "defocus", "blur", "noise", "jpeg")),
    "reinhard": ("+ Reinhard stain normalisation (train and test)", [*BASELINE, "model.stain_norm=reinhard"]),
    "all_aug_reinhard": ("+ stain, scale, optics (all of stain_robust) and Reinhard normalisation",
                         [*only(*ADDITIONS), "model.stain_norm=reinhard"]),
    "all_aug_zoom_reinhard": ("+ all of stain_robust, zoom and Reinhard normalisation",
                              [*only(*ADDITIONS), ZOOM, "model.stain_norm=reinhard"]),
    "zoom_stain_reinhard": ("+ zoom, stain jitter and Reinhard normalisation (no scale jitter, no optics)",
                            [*only("stain"), ZOOM, "model.stain_norm=reinhard"]),
    "zoom_widestain": ("+ zoom and a wide stain jitter (each stain x0.4-1.3, ±0.1 OD, 80 % of images)",
                       [*only("stain"), *WIDE_STAIN, ZOOM]),
    "zoom_widestain_reinhard": ("+ zoom, the wide stain jitter and Reinhard normalisation",
                                [*only("stain"), *WIDE_STAIN, ZOOM, "model.stain_norm=reinhard"]),
}
FIRST_ABLATION = list(VARIANTS)  # what a call without --variants runs: the 11 variants of results.json here
# aimed at BCCD's eosinophils (16 % recall with zoom, most called neutrophils): tighter framing more often
# (1.5-3x on 80 % of the images: BCCD's cells fill 70-90 % of the width), greyscale on 30 % (granule texture and
# nuclear shape over colour), saturation down to x0.3 (BCCD's leukocytes carry about half PBC's mean saturation:
# 0.23-0.28 against 0.45-0.57 by class), blur/defocus (BCCD's crops are softer), and a wider hue jitter (BCCD's
# leukocytes sit 7-26° below PBC's on the hue circle, and the zoom models' eosinophil recall on BCCD rises from 10-15 %
# to 23-47 % when BCCD's hue is turned by -20°, +20° or +27°); measurements in colour_probe/results.md
ZOOM_TIGHT = "+data.augment.zoom={_target_:albumentations.Affine,scale:[1.5,3.0],keep_ratio:true,border_mode:4,p:0.8}"
GRAY = [*only("gray"), "data.augment.gray.p=0.3"]
VARIANTS |= {  # run after the full-budget ones (eosinophils/results.json)
    "zoom_tight": ("+ tighter zoom: 1.5-3x on 80 % of the images", [*BASELINE, ZOOM_TIGHT]),
    "zoom_gray": ("+ zoom and greyscale on 30 % of the images", [*GRAY, ZOOM]),
    "zoom_lowsat": ("+ zoom and saturation jitter down to x0.3 (x0.3-1.4 instead of x0.6-1.4)",
                    [*BASELINE, "data.augment.color.saturation=[0.3,1.4]", ZOOM]),
    "zoom_blur": ("+ zoom, blur and defocus (softer optics)", [*only("blur", "defocus"), ZOOM]),
    "zoom_tight_gray": ("+ the tighter zoom and greyscale on 30 % of the images", [*GRAY, ZOOM_TIGHT]),
    "zoom_widehue": ("+ zoom and hue jitter ±20 % of the colour circle (instead of ±10 %)",
                     [*BASELINE, "data.augment.color.hue=0.2", ZOOM]),
}
# how many changes each variant makes to the baseline (transforms added, normalisation): "simpler" in recommend()
CHANGES = {"baseline": 0, "stain": 1, "scale": 1, "zoom": 1, "optics": 5, "reinhard": 1, "all_aug_reinhard": 8,
           "all_aug_zoom_reinhard": 9, "zoom_stain_reinhard": 3, "zoom_widestain": 2, "zoom_widestain_reinhard": 3,
           "zoom_tight": 1, "zoom_gray": 2, "zoom_lowsat": 2, "zoom_blur": 3, "zoom_tight_gray": 2, "zoom_widehue": 2}
# short: what 2 CPU cores allow for the first 9 variants x 3 seeds in about 1.5 hours: 128 px and at most 6 + 6 epochs
# (patience 8 never triggers), so every variant gets the same number of epochs; full: the recipe itself
BUDGETS = {
    "short": ["data.image_size=128", "callbacks.two_phase.phase1.max_epochs=6", "callbacks.two_phase.phase2.max_epochs=6"],
    "medium": ["data.image_size=128", "callbacks.two_phase.phase1.max_epochs=15", "callbacks.two_phase.phase2.max_epochs=15"],
    "full": [],
}
PROTOCOLS = {
    "short": "short: 128 px, phase 1 at most 6 epochs (lr 1e-3), phase 2 at most 6 (lr 1e-5), patience 8",
    "medium": "medium: 128 px, phase 1 at most 15 epochs (lr 1e-3), phase 2 at most 15 (lr 1e-5), patience 8",
    "full": "full: the report's recipe (two_phase_lite0's limits: 30 + 60 epochs, patience 8), 224 px",
}
METRICS = ("accuracy", "balanced_accuracy", "macro_f1")


def data_folder(given: Path | None) -> Path:
    """The folder holding pbc-2500/ and bccd-crops/: ``given``, else $LEUKONET_DATA, else ../shared/data."""
    data = (given or Path(os.environ.get("LEUKONET_DATA") or REPO.parent / "shared" / "data")).resolve()
    for sub in ("pbc-2500", "bccd-crops"):
        if not (data / sub).is_dir():
            raise SystemExit(f"--data {data}: no {sub}/ in it (set LEUKONET_DATA or pass --data)")
    return data


def run(cmd: list[str], log: Path, threads: int | None) -> None:
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    with log.open("w") as f:
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"failed (exit {proc.returncode}): {shlex.join(cmd)}\nsee {log}")


def bccd_command(run_dir: Path, name: str, args: argparse.Namespace, *extra: str) -> list[str]:
    """evaluate on the BCCD crops with the run's best checkpoint, the report in ``run_dir/name``."""
    return [sys.executable, "-m", "leukonet.evaluate", f"ckpt_path={run_dir / 'checkpoints' / 'best.ckpt'}",
            f"data.root={args.data / 'bccd-crops'}", f"hydra.run.dir={run_dir / name}", *extra]


def one_run(variant: str, seed: int, args: argparse.Namespace, work: Path) -> dict | None:
    """Train one variant with one seed, then score BCCD; reuses a finished run (with ``--finished-only``, None
    for a run that is not finished)."""
    run_dir = work / variant / f"seed{seed}"
    pbc, bccd = run_dir / "metrics.json", run_dir / "bccd" / "metrics.json"
    if not (pbc.is_file() and bccd.is_file()):
        if args.finished_only:
            return None
        if run_dir.exists():  # an interrupted run: kept aside, never overwritten
            aside = run_dir.with_name(f"seed{seed}.interrupted-{datetime.now():%Y%m%d-%H%M%S}")
            run_dir.rename(aside)
            print(f"[ablation] moved the unfinished {run_dir} to {aside}", flush=True)
        started = time.perf_counter()
        train_cmd = [sys.executable, "-m", "leukonet.train", *VARIANTS[variant][1], *BUDGETS[args.budget],
                     f"data.root={args.data / 'pbc-2500'}", f"seed={seed}", f"hydra.run.dir={run_dir}",
                     "~callbacks.progress_bar", "trainer.enable_progress_bar=false", *args.override]
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        run(train_cmd, run_dir.parent / f"seed{seed}.train.log", args.threads)
        eval_cmd = bccd_command(run_dir, "bccd", args)
        run(eval_cmd, run_dir.parent / f"seed{seed}.bccd.log", args.threads)
        (run_dir / "ablation.json").write_text(json.dumps({"wall_s": round(time.perf_counter() - started, 1),
                                                           "train": shlex.join(train_cmd), "bccd": shlex.join(eval_cmd)}))
    d4 = run_dir / "bccd_d4" / "metrics.json"
    if args.tta and not d4.is_file() and not args.finished_only:  # also for runs finished by an earlier call
        run(bccd_command(run_dir, "bccd_d4", args, "tta=d4"), run_dir.parent / f"seed{seed}.bccd_d4.log", args.threads)
    p, b = json.loads(pbc.read_text()), json.loads(bccd.read_text())
    t = json.loads(d4.read_text()) if args.tta and d4.is_file() else None
    info = json.loads((run_dir / "ablation.json").read_text()) if (run_dir / "ablation.json").is_file() else {}
    return {"variant": variant, "seed": seed, "run_dir": str(run_dir.relative_to(REPO) if run_dir.is_relative_to(REPO) else run_dir),
            "pbc_test": {m: p[m] for m in METRICS} | {"n": p["n"]}, "bccd": {m: b[m] for m in METRICS} | {"n": b["n"]},
            "bccd_recall": dict(zip(b["class_names"], (b["per_class"][c]["recall"] for c in b["class_names"]))),
            **({"bccd_d4": {m: t[m] for m in METRICS} | {"n": t["n"]}} if t else {}),
            "epochs": p.get("epochs"), "wall_s": info.get("wall_s"), "command": info.get("train"),
            **({"note": info["note"]} if info.get("note") else {})}  # e.g. how a run was resumed


def summarise(rows: list[dict]) -> dict:
    """Mean, sample standard deviation, min and max over the seeds, per domain and metric."""
    out = {"seeds": [r["seed"] for r in rows], "n_seeds": len(rows)}
    for domain in ("pbc_test", "bccd", "bccd_d4"):
        if not all(domain in r for r in rows):  # bccd_d4: only with --tta, for every seed
            continue
        out[domain] = {}
        for m in METRICS:
            v = [r[domain][m] for r in rows]
            out[domain][m] = {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else None,
                              "min": min(v), "max": max(v), "values": v}
    names = rows[0]["bccd_recall"]
    out["bccd_recall_mean"] = {c: statistics.fmean(r["bccd_recall"][c] for r in rows) for c in names}
    return out


def recommend(summary: dict[str, dict], pbc_floor: float) -> tuple[str, str]:
    """The variant with the best mean BCCD balanced accuracy among those whose mean PBC test accuracy is at least
    ``pbc_floor`` (all variants when none is); of the variants within one seed standard deviation of it, the one
    with the fewest changes."""
    ok = [v for v in summary if summary[v]["pbc_test"]["accuracy"]["mean"] >= pbc_floor]
    floor = f"mean PBC test accuracy at least {pbc_floor:.4f}"
    if not ok:  # say so rather than pretend the floor holds
        ok, floor = list(summary), f"any mean PBC test accuracy (none reaches the floor, {pbc_floor:.4f})"
    best = max(ok, key=lambda v: summary[v]["bccd"]["balanced_accuracy"]["mean"])
    b = summary[best]["bccd"]["balanced_accuracy"]
    margin = b["std"] or 0.0
    near = [v for v in ok if summary[v]["bccd"]["balanced_accuracy"]["mean"] >= b["mean"] - margin]
    choice = min(near, key=lambda v: (CHANGES[v], -summary[v]["bccd"]["balanced_accuracy"]["mean"]))
    why = (f"highest mean BCCD balanced accuracy ({b['mean']:.3f}) among variants with {floor}" if choice == best else
           f"within one seed standard deviation ({margin:.3f}) of the best ({best}, {b['mean']:.3f}) on BCCD balanced "
           f"accuracy, with fewer changes ({CHANGES[choice]} against {CHANGES[best]}), among variants with {floor}")
    if len(near) > 1:
        why += "; also within one standard deviation: " + ", ".join(v for v in near if v != choice)
    out = sorted((v for v in summary if v not in ok), key=lambda v: -summary[v]["bccd"]["balanced_accuracy"]["mean"])
    if out:
        why += ". Below the PBC floor, so not eligible: " + ", ".join(
            f"{v} (PBC {100 * summary[v]['pbc_test']['accuracy']['mean']:.1f} %, BCCD balanced "
            f"{100 * summary[v]['bccd']['balanced_accuracy']['mean']:.1f} %)" for v in out)
    return choice, why


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(portable_text(json.dumps(results, indent=2) + "\n", REPO))
    s = results["variants"]

    def cell(v: str, domain: str, m: str) -> str:
        if domain not in s[v]:
            return "-"
        x = s[v][domain][m]
        return f"{100 * x['mean']:.1f} ± {100 * x['std']:.1f}" if x["std"] is not None else f"{100 * x['mean']:.1f}"

    tta = any("bccd_d4" in s[v] for v in s)
    pace = f"{results['jobs']} at a time" if results["jobs"] else "made by earlier calls (--finished-only)"
    lines = [f"# Stain robustness ablation ({results['budget']} budget)", "",
             f"Trained on PBC-2500 (Acevedo et al., Data in Brief 30:105474, 2020, CC BY 4.0), split 70/15/15 with "
             f"seed 42; scored on its test split (n={results['n']['pbc_test']}) and on BCCD crops (BCCD dataset, "
             f"MIT licence; n={results['n']['bccd']}, never used for training or checkpoint selection). "
             "Per variant: mean ± sample standard deviation over the seeds in the last column (training randomness: "
             "augmentation draws, shuffling, dropout; the split is the same).", "",
             f"- Protocol: {results['protocol']}", f"- Machine: {results['machine']}", f"- Command: `{results['command']}`",
             f"- Time: {results['n_runs']} run{'s' if results['n_runs'] != 1 else ''}, "
             f"{pace}, each {min(r['wall_s'] for r in results['runs']) / 60:.1f}"
             f"-{max(r['wall_s'] for r in results['runs']) / 60:.1f} min (training, test split, BCCD), "
             f"{results['run_wall_s_sum'] / 3600:.1f} h of runs in all",
             *(f"- {r['variant']} seed {r['seed']}: {r['note']}" for r in results["runs"] if r.get("note")),
             *([f"- Not finished, left out: {', '.join(results['not_run'])}"] if results["not_run"] else []),
             *(["- BCCD d4: BCCD scored with test-time augmentation (tta=d4: the mean of the 8 flips and 90° rotations)"]
               if tta else []), "",
             "| variant | what | PBC test acc % | PBC macro-F1 % | BCCD acc % | BCCD balanced acc % | BCCD macro-F1 % | "
             + ("BCCD d4 balanced acc % | " if tta else "") + "seeds |",
             "|---|---|---:|---:|---:|---:|---:|" + ("---:|" if tta else "") + "---:|"]
    for v in s:
        lines.append(f"| {v} | {VARIANTS[v][0]} | {cell(v, 'pbc_test', 'accuracy')} | {cell(v, 'pbc_test', 'macro_f1')} | "
                     f"{cell(v, 'bccd', 'accuracy')} | {cell(v, 'bccd', 'balanced_accuracy')} | "
                     f"{cell(v, 'bccd', 'macro_f1')} | " + (f"{cell(v, 'bccd_d4', 'balanced_accuracy')} | " if tta else "")
                     + f"{' '.join(map(str, s[v]['seeds']))} |")
    classes = list(next(iter(s.values()))["bccd_recall_mean"])
    lines += ["", "BCCD recall per class (mean over seeds, %; BCCD has "
              + ", ".join(f"{results['bccd_support'].get(c, '?')} {c}s" for c in classes) + "):", "",
              "| variant | " + " | ".join(classes) + " |", "|---|" + "---:|" * len(classes)]
    for v in s:
        lines.append(f"| {v} | " + " | ".join(f"{100 * s[v]['bccd_recall_mean'][c]:.0f}" for c in classes) + " |")
    rec, base = results["recommended"], results["baseline"]

    def vs_baseline(domain: str, metric: str, digits: int) -> str:
        return f", baseline {100 * base[domain][metric]:.{digits}f} %" if base else " (baseline not run here)"

    lines += ["", f"## Recommended: `{results['recommended_variant']}`", "", results["recommendation_why"], "",
              f"Targets (issue 5): BCCD balanced accuracy ≥ 80 %: recommended {100 * rec['bccd']['balanced_accuracy']:.1f} %"
              f"{vs_baseline('bccd', 'balanced_accuracy', 1)}; PBC test accuracy ≥ 98.5 %: recommended "
              f"{100 * rec['pbc_test']['accuracy']:.2f} %{vs_baseline('pbc_test', 'accuracy', 2)}"
              + (f" ({results['budget']} budget: PBC accuracy is below the full recipe's)" if results["budget"] != "full" else "") + ".", "",
              "Caveat: choosing the recommendation by its BCCD score makes BCCD a selection set for that choice; a third "
              "lab's cells would be the clean test of it.", ""]
    (out / "results.md").write_text(portable_text("\n".join(lines), REPO))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=None, help="folder holding pbc-2500/ and bccd-crops/ "
                   "(default: $LEUKONET_DATA or ../shared/data)")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=FIRST_ABLATION,
                   help="default: the first ablation's %(default)s")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--budget", choices=list(BUDGETS), default="short")
    p.add_argument("--work", type=Path, help="run directories (default: outputs/stain_robustness/<budget>)")
    p.add_argument("--out", type=Path, default=HERE, help="results.json and results.md (default: %(default)s)")
    p.add_argument("--pbc-floor", type=float, default=None,
                   help="least mean PBC test accuracy a recommendation may have (default: baseline's mean minus 0.5 "
                        "points); given, the baseline runs only if listed in --variants")
    p.add_argument("--override", nargs="+", default=[], metavar="KEY=VALUE",
                   help="Hydra overrides added to every training run (e.g. data.batch_size=64); recorded in results.json")
    p.add_argument("--finished-only", action="store_true", help="train nothing: summarise the finished runs among "
                   "--variants x --seeds (the others are listed as not run)")
    p.add_argument("--tta", action="store_true", help="also score BCCD with test-time augmentation (tta=d4), reported "
                   "beside the plain score, never used for the choice; runs finished by an earlier call get it too, "
                   "except with --finished-only (which scores nothing)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once, each with cores/jobs torch threads (default: 1); "
                   "on 2 cores, 2 jobs use the core a single run leaves idle while it augments")
    args = p.parse_args(argv)
    args.threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None

    args.data = data_folder(args.data)
    if "baseline" not in args.variants and args.pbc_floor is None:  # the floor is measured on it
        args.variants = ["baseline", *args.variants]
    work = (args.work or REPO / "outputs" / "stain_robustness" / args.budget).resolve()
    started = time.perf_counter()
    def task(v: str, seed: int) -> dict | None:
        if not args.finished_only:
            print(f"[ablation] {v} seed {seed} starts ({datetime.now():%H:%M:%S})", flush=True)
        r = one_run(v, seed, args, work)
        if r is None:
            print(f"[ablation] {v} seed {seed}: not finished, left out", flush=True)
            return None
        print(f"[ablation] {v} seed {seed}: PBC test acc {r['pbc_test']['accuracy']:.4f}, BCCD balanced acc "
              f"{r['bccd']['balanced_accuracy']:.4f} ({r['wall_s']} s)", flush=True)
        return r

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # seed by seed: every variant with seed 0 first
        planned = [(v, s) for s in args.seeds for v in args.variants]
        rows = list(pool.map(lambda vs: task(*vs), planned))
    not_run = [f"{v} seed {s}" for (v, s), r in zip(planned, rows) if r is None]
    rows = [r for r in rows if r is not None]
    summary = {v: summarise(mine) for v in args.variants if (mine := [r for r in rows if r["variant"] == v])}
    if not summary or (args.pbc_floor is None and "baseline" not in summary):
        raise SystemExit(f"no finished runs to summarise{' (baseline: none, and no --pbc-floor)' if summary else ''} in {work}")
    floor = args.pbc_floor if args.pbc_floor is not None else summary["baseline"]["pbc_test"]["accuracy"]["mean"] - 0.005
    choice, why = recommend(summary, floor)

    def means(v: str) -> dict:
        return {d: {m: summary[v][d][m]["mean"] for m in METRICS} for d in ("pbc_test", "bccd")}

    bccd_root = args.data / "bccd-crops"
    results = {
        "budget": args.budget,
        "protocol": PROTOCOLS[args.budget] + ("; tf_efficientnet_lite0 with its packaged ImageNet weights; checkpoint = "
                                              "lowest PBC validation loss"),
        "overrides": {v: VARIANTS[v][1] + BUDGETS[args.budget] + args.override for v in args.variants},
        "seeds_run": args.seeds,
        "n": {"pbc_test": rows[0]["pbc_test"]["n"], "bccd": rows[0]["bccd"]["n"]},
        "bccd_support": {d.name: sum(1 for f in d.iterdir() if f.is_file()) for d in sorted(bccd_root.iterdir()) if d.is_dir()},
        "variants": summary,
        "baseline": means("baseline") if "baseline" in summary else None,
        "recommended_variant": choice,
        "recommended": means(choice),
        "recommendation_why": why,
        "pbc_floor": floor,
        "runs": rows,
        "n_runs": len(rows),
        "not_run": not_run,
        "wall_s": round(time.perf_counter() - started, 1),
        "run_wall_s_sum": round(sum(r["wall_s"] or 0 for r in rows), 1),
        "jobs": None if args.finished_only else args.jobs,  # None: this call ran nothing
        "machine": machine(),
        "command": shlex.join(["python", str(Path(__file__).resolve().relative_to(REPO)), *(argv if argv is not None else sys.argv[1:])]),
        "citations": ["PBC: Acevedo et al., Data in Brief 30:105474, 2020 (CC BY 4.0)", "BCCD dataset (MIT licence)"],
    }
    write(results, args.out)
    print(f"[ablation] recommended {choice}: {why}; results in {args.out}")
    return results


if __name__ == "__main__":
    main()
