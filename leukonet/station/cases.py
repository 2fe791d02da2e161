"""What the station does with cases, each step one database transaction: create a case, add files to it (each
cell classified once and kept with its image), the review queue, reviews and their undo, sign-off, and the two
differential counts (the model's and the reviewed one). The HTTP layer (``app``) only translates."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import PurePath

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from leukonet.predict import differential
from leukonet.station.classify import Classifier, safe_name
from leukonet.station.db import NOT_A_LEUKOCYTE, Case, Cell, Image, Review, Upload, iso, now
from leukonet.station.storage import ImageStore, sha256


class Refused(Exception):
    """A request the station refuses: HTTP status and a message that says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def queue_key(cell: Cell) -> tuple:
    """Cells to look at first: not reviewed yet; then not a leukocyte, needs review, lowest confidence."""
    return (cell.review_label is not None, not cell.not_a_leukocyte, not cell.needs_review, cell.confidence, cell.id)


def cell_json(cell: Cell) -> dict:
    return {"id": cell.id, "case": cell.case_id, "file": cell.upload.name, "cell": cell.index, "x": cell.x, "y": cell.y,
            "image": f"/api/images/{cell.image_sha}",
            "heatmap": f"/api/images/{cell.heatmap_sha}" if cell.heatmap_sha else None,
            "predicted": cell.predicted, "top_class": cell.top_class, "probabilities": cell.probabilities,
            "confidence": cell.confidence, "needs_review": cell.needs_review, "not_a_leukocyte": cell.not_a_leukocyte,
            "ood_score": cell.ood_score, "ood_reason": cell.ood_reason, "notes": cell.notes,
            "checkpoint": PurePath(cell.checkpoint).name, "checkpoint_sha256": cell.checkpoint_sha256,
            "review_label": cell.review_label, "reviewer": cell.reviewer,
            "reviewed_at": iso(cell.reviewed_at)}


def _reviewer(name: object) -> str:
    name = "".join(ch for ch in str(name or "") if ch.isprintable()).strip()[:100]
    if not name:
        raise Refused(400, "give the reviewer's name (reviewer)")
    return name


@dataclass
class Station:
    sessions: sessionmaker
    store: ImageStore
    classifier: Classifier

    def __post_init__(self) -> None:
        self.write = threading.Lock()  # one writer at a time (SQLite has one anyway); classification runs outside it

    @property
    def labels(self) -> list[str]:
        return [*self.classifier.class_names, NOT_A_LEUKOCYTE]

    # cases ---------------------------------------------------------------------------------------------------
    def _case(self, s: Session, case_id: int, writable: bool = False) -> Case:
        case = s.get(Case, case_id)
        if case is None:
            raise Refused(404, f"no case {case_id}")
        if writable and case.signed_off_at is not None:
            raise Refused(409, f"case {case_id} was signed off by {case.signed_off_by} on "
                               f"{case.signed_off_at:%Y-%m-%d %H:%M} UTC: it is read-only")
        return case

    def create_case(self, note: str) -> dict:
        note = "".join(ch for ch in str(note or "") if ch.isprintable() or ch == "\n")[:2000]
        with self.write, self.sessions() as s, s.begin():
            case = Case(note=note, created_at=now())
            s.add(case)
            s.flush()
            return self._case_json(s, case)

    def list_cases(self) -> list[dict]:
        with self.sessions() as s:
            counts = dict(s.execute(select(Cell.case_id, func.count()).group_by(Cell.case_id)).all())
            reviewed = dict(s.execute(select(Cell.case_id, func.count()).where(Cell.review_label.is_not(None))
                                      .group_by(Cell.case_id)).all())
            return [{**self._case_head(c), "cells": counts.get(c.id, 0), "reviewed": reviewed.get(c.id, 0)}
                    for c in s.scalars(select(Case).order_by(Case.id.desc()))]

    def case(self, case_id: int) -> dict:
        with self.sessions() as s:
            return self._case_json(s, self._case(s, case_id))

    @staticmethod
    def _case_head(case: Case) -> dict:
        return {"id": case.id, "created": iso(case.created_at), "note": case.note, "signed_off_at": iso(case.signed_off_at),
                "signed_off_by": case.signed_off_by}

    def _case_json(self, s: Session, case: Case) -> dict:
        cells = list(case.cells)
        model = [c.predicted for c in cells if c.predicted is not None]
        reviewed = [c.review_label for c in cells if c.review_label not in (None, NOT_A_LEUKOCYTE)]
        names = self.classifier.class_names
        checkpoints = sorted({(PurePath(c.checkpoint).name, c.checkpoint_sha256[:12]) for c in cells})
        return {**self._case_head(case), "cells": len(cells),
                "reviewed": sum(c.review_label is not None for c in cells),
                "not_a_leukocyte": {"model": sum(c.not_a_leukocyte for c in cells),
                                    "reviewed": sum(c.review_label == NOT_A_LEUKOCYTE for c in cells)},
                "model_count": {"cells": len(model), "differential": differential(model, names)},
                "reviewed_count": {"cells": len(reviewed), "differential": differential(reviewed, names)},
                "checkpoints": [{"name": n, "sha256": h} for n, h in checkpoints],
                "errors": [{"file": u.name, "error": u.error} for u in case.uploads if u.error]}

    # uploads -------------------------------------------------------------------------------------------------
    def add_files(self, case_id: int, files: list[tuple[str | None, bytes]]) -> dict:
        """Classify and keep each file's cells; one result per file, in upload order. All the request's files are
        committed together, or none (a killed server leaves no half-added upload)."""
        limits = self.classifier.limits
        if not files:
            raise Refused(400, "no files in the upload (form field 'files')")
        if len(files) > limits.max_files:
            raise Refused(413, f"{len(files)} files in one upload; at most {limits.max_files}")
        with self.sessions() as s:
            self._case(s, case_id, writable=True)
        work, todo, seen = [], [], set()  # per file: [name, sha or None, bytes, cells or error]
        for filename, data in files:
            name = safe_name(filename)
            try:
                self.classifier.check(name, data)
            except ValueError as err:  # the type and size checks: the message names the file
                work.append([name, None, None, str(err)])
                continue
            digest = sha256(data)
            work.append([name, digest, data, []])
            if digest not in seen and not self._known(case_id, digest):  # a known file is not classified again
                todo.append(len(work) - 1)
            seen.add(digest)
        failed = {}
        for i, outcome in zip(todo, self.classifier.classify([(work[i][0], work[i][2]) for i in todo])):
            work[i][3] = outcome  # its cells, or load_rgb's reason
            if isinstance(outcome, str):
                failed[work[i][1]] = outcome
        for w in work:
            if w[1] in failed:  # the file, and any copy of it in the same request, was refused
                w[1], w[3] = None, failed[w[1]]
        with self.write, self.sessions() as s, s.begin():
            self._case(s, case_id, writable=True)  # signed off meanwhile?
            results, added = [], {}
            for name, digest, data, outcome in work:
                if isinstance(outcome, str):
                    s.add(Upload(case_id=case_id, name=name, error=outcome, created_at=now()))
                    results.append({"file": name, "error": outcome})
                    continue
                earlier = added.get(digest) or s.scalar(select(Upload).where(Upload.case_id == case_id,
                                                                             Upload.image_sha == digest))
                if earlier is not None:
                    results.append({"file": name, "duplicate_of": earlier.name,
                                    "cells": [cell_json(c) for c in earlier.cells]})
                    continue
                self._image(s, data, PurePath(name).suffix.lower())
                upload = Upload(case_id=case_id, image_sha=digest, name=name, created_at=now())
                s.add(upload)
                for r in outcome:
                    heat = self._image(s, r.heatmap_jpeg, ".jpg") if r.heatmap_jpeg else None
                    pixels = digest if r.image_png is None else self._image(s, r.image_png, ".png")
                    s.add(Cell(case_id=case_id, upload=upload, index=r.index, x=r.x, y=r.y,
                               image_sha=pixels, heatmap_sha=heat,
                               predicted=r.predicted, top_class=r.top_class, probabilities=r.probabilities,
                               confidence=r.confidence, needs_review=r.needs_review, not_a_leukocyte=r.not_a_leukocyte,
                               ood_score=r.ood_score, ood_reason=r.ood_reason, notes=r.notes,
                               checkpoint=self.classifier.checkpoint,
                               checkpoint_sha256=self.classifier.checkpoint_sha256, created_at=now()))
                s.flush()
                added[digest] = upload
                results.append({"file": name, "cells": [cell_json(c) for c in upload.cells]})
            return {"results": results}

    def _known(self, case_id: int, digest: str) -> bool:
        """A file this case already holds is not classified again: the write step answers with its cells."""
        with self.sessions() as s:
            return s.scalar(select(Upload.id).where(Upload.case_id == case_id, Upload.image_sha == digest)) is not None

    def _image(self, s: Session, data: bytes, suffix: str) -> str:
        digest = self.store.put(data, suffix)  # on disk before the row that names it is committed
        if s.get(Image, digest) is None:
            s.add(Image(sha256=digest, suffix=suffix, nbytes=len(data), created_at=now()))
        return digest

    def image(self, digest: str):
        with self.sessions() as s:
            image = s.get(Image, digest)
        if image is None:
            raise Refused(404, f"no image {digest}")
        return self.store.path(digest, image.suffix)

    # review --------------------------------------------------------------------------------------------------
    def queue(self, case_id: int) -> list[dict]:
        with self.sessions() as s:
            return [cell_json(c) for c in sorted(self._case(s, case_id).cells, key=queue_key)]

    def review(self, cell_id: int, label: str, reviewer: str) -> dict:
        if label not in self.labels:
            raise Refused(400, f"label {label!r} is none of {self.labels}")
        reviewer = _reviewer(reviewer)
        with self.write, self.sessions() as s, s.begin():
            cell = s.get(Cell, cell_id)
            if cell is None:
                raise Refused(404, f"no cell {cell_id}")
            self._case(s, cell.case_id, writable=True)
            s.add(Review(case_id=cell.case_id, cell_id=cell.id, label=label, reviewer=reviewer, created_at=now(),
                         previous_label=cell.review_label, previous_reviewer=cell.reviewer,
                         previous_reviewed_at=cell.reviewed_at))
            cell.review_label, cell.reviewer, cell.reviewed_at = label, reviewer, now()
            s.flush()
            return cell_json(cell)

    def undo(self, case_id: int) -> dict:
        """Take back the case's last review that is not undone yet: the cell returns to what it was before it."""
        with self.write, self.sessions() as s, s.begin():
            self._case(s, case_id, writable=True)
            last = s.scalar(select(Review).where(Review.case_id == case_id, Review.undone_at.is_(None))
                            .order_by(Review.id.desc()).limit(1))
            if last is None:
                raise Refused(409, f"case {case_id} has no review to undo")
            cell = s.get(Cell, last.cell_id)
            cell.review_label, cell.reviewer, cell.reviewed_at = (last.previous_label, last.previous_reviewer,
                                                                  last.previous_reviewed_at)
            last.undone_at = now()
            s.flush()
            return cell_json(cell)

    def sign_off(self, case_id: int, reviewer: str) -> dict:
        reviewer = _reviewer(reviewer)
        with self.write, self.sessions() as s, s.begin():
            case = self._case(s, case_id, writable=True)
            case.signed_off_at, case.signed_off_by = now(), reviewer
            s.flush()
            return self._case_json(s, case)
