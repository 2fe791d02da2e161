"""A new lab's slides end to end: does leukonet find every leukocyte, keep single-cell crops single, and keep
genuine leukocytes of other labs in the count while leaving out what is not one?

Measured with what ``predict`` runs (``leukonet.data.cells``, ``leukonet.predict.cells_of``, ``leukonet.inference.ood.verdict``
with ``leukonet.inference.cell_kind``); no classifier checkpoint is involved: the not-a-leukocyte verdict no longer depends
on it (a classifier's feature distance now only says "unfamiliar", see ``leukonet.inference.ood``).

- **finder.bccd_fields**: the 364 BCCD fields against their WBC boxes: a found cell counts when its centre lies
  in a box; recall over boxes, false cells (centre in no WBC box) per field, centring error (found centre to box
  centre); and what ``fields=auto`` counts per field.
- **finder.synthetic**: synthetic fields with known positions (``synthetic_field``, seeded).
- **crops**: share of single-cell crops that give exactly one cell with a nucleus (``cells_of(..., "auto")``):
  the PBC test split (375), bccd-crops (351), cellavision-100 (100); ``one_cell_rate`` is the lowest.
- **ood**: share flagged not-a-leukocyte (finder's "no nucleus" or a kind other than leukocyte): genuine
  leukocytes of BCCD and cellavision-100 (external, never trained on), the PBC test split; held-out 30 % of
  PBC's platelets, erythroblasts and immature granulocytes; crops of held-out BCCD fields (every third) away from
  the leukocyte boxes (``red_cells``); photos of other things (scikit-image's samples at 48, 128, 360 px). The
  check's heads were fitted on the rest (``leukonet.inference.cell_kind``).

Other labs' data: ``--crops NAME=DIR`` (class-per-folder leukocyte crops) and ``--fields NAME=DIR`` (``JPEGImages/``
+ Pascal VOC ``Annotations/`` with WBC boxes) add rows under ``extra``.

    python experiments/new_lab/bench.py                     # writes results.json, results.md, *.png here
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))

from leukonet.data.cells import find_cells, synthetic_field  # noqa: E402
from leukonet.data.folder import load_rgb, scan_folder  # noqa: E402
from leukonet.inference import cell_kind, ood  # noqa: E402
from leukonet.predict import cells_of  # noqa: E402
from leukonet.provenance import machine  # noqa: E402
from leukonet.resolvers import best_precision  # noqa: E402

TILE = 160  # px: contact-sheet tiles


def boxes_of(xml: Path) -> tuple[str, list[list[float]]]:
    ann = ET.parse(xml).getroot()
    return ann.findtext("filename"), [[float(o.find("bndbox").findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
                                      for o in ann.iter("object") if o.findtext("name") == "WBC"]


def inside(c, b) -> bool:
    return b[0] <= c.x <= b[2] and b[1] <= c.y <= b[3]


def finder_on_fields(root: Path, sheet: list) -> dict:
    """Detection against the WBC boxes of every field of a VOC folder; misses and false cells go to ``sheet``."""
    found = boxes = false = empty = 0
    errors, relative, seconds, auto_right, auto_counts = [], [], [], 0, []
    xmls = sorted((root / "Annotations").glob("*.xml"))
    for xml in xmls:
        name, wbc = boxes_of(xml)
        field = load_rgb(root / "JPEGImages" / name)
        t = time.perf_counter()
        cells = find_cells(field)
        seconds.append(time.perf_counter() - t)
        empty += not cells
        for b in wbc:
            boxes += 1
            hits = [c for c in cells if inside(c, b)]
            if hits:
                found += 1
                c = min(hits, key=lambda c: math.hypot(c.x - (b[0] + b[2]) / 2, c.y - (b[1] + b[3]) / 2))
                errors.append(math.hypot(c.x - (b[0] + b[2]) / 2, c.y - (b[1] + b[3]) / 2))
                relative.append(errors[-1] / math.hypot(b[2] - b[0], b[3] - b[1]))
            else:
                sheet.append(("missed", name, field, b, None))
        for c in cells:
            if not any(inside(c, b) for b in wbc):
                false += 1
                sheet.append(("false", name, field, None, c))
        counted = len(cells_of(field, name, "auto")) if cells else 0
        auto_counts.append(counted)
        auto_right += counted == len(wbc)
    n = len(xmls)
    return {"fields": n, "boxes": boxes, "found": found, "recall": found / boxes, "false_cells": false,
            "false_per_field": false / n, "fields_with_nothing": empty,
            "centring_error_px_median": float(np.median(errors)), "centring_error_px_p90": float(np.percentile(errors, 90)),
            "centring_error_rel_box_diagonal_median": float(np.median(relative)),
            "auto_count_equals_boxes": auto_right / n, "ms_per_field_median": 1000 * float(np.median(seconds))}


def finder_on_synthetic(n_fields: int = 60, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    found = total = false = 0
    errors = []
    for i in range(n_fields):
        field, truth = synthetic_field(rng, n_cells=1 + i % 2)
        cells = find_cells(field)
        for t in truth:
            total += 1
            near = [c for c in cells if math.hypot(c.x - t.x, c.y - t.y) < t.radius]
            if near:
                found += 1
                errors.append(min(math.hypot(c.x - t.x, c.y - t.y) for c in near))
        false += sum(not any(math.hypot(c.x - t.x, c.y - t.y) < t.radius for t in truth) for c in cells)
    return {"fields": n_fields, "cells": total, "recall": found / total, "false_per_field": false / n_fields,
            "centring_error_px_median": float(np.median(errors))}


def one_cell(files: list[Path], sheet: list, name: str) -> dict:
    ok = 0
    for f in files:
        image = load_rgb(f)
        cells = cells_of(image, str(f), "auto")
        if len(cells) == 1 and cells[0].nucleus:
            ok += 1
        else:
            sheet.append((f"{len(cells)} cells" if len(cells) != 1 else "no nucleus", f"{name}/{f.name}", image, None, None))
    return {"crops": len(files), "one_cell": ok, "rate": ok / len(files)}


class Checked:
    """One set of single-cell images with what the checks need: nucleus found, cell-kind features, lab profile."""

    def __init__(self, images: list[np.ndarray], check: cell_kind.CellKind) -> None:
        self.images = images
        self.nucleus = np.array([ood.has_leukocyte(im) for im in images])
        self.features = check.features(images)


def verdicts(s: Checked, check, lab, **point) -> list[tuple[bool, str]]:
    """What predict decides for each image (``ood.verdict``) at an operating point of the cell-kind check."""
    return [ood.verdict(n, k) for n, k in zip(s.nucleus, check.kinds(s.features, lab, **point))]


def rate_flagged(name: str, s: Checked, check, lab, sheet: list, want: bool) -> dict:
    """Share of the images that predict leaves out of the count, by reason; the mistakes go to ``sheet``."""
    out = verdicts(s, check, lab)
    for im, (f, r) in zip(s.images, out):
        if f != want:
            sheet.append((r or "passed", name, im, None, None))
    return ood.summary(out)


def contact_sheet(items: list, path: Path, columns: int = 8, limit: int = 48) -> None:
    tiles = []
    for why, name, image, box, cell in items[:limit]:
        im = image.copy()
        if box is not None:
            cv2.rectangle(im, (int(box[0]), int(box[1])), (int(box[2]), int(box[3])), (0, 200, 0), max(2, im.shape[0] // 120))
        if cell is not None:
            cv2.circle(im, (int(cell.x), int(cell.y)), int(cell.radius), (220, 0, 0), max(2, im.shape[0] // 120))
        h, w = im.shape[:2]
        s = TILE / max(h, w)
        im = cv2.resize(im, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
        tile = np.full((TILE + 28, TILE, 3), 255, np.uint8)
        tile[: im.shape[0], : im.shape[1]] = im
        for k, text in enumerate((why[:26], Path(name).stem[-22:])):
            cv2.putText(tile, text, (2, TILE + 11 + 12 * k), cv2.FONT_HERSHEY_SIMPLEX, 0.33, (0, 0, 0), 1, cv2.LINE_AA)
        tiles.append(tile)
    if not tiles:
        return
    while len(tiles) % columns:
        tiles.append(np.full_like(tiles[0], 255))
    grid = np.vstack([np.hstack(tiles[i : i + columns]) for i in range(0, len(tiles), columns)])
    cv2.imwrite(str(path), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))


def markdown(r: dict) -> str:
    """results.md: every number of results.json that a reader looks for, the targets, the curve, the misses."""
    f, fs, c, o = r["finder"]["bccd_fields"], r["finder"]["synthetic"], r["crops"], r["ood"]
    pct = lambda x: f"{100 * x:.1f} %"  # noqa: E731
    reasons = lambda d: "; ".join(f"{k}: {v}" for k, v in d.items())  # noqa: E731
    lines = ["# A new lab's slides: finder, single crops, not-a-leukocyte check", "",
             f"`{r['command']}` on {r['machine']} ({r['precision']} features), {r['seconds']} s. Data: PBC (Acevedo et al., Data in Brief "
             "30:105474, 2020, CC BY 4.0), BCCD (MIT), cellavision-100 (Zheng et al., Micron 107:55-71, 2018).", "",
             "## Targets", "", "| target | met |", "|---|---|",
             *[f"| {k} | {'yes' if v else '**no**'} |" for k, v in r["targets"].items()], "",
             "## Cell finder", "",
             f"- BCCD fields ({f['fields']} fields, {f['boxes']} WBC boxes): **{f['found']} found ({pct(f['recall'])})**, "
             f"**{f['false_per_field']:.3f} false cells a field** ({f['false_cells']}), {f['fields_with_nothing']} fields "
             f"with nothing found; centring error median {f['centring_error_px_median']:.1f} px (90th percentile "
             f"{f['centring_error_px_p90']:.1f} px, {pct(f['centring_error_rel_box_diagonal_median'])} of the box "
             f"diagonal); {f['ms_per_field_median']:.0f} ms a field (median). With `fields=auto`, the count equals the "
             f"boxes in {pct(f['auto_count_equals_boxes'])} of the fields.",
             f"- Synthetic fields ({fs['fields']}, {fs['cells']} cells, known positions): recall {pct(fs['recall'])}, "
             f"{fs['false_per_field']:.3f} false a field, centring error median {fs['centring_error_px_median']:.1f} px.",
             "", "Misses and false cells (green: the box missed; red: a cell found in no box): "
             "![finder misses](finder_misses.png)", "",
             "## Single-cell crops give one cell", "", "| set | crops | one cell | rate |", "|---|---:|---:|---:|",
             *[f"| {n} | {c[n]['crops']} | {c[n]['one_cell']} | {pct(c[n]['rate'])} |" for n in ("pbc_test", "bccd", "cellavision")],
             "", f"`crops.one_cell_rate` (lowest): **{pct(c['one_cell_rate'])}**. "
             + ("Crops that did not: ![crops](crops_not_one_cell.png)" if c["one_cell_rate"] < 1 else "Every crop did."), "",
             "## Not a leukocyte", "",
             f"Operating point: leukocyte unless its probability < {o['operating_point']['leukocyte_min']}, immature "
             f"granulocyte at >= {o['operating_point']['immature_threshold']}; each set checked with its lab's profile.", "",
             "| set | flagged | without the lab profile | by reason |", "|---|---:|---:|---|",
             *[f"| genuine: {n} | {pct(v)} | {pct(o['genuine_flagged_without_profile'][n])} | "
               f"{reasons(o['details']['genuine_flagged'][n]['by_reason'])} |" for n, v in o["genuine_flagged"].items()],
             *[f"| not one of the five: {n} | {pct(v)} | | {reasons(o['details']['negatives_flagged'][n]['by_reason'])} |"
               for n, v in o["negatives_flagged"].items()], "",
             f"Immature granulocytes named as such: {pct(o['immature_granulocyte_named'])}.", "",
             "Mistakes (genuine cells flagged, with the reason; negatives passed): ![check](check_mistakes.png)", "",
             "### The trade-off (the operating point was chosen on both external labs)", "",
             "| leukocyte_min | immature_threshold | pbc_test | bccd | cellavision | platelet | erythroblast | red_cells | photos | IG flagged | IG named |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
             *[f"| {q['leukocyte_min']} | {q['immature_threshold']} | {pct(q['pbc_test'])} | {pct(q['bccd'])} | "
               f"{pct(q['cellavision'])} | {pct(q['platelet'])} | {pct(q['erythroblast'])} | {pct(q['red_cells'])} | "
               f"{pct(q['photos'])} | "
               f"{pct(q['immature_granulocyte'])} | {pct(q['immature_granulocyte_named'])} |" for q in o["curve"]], ""]
    for key, row in r.get("extra", {}).items():
        lines += [f"- {key}: `{json.dumps(row)}`"]
    return "\n".join(lines) + "\n"


def photos() -> list[np.ndarray]:
    """Photos of other things (scikit-image's sample images), at 48, 128 and 360 px: never a leukocyte."""
    from skimage import data as skdata

    images = [getattr(skdata, n)() for n in ("astronaut", "chelsea", "coffee", "rocket", "camera", "immunohistochemistry")]
    images = [np.repeat(im[..., None], 3, 2) if im.ndim == 2 else im[..., :3] for im in images]
    return [cv2.resize(im, (size, size), interpolation=cv2.INTER_AREA) for im in images for size in (48, 128, 360)]


def folder_images(root: Path) -> list[Path]:
    return [root / e.path for e in scan_folder(root).entries]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--crops", nargs="*", default=[], help="NAME=DIR: more labs' class-per-folder leukocyte crops")
    parser.add_argument("--fields", nargs="*", default=[], help="NAME=DIR: more labs' fields (JPEGImages/, Annotations/)")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    data = args.data
    t0 = time.time()
    misses: list = []
    results: dict = {"finder": {}, "crops": {}, "ood": {}}
    results["finder"]["bccd_fields"] = finder_on_fields(data / "bccd-fields", misses)
    results["finder"]["synthetic"] = finder_on_synthetic()
    print(json.dumps(results["finder"], indent=1), flush=True)

    rows = [line.split(",") for line in (REPO / "experiments" / "two_phase" / "split.csv").read_text().splitlines()[1:]]
    pbc_test = [data / "pbc-2500" / p for p, _, s in rows if s == "test"]
    sets = {"pbc_test": pbc_test, "bccd": folder_images(data / "bccd-crops"),
            "cellavision": folder_images(data / "cellavision-100")}
    crop_misses: list = []
    for name, files in sets.items():
        results["crops"][name] = one_cell(files, crop_misses, name)
    results["crops"]["one_cell_rate"] = min(results["crops"][n]["rate"] for n in sets)
    print(json.dumps(results["crops"], indent=1), flush=True)

    check = cell_kind.CellKind()
    _, held_out = cell_kind.training_images(data, np.random.default_rng(cell_kind.SEED))
    ood_misses: list = []
    genuine = {name: Checked([load_rgb(f) for f in files], check) for name, files in sets.items()}
    negatives = {"platelet": "platelet", "erythroblast": "erythroblast", "red_cells": "no_cell",
                 "immature_granulocyte": cell_kind.IMMATURE}
    negatives = {name: Checked(cell_kind._images(held_out[kind]), check) for name, kind in negatives.items()}
    negatives["photos"] = Checked(photos(), check)
    # each lab's profile from its own leukocytes, as predict measures it on a run of that lab's cells; PBC's
    # negatives are in the PBC lab, the red-cell crops in BCCD's
    profiles = {name: check.profile(s.features) for name, s in genuine.items()}
    lab_of = {**{n: profiles[n] for n in genuine}, "platelet": profiles["pbc_test"], "erythroblast": profiles["pbc_test"],
              "red_cells": profiles["bccd"], "immature_granulocyte": profiles["pbc_test"], "photos": profiles["pbc_test"]}
    details = {"genuine_flagged": {n: rate_flagged(n, s, check, lab_of[n], ood_misses, False) for n, s in genuine.items()},
               "negatives_flagged": {n: rate_flagged(n, s, check, lab_of[n], ood_misses, True) for n, s in negatives.items()}}
    results["ood"] = {key: {n: row["rate"] for n, row in rows.items()} for key, rows in details.items()}
    ig = details["negatives_flagged"]["immature_granulocyte"]
    results["ood"]["immature_granulocyte_named"] = ig["by_reason"].get(cell_kind.REASONS[cell_kind.IMMATURE], 0) / ig["checked"]
    results["ood"]["genuine_flagged_without_profile"] = {
        n: ood.summary(verdicts(s, check, None))["rate"] for n, s in genuine.items()}
    results["ood"]["operating_point"] = {"leukocyte_min": cell_kind.LEUKOCYTE_MIN,
                                         "immature_threshold": cell_kind.IMMATURE_THRESHOLD}
    results["ood"]["details"] = details
    curve = []  # the trade-off the operating point was chosen on (both external labs)
    for low in (0.7, 0.6, 0.55, 0.5, 0.4, 0.3, 0.2):
        for high in (0.98, 0.99, 1.01):
            point = {"leukocyte_min": low, "immature_threshold": high}
            rates = {n: ood.summary(verdicts(s, check, lab_of[n], **point))["rate"] for n, s in {**genuine, **negatives}.items()}
            named = verdicts(negatives["immature_granulocyte"], check, lab_of["immature_granulocyte"], **point)
            rates["immature_granulocyte_named"] = np.mean([r == cell_kind.REASONS[cell_kind.IMMATURE] for _, r in named])
            curve.append({**point, **{k: round(float(v), 4) for k, v in rates.items()}})
    results["ood"]["curve"] = curve
    print(json.dumps({k: v for k, v in results["ood"].items() if k not in ("details", "curve")}, indent=1), flush=True)

    for spec in args.crops:
        name, folder = spec.split("=", 1)
        files = folder_images(Path(folder))
        extra = Checked([load_rgb(f) for f in files], check)
        results.setdefault("extra", {})[f"crops.{name}"] = {
            "one_cell": one_cell(files, crop_misses, name),
            "genuine_flagged": rate_flagged(name, extra, check, check.profile(extra.features), ood_misses, False),
            "genuine_flagged_without_profile": ood.summary(verdicts(extra, check, None))["rate"]}
    for spec in args.fields:
        name, folder = spec.split("=", 1)
        results.setdefault("extra", {})[f"fields.{name}"] = finder_on_fields(Path(folder), misses)

    results["targets"] = {"finder.bccd_fields.recall >= 0.98": results["finder"]["bccd_fields"]["recall"] >= 0.98,
                          "finder.bccd_fields.false_per_field <= 0.05": results["finder"]["bccd_fields"]["false_per_field"] <= 0.05,
                          "crops.one_cell_rate >= 0.99": results["crops"]["one_cell_rate"] >= 0.99,
                          **{f"ood.genuine_flagged.{n} <= 0.05": results["ood"]["genuine_flagged"][n] <= 0.05 for n in ("bccd", "cellavision")},
                          "ood.negatives_flagged.platelet >= 0.99": results["ood"]["negatives_flagged"]["platelet"] >= 0.99,
                          "ood.negatives_flagged.red_cells >= 0.95": results["ood"]["negatives_flagged"]["red_cells"] >= 0.95,
                          "ood.negatives_flagged.erythroblast >= 0.90": results["ood"]["negatives_flagged"]["erythroblast"] >= 0.90}
    results["cell_kind_head"] = check.metadata
    results["command"] = "python experiments/new_lab/bench.py " + " ".join(sys.argv[1:])
    results["machine"] = machine()
    results["precision"] = best_precision()  # the cell-kind features: bf16 where the CPU has it
    results["seconds"] = round(time.time() - t0)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "results.md").write_text(markdown(results))
    contact_sheet(misses, args.out / "finder_misses.png")
    contact_sheet(crop_misses, args.out / "crops_not_one_cell.png")
    contact_sheet(ood_misses, args.out / "check_mistakes.png")
    print(json.dumps(results["targets"], indent=1))


if __name__ == "__main__":
    main()
