"""Are BCCD's missed eosinophils eosinophils? Recall split by what each labelled eosinophil looks like.

``bccd_eosinophil_review.csv`` sorts the 88 crops labelled eosinophil in ``bccd-crops`` by what is visible in them
(looked at once, at 170 px, by a leukonet developer, not a haematologist; no model output was shown):

- ``granules``: coarse orange-red granules fill the cytoplasm: an eosinophil by eye;
- ``neutrophil-like``: a band or 3+-lobed nucleus in pale cytoplasm with no coarse red granules: what a neutrophil
  looks like, so possibly a wrong label;
- ``unclear``: blurred, cut by the crop, or a two-lobed nucleus in pinkish cytoplasm with no resolvable granules.

For each ``predictions.csv`` that ``python -m leukonet.evaluate`` wrote on ``bccd-crops``, this counts what the
model called the eosinophils of each group, and the eosinophil recall per group. If the models called the clear
eosinophils eosinophils and only missed the neutrophil-like ones, the gap to the target would be in the labels.

    python experiments/stain_robustness/eosinophils/label_review.py --predictions RUN/bccd/predictions.csv [...]

Writes ``label_review.json`` and ``label_review.md`` in ``--out`` (default: this folder).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
sys.path.insert(0, str(REPO))  # leukonet from this checkout, also without an editable install

from leukonet.classes import CLASSES  # noqa: E402
from leukonet.provenance import portable_path, portable_text  # noqa: E402

GROUPS = ("granules", "unclear", "neutrophil-like")


def read_review(path: Path) -> dict[str, str]:
    """File name -> group, refusing a group this script does not know."""
    with path.open(newline="") as f:
        review = {row["file"]: row["look"] for row in csv.DictReader(f)}
    if odd := sorted({g for g in review.values() if g not in GROUPS}):
        raise SystemExit(f"{path}: unknown look {odd}; expected one of {GROUPS}")
    return review


def tally(predictions: Path, review: dict[str, str]) -> dict[str, Counter]:
    """Per group: how many of its eosinophils the run called each class."""
    out = {g: Counter() for g in GROUPS}
    with predictions.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["true"] == "eosinophil"]
    names = {Path(r["path"]).name for r in rows}
    if missing := sorted(set(review) - names):
        raise SystemExit(f"{predictions}: {len(missing)} reviewed eosinophils are not in it (e.g. {missing[0]}); "
                         "is it a bccd-crops evaluation?")
    for r in rows:
        name = Path(r["path"]).name
        if name not in review:
            raise SystemExit(f"{predictions}: eosinophil {name} is not in the review")
        out[review[name]][r["predicted"]] += 1
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--predictions", type=Path, nargs="+", required=True, help="predictions.csv of runs on bccd-crops")
    p.add_argument("--review", type=Path, default=HERE / "bccd_eosinophil_review.csv")
    p.add_argument("--out", type=Path, default=HERE)
    args = p.parse_args(argv)
    review = read_review(args.review)
    runs = []
    for path in args.predictions:
        counts = tally(path, review)
        runs.append({"predictions": portable_path(path),
                     "called": {g: dict(counts[g]) for g in GROUPS},
                     "eosinophil_recall": {g: counts[g]["eosinophil"] / max(1, sum(counts[g].values())) for g in GROUPS}})
    size = Counter(review.values())
    called = {g: Counter() for g in GROUPS}
    for r in runs:
        for g in GROUPS:
            called[g].update(r["called"][g])
    results = {"review": portable_path(args.review), "group_size": {g: size[g] for g in GROUPS},
               "mean_eosinophil_recall": {g: statistics.fmean(r["eosinophil_recall"][g] for r in runs) for g in GROUPS},
               "called_share": {g: {c: called[g][c] / max(1, sum(called[g].values())) for c in CLASSES} for g in GROUPS},
               "runs": runs,
               "command": " ".join(["python", str(Path(__file__).resolve().relative_to(REPO)), *(argv if argv is not None else sys.argv[1:])])}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "label_review.json").write_text(portable_text(json.dumps(results, indent=2) + "\n", REPO))
    lines = ["# BCCD's labelled eosinophils, by what they look like", "",
             f"Groups from `{results['review']}` (see `label_review.py` for what each means): "
             + ", ".join(f"{g} {size[g]}" for g in GROUPS) + ". BCCD dataset (MIT licence).", "",
             f"- Command: `{results['command']}`", "",
             "Share of each group's eosinophils called each class, pooled over the runs (%):", "",
             "| group | n | " + " | ".join(CLASSES) + " |", "|---|---:|" + "---:|" * len(CLASSES)]
    lines += [f"| {g} | {size[g]} | " + " | ".join(f"{100 * results['called_share'][g][c]:.0f}" for c in CLASSES) + " |"
              for g in GROUPS]
    lines += ["", "Eosinophil recall per group and run (%):", "", "| predictions | " + " | ".join(GROUPS) + " |",
              "|---|" + "---:|" * len(GROUPS)]
    lines += [f"| `{r['predictions']}` | " + " | ".join(f"{100 * r['eosinophil_recall'][g]:.0f}" for g in GROUPS) + " |"
              for r in runs]
    lines += ["| mean | " + " | ".join(f"{100 * results['mean_eosinophil_recall'][g]:.1f}" for g in GROUPS) + " |", ""]
    (args.out / "label_review.md").write_text(portable_text("\n".join(lines), REPO))
    print("[label_review] mean eosinophil recall by group: "
          + ", ".join(f"{g} {100 * v:.1f} %" for g, v in results["mean_eosinophil_recall"].items()))
    return results


if __name__ == "__main__":
    main()
