"""The review station (leukonet.station) through FastAPI's TestClient: the schema and its migrations, the image
store, who may connect, uploads and their checks, the review queue, undo, sign-off, the exports and the manifest
that adapt and train read, and a restart that finds everything still there."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import create_engine, text

from conftest import compose_cfg, run_module
from leukonet.adapt.cells import decode, read_labels
from leukonet.data.cells import synthetic_field
from leukonet.data.manifest import read_manifest
from leukonet.errors import DataError, RunExistsError
from leukonet.station.access import check_host
from leukonet.station.app import create_app
from leukonet.station.db import Base, open_database
from leukonet.station.export import export
from leukonet.station.storage import ImageStore

CLASSES = ["basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"]
TOKEN = "a-token-of-sixteen-chars"


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def jpeg(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def station_cfg(trained_run: Path, station_dir: Path, *extra: str):
    return compose_cfg("serve", [f"ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}", f"station_dir={station_dir}",
                                 "max_file_mb=0.1", "max_request_mb=0.5", "max_files=20", *extra])


@pytest.fixture(scope="module")
def client(trained_run: Path, tmp_path_factory):
    station_dir = tmp_path_factory.mktemp("station")
    app = create_app(station_cfg(trained_run, station_dir))
    with TestClient(app, base_url="http://127.0.0.1") as c:
        c.station_dir = station_dir
        yield c


def test_schema_is_versioned_and_matches_the_models(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db' / 'station.db'}"
    with pytest.raises(DataError, match="no database"):
        open_database(url, create=False)
    sessions = open_database(url)
    engine = sessions.kw["bind"]
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []  # migration == models
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
    open_database(url, create=False)  # at head: opened as it is
    plain = create_engine(url)
    with plain.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    with pytest.raises(DataError, match="newer than this leukonet knows"):
        open_database(url)


def test_image_store_is_content_addressed_and_atomic(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images")
    a = store.put(b"pixels", ".png")
    assert store.put(b"pixels", ".png") == a and store.verify(a, ".png")
    assert [p.name for p in (tmp_path / "images").rglob("*") if p.is_file()] == [f"{a}.png"]  # once, no temp file
    for digest, suffix in (("../../etc/passwd", ".png"), (a, "/x"), (a.upper(), ".png")):
        with pytest.raises(ValueError, match="not a stored image name"):
            store.path(digest, suffix)


def test_station_binds_to_this_machine_unless_given_a_token(tmp_path: Path) -> None:
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        check_host(compose_cfg("serve", ["ckpt_path=x", f"host={host}"]))
    for host in ("0.0.0.0", "192.168.1.10", "example.org"):
        with pytest.raises(DataError, match="allow_remote=true"):
            check_host(compose_cfg("serve", ["ckpt_path=x", f"host={host}"]))
    with pytest.raises(DataError, match="needs token"):  # never an open remote page
        check_host(compose_cfg("serve", ["ckpt_path=x", "host=0.0.0.0", "allow_remote=true"]))
    with pytest.raises(DataError, match="at least 16"):
        check_host(compose_cfg("serve", ["ckpt_path=x", "token=short"]))
    check_host(compose_cfg("serve", ["ckpt_path=x", "host=0.0.0.0", "allow_remote=true", f"token={TOKEN}"]))
    assert compose_cfg("serve", ["ckpt_path=x"]).host == "127.0.0.1"
    proc = run_module("leukonet.serve", f"ckpt_path={tmp_path / 'none.ckpt'}", "host=0.0.0.0")
    assert proc.returncode == 2 and "allow_remote=true" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "station").exists()


def test_a_token_is_asked_of_every_request(trained_run: Path, tmp_path: Path) -> None:
    app = create_app(station_cfg(trained_run, tmp_path / "st", f"token={TOKEN}"))
    with TestClient(app, base_url="http://127.0.0.1") as c:
        for path in ("/", "/api/info", "/docs", "/openapi.json", "/api/cases"):
            assert c.get(path).status_code == 401, path
        assert c.get("/api/info", headers={"Authorization": f"Bearer {TOKEN}x"}).status_code == 401
        assert c.get("/api/info", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        assert c.get("/?token=wrong", follow_redirects=False).status_code == 401
        res = c.get(f"/?token={TOKEN}", follow_redirects=False)  # once: then a cookie
        assert res.status_code == 303 and res.headers["location"] == "/"
        assert c.get("/api/cases").status_code == 200


def test_uploads_are_checked_kept_and_recognised(client: TestClient, cells: Path) -> None:
    case = client.post("/api/cases", json={"note": "slide 1"}).json()
    good = sorted((cells / "lymphocyte").glob("*.png"))[0].read_bytes()
    big = png(np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8))  # over 0.1 MB
    bomb = io.BytesIO()
    Image.new("L", (8_000, 8_000)).save(bomb, format="PNG")
    field, truth = synthetic_field(np.random.default_rng(0), (360, 480), 3, ["neutrophil", "lymphocyte", "eosinophil"])
    files = [("good.png", good), ("field.jpg", jpeg(field)), ("notes.jpg", b"just some text\n"), ("readme.txt", good),
             ("big.png", big), ("bomb.png", bomb.getvalue()), ("empty.png", b""),
             ("blank.png", png(np.full((64, 64, 3), 235, np.uint8))), ("../../etc/evil.png", good),
             ("notes-again.jpg", b"just some text\n")]
    res = client.post(f"/api/cases/{case['id']}/files", files=[("files", f) for f in files])
    assert res.status_code == 200, res.text
    results = {r["file"]: r for r in res.json()["results"]}
    assert list(results) == ["good.png", "field.jpg", "notes.jpg", "readme.txt", "big.png", "bomb.png", "empty.png",
                             "blank.png", "evil.png", "notes-again.jpg"]
    (cell,) = results["good.png"]["cells"]
    assert cell["top_class"] in CLASSES and cell["confidence"] == max(cell["probabilities"].values())
    assert cell["checkpoint"] == "last.ckpt" and len(cell["checkpoint_sha256"]) == 64
    shown = client.get(cell["heatmap"])
    assert shown.status_code == 200 and Image.open(io.BytesIO(shown.content)).mode == "RGB"
    assert [c["cell"] for c in results["field.jpg"]["cells"]] == list(range(len(truth)))  # one crop per leukocyte
    assert results["notes.jpg"]["error"].startswith("notes.jpg: not a readable image")
    assert "not a readable image" in results["notes-again.jpg"]["error"]  # a copy of a refused file: refused too
    assert "not an accepted image type (.txt)" in results["readme.txt"]["error"]
    assert results["big.png"]["error"].startswith("big.png: too large (0.12 MB); the limit is 0.1 MB a file")
    assert "bomb.png: too large, refused before decoding" in results["bomb.png"]["error"]
    assert results["empty.png"]["error"] == "empty.png: empty file (0 bytes)"
    (flagged,) = results["blank.png"]["cells"]
    assert flagged["not_a_leukocyte"] and flagged["ood_reason"] == "no nucleus" and flagged["predicted"] is None
    # the same image again, under another (path-like) name: recognised, not stored or counted twice
    assert results["evil.png"] == {"file": "evil.png", "duplicate_of": "good.png", "cells": [cell]}
    again = client.post(f"/api/cases/{case['id']}/files", files=[("files", ("copy.png", good))]).json()
    assert again["results"][0]["duplicate_of"] == "good.png"
    stored = [p for p in (client.station_dir / "images").rglob("*") if p.is_file()]
    assert not any(p.name.startswith(".") or "evil" in p.name for p in stored)
    summary = client.get(f"/api/cases/{case['id']}").json()
    assert summary["cells"] == 2 + len(truth)
    assert {e["file"] for e in summary["errors"]} == {"notes.jpg", "readme.txt", "big.png", "bomb.png", "empty.png",
                                                      "notes-again.jpg"}
    assert summary["checkpoints"][0]["name"] == "last.ckpt"
    # requests refused as a whole
    assert client.post(f"/api/cases/{case['id']}/files", files=[("files", (f"{i}.png", good)) for i in range(21)]
                       ).status_code == 413
    assert client.post("/api/cases/999/files", files=[("files", ("a.png", good))]).status_code == 404
    assert client.post(f"/api/cases/{case['id']}/files", json={}).status_code == 422
    assert client.post("/api/cases", json={"note": "x"}, headers={"Origin": "http://evil.example"}).status_code == 403
    assert client.get("/api/info", headers={"Host": "evil.example"}).status_code == 403


def test_review_queue_undo_sign_off_and_exports(client: TestClient, cells: Path, tmp_path: Path) -> None:
    case = client.post("/api/cases", json={"note": "slide <b>B</b>"}).json()["id"]
    files = [("files", (f"{c}.png", sorted((cells / c).glob("*.png"))[1].read_bytes())) for c in CLASSES]
    files.append(("files", ("blank.png", png(np.full((64, 64, 3), 235, np.uint8)))))
    assert client.post(f"/api/cases/{case}/files", files=files).status_code == 200
    queue = client.get(f"/api/cases/{case}/cells").json()
    assert len(queue) == 6 and queue[0]["file"] == "blank.png"  # not a leukocyte first
    rest = [c for c in queue if not c["not_a_leukocyte"]]
    key = [(not c["needs_review"], c["confidence"]) for c in rest]
    assert key == sorted(key)  # then needs review, then lowest confidence

    def review(cell: dict, label: str) -> dict:
        res = client.post(f"/api/cells/{cell['id']}/review", json={"label": label, "reviewer": "ann"})
        assert res.status_code == 200, res.text
        return res.json()

    review(queue[0], "not_a_leukocyte")
    review(rest[0], "monocyte")
    review(rest[1], "basophil")
    review(rest[1], "eosinophil")  # changed her mind
    assert client.post(f"/api/cells/{rest[2]['id']}/review", json={"label": "pickle", "reviewer": "ann"}).status_code == 400
    assert client.post(f"/api/cells/{rest[2]['id']}/review", json={"label": "monocyte", "reviewer": " "}).status_code == 400
    assert client.post(f"/api/cases/{case}/undo").json()["review_label"] == "basophil"  # back to the first answer
    summary = client.get(f"/api/cases/{case}").json()
    assert summary["reviewed"] == 3 and summary["not_a_leukocyte"]["reviewed"] == 1
    reviewed = {r["class"]: r["cells"] for r in summary["reviewed_count"]["differential"]}
    assert summary["reviewed_count"]["cells"] == 2 and reviewed["monocyte"] == 1 and reviewed["basophil"] == 1
    assert summary["model_count"]["cells"] == sum(c["predicted"] is not None for c in queue)
    after = client.get(f"/api/cases/{case}/cells").json()
    assert [c["review_label"] is None for c in after] == [True] * 3 + [False] * 3  # unreviewed first

    signed = client.post(f"/api/cases/{case}/sign-off", json={"reviewer": "ann"}).json()
    assert signed["signed_off_by"] == "ann" and signed["signed_off_at"]
    for res in (client.post(f"/api/cells/{rest[3]['id']}/review", json={"label": "monocyte", "reviewer": "ann"}),
                client.post(f"/api/cases/{case}/undo"), client.post(f"/api/cases/{case}/sign-off", json={"reviewer": "b"}),
                client.post(f"/api/cases/{case}/files", files=[files[0]])):
        assert res.status_code == 409 and "read-only" in res.json()["error"]

    rows = list(csv.DictReader(io.StringIO(client.get(f"/api/cases/{case}/export.csv").text)))
    assert len(rows) == 6 and {r["review_label"] for r in rows} == {"", "not_a_leukocyte", "monocyte", "basophil"}
    report = client.get(f"/api/cases/{case}/report.html")
    assert report.status_code == 200 and "Signed off by ann" in report.text and "<script" not in report.text
    assert "slide &lt;b&gt;B&lt;/b&gt;" in report.text  # what people typed is text, never markup
    assert "script-src" not in report.headers["content-security-policy"]

    # the manifest: reviewed leukocytes only, read by train's manifest reader and by adapt's label reader
    manifest = tmp_path / "labels.csv"
    manifest.write_text(client.get(f"/api/cases/{case}/manifest.csv").text)
    entries, split = read_manifest(manifest)
    assert split is None and sorted(CLASSES[e.label] for e in entries) == ["basophil", "monocyte"]
    assert all((manifest.parent / e.path).is_file() for e in entries)
    everything = tmp_path / "cells.csv"  # every cell for adapt's target.manifest, the unreviewed unlabelled
    everything.write_text(client.get(f"/api/cases/{case}/manifest.csv?unreviewed=true").text)
    with everything.open() as f:
        paths = [Path(r["path"]) for r in csv.DictReader(f)]
    labels = read_labels(manifest, decode(paths, 32))
    assert sorted(CLASSES[k] for k in labels if k >= 0) == ["basophil", "monocyte"] and (labels < 0).sum() == 3

    # the same through the command, on the same database
    out = tmp_path / "cmd" / "labels.csv"
    args = [f"station_dir={client.station_dir}", f"case={case}", f"out={out}"]
    proc = run_module("leukonet.station.export", *args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.read_text() == manifest.read_text()
    with pytest.raises(RunExistsError, match="exists"):  # never overwritten
        export(compose_cfg("station_export", args))
    with pytest.raises(DataError, match="no database"):  # never created by an export
        export(compose_cfg("station_export", [f"station_dir={tmp_path / 'none'}", f"out={tmp_path / 'x.csv'}"]))
    assert not (tmp_path / "none").exists()


def test_a_restart_finds_everything(client: TestClient, trained_run: Path) -> None:
    before = client.get("/api/cases").json()
    assert before  # the earlier tests' cases
    app = create_app(station_cfg(trained_run, client.station_dir))  # a second server on the same database
    with TestClient(app, base_url="http://127.0.0.1") as again:
        assert again.get("/api/cases").json() == before
        for case in before:
            assert again.get(f"/api/cases/{case['id']}/cells").json() == client.get(f"/api/cases/{case['id']}/cells").json()


def test_api_docs_are_served_from_this_machine(client: TestClient) -> None:
    page = client.get("/docs")
    assert page.status_code == 200 and "/docs/swagger-ui-bundle.js" in page.text and "http" not in page.text.split("<body>")[0]
    assert client.get("/docs/swagger-ui-bundle.js").status_code == 200
    spec = client.get("/openapi.json").json()
    assert spec["openapi"].startswith("3.0") and "/api/cases/{case_id}/files" in spec["paths"]


def test_csv_cells_never_start_a_formula() -> None:
    from leukonet.station.exports import _cell

    assert [_cell(v) for v in ("=1+1", "+x", "-2", "@a", "cell.png", 3)] == ["'=1+1", "'+x", "'-2", "'@a", "cell.png", 3]
