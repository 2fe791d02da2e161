"""The station over HTTP: FastAPI routes (OpenAPI docs at ``/docs``, served from this machine), the static page,
and the guards every request passes: a loopback server answers only loopback host names (against DNS rebinding),
a page may only post to its own server, a server with a token answers nobody without it, and a request body over
the cap is refused before it is read."""

from __future__ import annotations

import secrets
import traceback
from pathlib import Path

import swagger_ui_bundle
from fastapi import Body, FastAPI, File, Query, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from omegaconf import DictConfig
from sqlalchemy.engine import make_url

from leukonet.data.folder import IMAGE_EXTENSIONS
from leukonet.predict import Predictor
from leukonet.station.access import check_host, is_loopback
from leukonet.station.cases import Refused, Station
from leukonet.station.classify import Classifier
from leukonet.station.db import Case, open_database
from leukonet.station.exports import cells_csv, manifest_csv, manifest_rows, report_html
from leukonet.station.storage import ImageStore

STATIC = Path(__file__).parent / "static"
SWAGGER = Path(swagger_ui_bundle.swagger_ui_path)
TOKEN_COOKIE = "leukonet_token"
MAX_JSON = 1 << 16  # bytes: a review, a note
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
DOCS_CSP = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
            "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
REPORT_CSP = "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"
# the only files served: fixed names, no path taken from the URL
FILES = {"/": (STATIC / "index.html", "text/html; charset=utf-8"),
         "/app.js": (STATIC / "app.js", "text/javascript; charset=utf-8"),
         "/style.css": (STATIC / "style.css", "text/css; charset=utf-8"),
         "/docs": (STATIC / "docs.html", "text/html; charset=utf-8"),
         "/docs/docs.js": (STATIC / "docs.js", "text/javascript; charset=utf-8"),
         "/docs/swagger-ui-bundle.js": (SWAGGER / "swagger-ui-bundle.js", "text/javascript; charset=utf-8"),
         "/docs/swagger-ui.css": (SWAGGER / "swagger-ui.css", "text/css; charset=utf-8")}
MEDIA = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".bmp": "image/bmp", ".gif": "image/gif",
         ".tif": "image/tiff", ".tiff": "image/tiff", ".webp": "image/webp"}


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(cfg: DictConfig, predictor: Predictor | None = None) -> FastAPI:
    """The station for ``cfg`` (``conf/serve.yaml``): the database created or upgraded, the checkpoint loaded
    unless ``predictor`` is given."""
    check_host(cfg)
    classifier = Classifier(cfg, predictor)
    station = Station(open_database(str(cfg.db_url)), ImageStore(Path(str(cfg.station_dir)) / "images"), classifier)
    limits, token = classifier.limits, cfg.get("token")
    local_only = is_loopback(str(cfg.host))
    app = FastAPI(title="leukonet review station", version="1", docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json", description="Cases, their classified cells, the review queue and "
                                                           "the exports.")
    app.openapi_version = "3.0.3"  # the bundled Swagger UI (4.x) reads OpenAPI 3.0
    app.state.station = station

    def refusal(request: Request) -> Response | None:
        """The answer to a request that goes no further, or None."""
        host = request.headers.get("host", "")
        if local_only and not is_loopback(host):
            return _error(403, f"host {host!r} is not this local server")
        origin = request.headers.get("origin")
        if origin and origin != "null" and origin.split("://", 1)[-1] != host:
            return _error(403, f"cross-origin request from {origin} refused")
        if token:
            if request.url.path == "/" and request.method == "GET" and "token" in request.query_params:
                if not secrets.compare_digest(request.query_params["token"].encode(), str(token).encode()):
                    return _error(401, "wrong token")
                res = RedirectResponse("/", status_code=303)  # the token leaves the address bar for a cookie
                res.set_cookie(TOKEN_COOKIE, str(token), httponly=True, samesite="strict")
                return res
            given = request.cookies.get(TOKEN_COOKIE) or request.headers.get("authorization", "").removeprefix("Bearer ")
            if not secrets.compare_digest(given.encode(), str(token).encode()):
                return _error(401, "this station needs its token: open /?token=... or send Authorization: Bearer ...")
        if request.method in ("POST", "PUT", "PATCH"):
            if "chunked" in request.headers.get("transfer-encoding", "").lower():
                return _error(411, "chunked uploads are not accepted; send Content-Length")
            try:
                length = int(request.headers.get("content-length", ""))
            except ValueError:
                return _error(411, "Content-Length required")
            cap = limits.max_request if request.url.path.endswith("/files") else MAX_JSON
            if length > cap:  # refused before the body is read
                return _error(413, f"request of {length / 1e6:.3g} MB refused: the limit is {cap / 1e6:g} MB a request")
        return None

    @app.middleware("http")
    async def guard(request: Request, call_next):
        response = refusal(request)
        if response is None:
            try:
                response = await call_next(request)
            except Exception as err:  # noqa: BLE001 - the server outlives any one request
                traceback.print_exc()
                response = _error(500, f"internal error ({type(err).__name__})")
        path = request.url.path
        csp = DOCS_CSP if path.startswith("/docs") else REPORT_CSP if path.endswith("report.html") else PAGE_CSP
        response.headers.setdefault("Content-Security-Policy", csp)
        response.headers.setdefault("Cache-Control", "no-store")
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        return response

    @app.exception_handler(Refused)
    async def refused(_request: Request, err: Refused) -> JSONResponse:
        return _error(err.status, str(err))

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()))
        return _error(422, f"{where}: {first.get('msg', 'invalid request')}")

    for url, (file, media) in FILES.items():
        app.add_api_route(url, lambda file=file, media=media: FileResponse(file, media_type=media),
                          methods=["GET"], include_in_schema=False)

    @app.get("/api/info", tags=["station"])
    def info() -> dict:
        """The model, its classes and review threshold, and the upload limits."""
        return {"checkpoint": Path(classifier.checkpoint).name, "checkpoint_sha256": classifier.checkpoint_sha256,
                "classes": classifier.class_names, "labels": station.labels,
                "review_threshold": classifier.review_threshold, "review_threshold_from": classifier.review_threshold_from,
                "ood_check": "cell finder and features" if getattr(classifier.predictor, "ood", None) is not None
                             else "cell finder only (no feature statistics in the model)",
                "max_file_bytes": limits.max_file, "max_request_bytes": limits.max_request,
                "max_files": limits.max_files, "extensions": sorted(IMAGE_EXTENSIONS), "explain": classifier.explain,
                "database": make_url(str(cfg.db_url)).get_backend_name()}

    @app.get("/api/cases", tags=["cases"])
    def cases() -> list[dict]:
        return station.list_cases()

    @app.post("/api/cases", tags=["cases"], status_code=201)
    def new_case(note: str = Body("", embed=True, max_length=2000)) -> dict:
        """A new case: one slide or sample."""
        return station.create_case(note)

    @app.get("/api/cases/{case_id}", tags=["cases"])
    def case(case_id: int) -> dict:
        """The case with both differential counts (model, reviewed), its checkpoints and refused files."""
        return station.case(case_id)

    @app.post("/api/cases/{case_id}/files", tags=["cases"])
    def add_files(case_id: int, files: list[UploadFile] = File(..., description="cell images or whole fields")) -> dict:
        """Classify the files' cells and keep them in the case; one result per file (its cells, the upload it
        duplicates, or why it was refused)."""
        return station.add_files(case_id, [(f.filename, f.file.read()) for f in files])  # within max_request

    @app.get("/api/cases/{case_id}/cells", tags=["review"])
    def queue(case_id: int) -> list[dict]:
        """Every cell, in review order: unreviewed first (not a leukocyte, needs review, lowest confidence)."""
        return station.queue(case_id)

    @app.post("/api/cells/{cell_id}/review", tags=["review"])
    def review(cell_id: int, label: str = Body(..., embed=True), reviewer: str = Body(..., embed=True)) -> dict:
        """Confirm or correct a cell: a class, or ``not_a_leukocyte``."""
        return station.review(cell_id, label, reviewer)

    @app.post("/api/cases/{case_id}/undo", tags=["review"])
    def undo(case_id: int) -> dict:
        """Take back the case's last review."""
        return station.undo(case_id)

    @app.post("/api/cases/{case_id}/sign-off", tags=["review"])
    def sign_off(case_id: int, reviewer: str = Body(..., embed=True)) -> dict:
        """Sign the count off: the case is read-only from then on."""
        return station.sign_off(case_id, reviewer)

    def _with_case(case_id: int, make):
        with station.sessions() as s:
            found = s.get(Case, case_id)
            if found is None:
                raise Refused(404, f"no case {case_id}")
            return make(found)

    @app.get("/api/cases/{case_id}/export.csv", tags=["exports"])
    def export_csv(case_id: int) -> Response:
        """Every cell of the case: the model's answer and the review."""
        text = _with_case(case_id, lambda c: cells_csv(c, classifier.class_names))
        return Response(text, media_type="text/csv; charset=utf-8",
                        headers={"Content-Disposition": f'attachment; filename="case-{case_id}.csv"'})

    @app.get("/api/cases/{case_id}/report.html", tags=["exports"], response_class=HTMLResponse)
    def report(case_id: int) -> HTMLResponse:
        """The printable report: both counts with exact 95 % intervals, the cells, who signed it off."""
        summary = station.case(case_id)
        return HTMLResponse(_with_case(case_id, lambda c: report_html(summary, c)))

    def _manifest(case_id: int | None, unreviewed: bool, name: str) -> Response:
        rows = manifest_rows(station.sessions, station.store, case_id, unreviewed)
        return Response(manifest_csv(rows), media_type="text/csv; charset=utf-8",
                        headers={"Content-Disposition": f'attachment; filename="{name}"'})

    @app.get("/api/cases/{case_id}/manifest.csv", tags=["exports"])
    def case_manifest(case_id: int, unreviewed: bool = Query(False, description="every cell; unreviewed: no label")):
        """The case's reviewed cells as ``path,label,source`` for ``adapt target.labels=`` / ``train data.manifest=``."""
        station.case(case_id)
        return _manifest(case_id, unreviewed, f"case-{case_id}-manifest.csv")

    @app.get("/api/manifest.csv", tags=["exports"])
    def all_manifest(unreviewed: bool = Query(False, description="every cell; unreviewed: no label")):
        """The reviewed cells of every case."""
        return _manifest(None, unreviewed, "station-manifest.csv")

    @app.get("/api/images/{digest}", tags=["review"])
    def image(digest: str = PathParam(pattern=r"^[0-9a-f]{64}$")) -> FileResponse:
        """A stored image by its SHA-256 (a cell, a heat map, an upload)."""
        path = station.image(digest)
        return FileResponse(path, media_type=MEDIA[path.suffix],
                            headers={"Cache-Control": "private, max-age=31536000, immutable"})

    return app
