"""What leaves the station: a case's cells as CSV, its printable report (HTML, self-contained, no script), and
the reviewed cells as a manifest (``path,label,source``) that ``leukonet.adapt target.labels=...`` and
``leukonet.train data.manifest=...`` read, the paths pointing at the cell images in the store."""

from __future__ import annotations

import csv
import html
import io
from pathlib import PurePath

from sqlalchemy import select

from leukonet.station.db import NOT_A_LEUKOCYTE, Case, Cell, Image, iso
from leukonet.station.storage import ImageStore

MANIFEST_COLUMNS = ("path", "label", "source")


def _cell(value: object) -> object:
    """A spreadsheet must not run a file name as a formula."""
    return "'" + value if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r") else value


def cells_csv(case: Case, class_names: list[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["case", "cell_id", "file", "cell", "x", "y", "model_class", "top_class", "confidence",
                *(f"p_{n}" for n in class_names), "needs_review", "not_a_leukocyte", "ood_score", "ood_reason",
                "checkpoint", "checkpoint_sha256", "review_label", "reviewer", "reviewed_at", "image_sha256"])
    for c in case.cells:
        w.writerow([case.id, c.id, _cell(c.upload.name), "" if c.index is None else c.index,
                    "" if c.x is None else c.x, "" if c.y is None else c.y, c.predicted or "", c.top_class,
                    c.confidence, *(c.probabilities.get(n, "") for n in class_names), c.needs_review,
                    c.not_a_leukocyte, "" if c.ood_score is None else c.ood_score, c.ood_reason or "",
                    PurePath(c.checkpoint).name, c.checkpoint_sha256, c.review_label or "", _cell(c.reviewer or ""),
                    iso(c.reviewed_at) or "", c.image_sha])
    return buf.getvalue()


def manifest_rows(sessions, store: ImageStore, case_id: int | None = None, unreviewed: bool = False) -> list[dict]:
    """One row per reviewed leukocyte (of one case, or of all); ``unreviewed``: every cell, the unreviewed ones
    with an empty label (the whole lab for adapt's ``target.manifest``, the labelled few for ``target.labels``)."""
    with sessions() as s:
        query = select(Cell, Image.suffix).join(Image, Image.sha256 == Cell.image_sha).order_by(Cell.case_id, Cell.id)
        if case_id is not None:
            query = query.where(Cell.case_id == case_id)
        rows = []
        for c, suffix in s.execute(query):
            if c.review_label == NOT_A_LEUKOCYTE or (c.review_label is None and not unreviewed):
                continue
            rows.append({"path": str(store.path(c.image_sha, suffix)), "label": c.review_label or "",
                         "source": f"station case {c.case_id} cell {c.id}"})
    return rows


def manifest_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


REPORT_CSS = """body{font:11pt system-ui,sans-serif;margin:1.5cm;color:#000}h1{font-size:16pt}table{border-collapse:collapse;
margin:.5em 0 1em}td,th{border:1px solid #999;padding:2px 6px;text-align:right}td:first-child,th:first-child{
text-align:left}.small{font-size:9pt;color:#444}@media print{body{margin:0}}"""


def report_html(summary: dict, case: Case) -> str:
    """The signed (or not yet signed) differential of a case, to print or keep as a file."""
    e = html.escape

    def pct(r: dict, key: str) -> str:
        return "—" if r[key] is None else f"{r[key]:.1f}"

    rows = []
    for m, r in zip(summary["model_count"]["differential"], summary["reviewed_count"]["differential"]):
        rows.append(f"<tr><td>{e(m['class'])}</td><td>{m['cells']}</td><td>{pct(m, 'percent')}</td>"
                    f"<td>{pct(m, 'ci95_low')}–{pct(m, 'ci95_high')}</td><td>{r['cells']}</td><td>{pct(r, 'percent')}</td>"
                    f"<td>{pct(r, 'ci95_low')}–{pct(r, 'ci95_high')}</td></tr>")
    cells = "".join(f"<tr><td>{e(c.upload.name)}</td><td>{'' if c.index is None else c.index}</td>"
                    f"<td>{e(c.predicted or 'not a leukocyte')}</td><td>{100 * c.confidence:.1f}</td>"
                    f"<td>{e((c.review_label or '').replace('_', ' '))}</td><td>{e(c.reviewer or '')}</td></tr>"
                    for c in case.cells)
    signed = (f"Signed off by {e(summary['signed_off_by'])} on {e(summary['signed_off_at'][:16].replace('T', ' '))} UTC"
              if summary["signed_off_at"] else "<strong>Not signed off</strong>: this count may still change")
    checkpoints = ", ".join(f"{e(c['name'])} (sha256 {e(c['sha256'])})" for c in summary["checkpoints"]) or "—"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>leukonet case {case.id}</title><style>{REPORT_CSS}</style></head>
<body><h1>Differential count — case {case.id}</h1>
<p>{e(case.note) or '<span class="small">no note</span>'}</p>
<p>Created {e(summary['created'][:16].replace('T', ' '))} UTC · {summary['cells']} cells, {summary['reviewed']} reviewed ·
not a leukocyte: {summary['not_a_leukocyte']['model']} by the model, {summary['not_a_leukocyte']['reviewed']} by review</p>
<p>{signed}</p><p class="small">Classified by {checkpoints}</p>
<table><thead><tr><th rowspan="2">class</th><th colspan="3">model ({summary['model_count']['cells']} cells)</th>
<th colspan="3">reviewed ({summary['reviewed_count']['cells']} cells)</th></tr>
<tr><th>cells</th><th>%</th><th>95 % CI</th><th>cells</th><th>%</th><th>95 % CI</th></tr></thead>
<tbody>{''.join(rows)}</tbody></table>
<p class="small">Exact binomial (Clopper-Pearson) 95 % intervals. Reviewed: the cells a person confirmed or corrected.</p>
<h2>Cells</h2><table><thead><tr><th>file</th><th>cell</th><th>model</th><th>confidence %</th><th>reviewed</th>
<th>reviewer</th></tr></thead><tbody>{cells}</tbody></table></body></html>
"""
