"""A local web page: ``python -m leukonet.serve ckpt_path=RUN/checkpoints/last.ckpt`` -> http://127.0.0.1:8000/.

Drop one or many cell images (or whole fields) on the page: each cell gets its thumbnail, class,
confidence, review flag (or the not-a-leukocyte flag of ``leukonet.ood``) and Grad-CAM heat map, and the page keeps the differential count of everything
uploaded since it was opened, with 95 % confidence intervals. A file that cannot be used gets its own
error message (its name and the reason from ``load_rgb``); the server goes on.

Safety: the server binds to 127.0.0.1 unless ``allow_remote=true``; uploads are capped per file and per
request; a file must have an image extension and then decode with ``load_rgb`` (which refuses
decompression bombs before decoding); uploads are parsed in memory and never written to disk; nothing
from the user is unpickled (images are decoded by Pillow, JSON by ``json``). Only the standard library's
HTTP server is used: one model, one lock, a few users on one machine.
"""

from __future__ import annotations

import base64
import io
import ipaddress
import json
import math
import re
import signal
import sys
import threading
import traceback
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePath
from urllib.parse import urlsplit

import hydra
import numpy as np
from omegaconf import DictConfig
from PIL import Image

from leukonet.data.folder import IMAGE_EXTENSIONS, load_rgb
from leukonet.errors import DataError, exit_on_user_error
from leukonet.explain import heatmaps, overlay
from leukonet.predict import Predictor, _review_threshold, assess, cells_of, differential
from leukonet.train import CONF

WEB = Path(__file__).parent / "web"
STATIC = {"/": ("index.html", "text/html; charset=utf-8"), "/index.html": ("index.html", "text/html; charset=utf-8"),
          "/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/style.css": ("style.css", "text/css; charset=utf-8")}  # the only files served: no path from the URL
THUMB = 192  # px: the longer side of thumbnails and heat maps sent to the page
MAX_JSON = 1 << 20  # bytes: the differential request (a list of class names)
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class RequestError(Exception):
    """A request the server refuses as a whole: HTTP status and message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass
class Limits:
    max_file: int  # bytes
    max_request: int  # bytes
    max_files: int

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> Limits:
        limits = cls(int(float(cfg.max_file_mb) * 1e6), int(float(cfg.max_request_mb) * 1e6), int(cfg.max_files))
        if min(limits.max_file, limits.max_request, limits.max_files) <= 0:
            raise DataError("max_file_mb, max_request_mb and max_files must be positive")
        return limits


def parse_multipart(body: bytes, content_type: str) -> list[tuple[str, str | None, bytes]]:
    """``(field name, file name or None, content)`` of each part of a ``multipart/form-data`` body."""
    match = re.search(r'boundary=(?:"([^"]+)"|([^;\s]+))', content_type)
    if not content_type.lower().startswith("multipart/form-data") or not match:
        raise RequestError(HTTPStatus.BAD_REQUEST, "expected multipart/form-data with a boundary")
    delimiter = b"--" + (match.group(1) or match.group(2)).encode("latin-1")
    chunks = body.split(delimiter)
    if len(chunks) < 3 or not chunks[-1].startswith(b"--"):
        raise RequestError(HTTPStatus.BAD_REQUEST, "malformed multipart body")
    parts = []
    for chunk in chunks[1:-1]:
        head, sep, content = chunk.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        if not sep or not content.endswith(b"\r\n"):
            raise RequestError(HTTPStatus.BAD_REQUEST, "malformed multipart part")
        headers = head.decode("utf-8", "replace")
        disposition = next((h for h in headers.split("\r\n") if h.lower().startswith("content-disposition:")), "")
        name = re.search(r'\bname="([^"]*)"', disposition)
        filename = re.search(r'\bfilename="([^"]*)"', disposition)
        parts.append((name.group(1) if name else "", filename.group(1) if filename else None, content[:-2]))
    return parts


def safe_name(filename: str) -> str:
    """The file's base name as shown on the page: no folders, no control characters, at most 200 characters."""
    name = PurePath(filename.replace("\\", "/")).name
    name = "".join(ch for ch in name if ch.isprintable())[:200]
    return name or "unnamed"


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None  # JSON has no NaN or Infinity


def png_data_url(pixels: np.ndarray, longest: int = THUMB) -> str:
    im = Image.fromarray(pixels)
    im.thumbnail((longest, longest), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class App:
    """The model and the request logic, apart from HTTP, so tests can call it directly."""

    def __init__(self, cfg: DictConfig, predictor: Predictor) -> None:
        self.cfg, self.predictor, self.limits = cfg, predictor, Limits.from_cfg(cfg)
        self.class_names = predictor.class_names
        # as in predict: the configured threshold, else the checkpoint's (calibration), else 0.9
        self.review_threshold, self.review_threshold_from = _review_threshold(cfg.get("review_threshold"), predictor)
        self.fields = str(cfg.fields).lower()
        if self.fields not in ("auto", "true", "false"):
            raise DataError(f"fields must be auto, true or false, got {cfg.fields!r}")
        self.lock = threading.Lock()  # one model: one request at a time runs it

    def info(self) -> dict:
        return {"checkpoint": Path(str(self.cfg.ckpt_path)).name, "classes": self.class_names,
                "review_threshold": self.review_threshold, "review_threshold_from": self.review_threshold_from,
                "ood_check": "cell finder and features" if getattr(self.predictor, "ood", None) is not None
                             else "cell finder only (no feature statistics in the model)",
                "max_file_bytes": self.limits.max_file,
                "max_request_bytes": self.limits.max_request, "max_files": self.limits.max_files,
                "extensions": sorted(IMAGE_EXTENSIONS), "explain": bool(self.cfg.explain)}

    def classify(self, parts: list[tuple[str, str | None, bytes]]) -> dict:
        """One result per uploaded file, in upload order: its cells, or its error."""
        files = [(safe_name(fn), data) for _, fn, data in parts if fn is not None]
        if not files:
            raise RequestError(HTTPStatus.BAD_REQUEST, "no files in the upload (form field 'files')")
        if len(files) > self.limits.max_files:
            raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                               f"{len(files)} files in one upload; at most {self.limits.max_files}")
        results = []
        for name, data in files:
            try:
                results.append({"file": name, "cells": self._classify_one(name, data)})
            except ValueError as err:  # load_rgb's reason, or our own type and size checks
                results.append({"file": name, "error": str(err)})
            except Exception as err:  # noqa: BLE001 - a bug on one file must not cost the others
                traceback.print_exc()
                results.append({"file": name, "error": f"{name}: internal error ({type(err).__name__}: {err})"})
        return {"results": results}

    def _classify_one(self, name: str, data: bytes) -> list[dict]:
        suffix = PurePath(name).suffix.lower()
        if suffix not in IMAGE_EXTENSIONS:
            raise ValueError(f"{name}: not an accepted image type ({suffix or 'no extension'}); "
                             f"accepted: {', '.join(sorted(IMAGE_EXTENSIONS))}")
        if len(data) > self.limits.max_file:
            raise ValueError(f"{name}: too large ({len(data) / 1e6:.3g} MB); "
                             f"the limit is {self.limits.max_file / 1e6:g} MB a file")
        notes: list[str] = []
        image = load_rgb(name, notes=notes, data=data)  # content check: ValueError names the file and the reason
        cells = cells_of(image, name, self.fields)  # a whole field: one crop per leukocyte found
        with self.lock:
            probs, checks = assess(self.predictor, cells)  # probabilities and the not-a-leukocyte check
            classes = probs.argmax(1).tolist()
            heats = heatmaps(self.predictor.model, [c.pixels for c in cells], classes) if self.cfg.explain else None
        rows = []
        for i, (cell, p, k, check) in enumerate(zip(cells, probs, classes, checks)):
            flagged = bool(check["not_a_leukocyte"])
            # as in predict: a flagged input gets no class and is not counted; needs_review is for the leukocytes
            row = {"file": name, "cell": cell.index, "x": cell.x, "y": cell.y,
                   "predicted": None if flagged else self.class_names[k], "top_class": self.class_names[k],
                   "confidence": round(float(p[k]), 6),
                   "probabilities": {n: round(float(q), 6) for n, q in zip(self.class_names, p)},
                   "needs_review": bool(not flagged and p[k] < self.review_threshold), "not_a_leukocyte": flagged,
                   "ood_score": _finite(check["ood_score"]), "ood_reason": check["ood_reason"], "notes": notes,
                   "thumbnail": png_data_url(cell.pixels)}
            if heats is not None:
                row["heatmap"] = png_data_url(overlay(cell.pixels, heats[i]))
            rows.append(row)
        return rows

    def differential(self, labels: object) -> dict:
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise RequestError(HTTPStatus.BAD_REQUEST, "expected {\"labels\": [class name, ...]}")
        unknown = sorted(set(labels) - set(self.class_names))
        if unknown:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"unknown classes {unknown[:5]}; known: {self.class_names}")
        return {"cells": len(labels), "differential": differential(labels, self.class_names)}


class Handler(BaseHTTPRequestHandler):
    server_version = "leukonet"
    sys_version = ""
    app: App  # set on the subclass made by make_server
    local_only: bool

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - BaseHTTPRequestHandler's signature
        sys.stderr.write(f"{self.address_string()} - {format % args}\n")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in SECURITY_HEADERS.items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, payload: dict) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json")

    def _check_origin(self) -> None:
        """Against DNS rebinding and cross-site posts: a loopback server answers only loopback host names, and
        a request from a page must come from this server's own page."""
        host = self.headers.get("Host", "")
        if self.local_only and not is_loopback(urlsplit(f"//{host}").hostname or ""):
            raise RequestError(HTTPStatus.FORBIDDEN, f"host {host!r} is not this local server")
        origin = self.headers.get("Origin")
        if origin and origin != "null" and urlsplit(origin).netloc != host:
            raise RequestError(HTTPStatus.FORBIDDEN, f"cross-origin request from {origin} refused")

    def _body(self, limit: int) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise RequestError(HTTPStatus.LENGTH_REQUIRED, "chunked uploads are not accepted; send Content-Length")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self.close_connection = True
            raise RequestError(HTTPStatus.LENGTH_REQUIRED, "Content-Length required") from None
        if length < 0 or length > limit:
            self.close_connection = True  # the body is never read
            raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                               f"upload of {length / 1e6:.3g} MB refused: the limit is {limit / 1e6:g} MB a request")
        return self.rfile.read(length)

    def _handle(self, route) -> None:
        try:
            self._check_origin()
            route()
        except RequestError as err:
            self._json(err.status, {"error": str(err)})
        except Exception as err:  # noqa: BLE001 - the server outlives any one request
            traceback.print_exc()
            self.close_connection = True
            self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"internal error ({type(err).__name__})"})

    def do_GET(self) -> None:
        self._handle(self._get)

    do_HEAD = do_GET

    def do_POST(self) -> None:
        self._handle(self._post)

    def _get(self) -> None:
        path = urlsplit(self.path).path
        if path == "/api/info":
            self._json(HTTPStatus.OK, self.app.info())
        elif path in STATIC:
            name, content_type = STATIC[path]
            self._send(HTTPStatus.OK, (WEB / name).read_bytes(), content_type)
        else:
            self._json(HTTPStatus.NOT_FOUND, {"error": f"not found: {path}"})

    def _post(self) -> None:
        path = urlsplit(self.path).path
        if path == "/api/classify":
            body = self._body(self.app.limits.max_request)
            self._json(HTTPStatus.OK, self.app.classify(parse_multipart(body, self.headers.get("Content-Type", ""))))
        elif path == "/api/differential":
            try:
                labels = json.loads(self._body(MAX_JSON)).get("labels")
            except (ValueError, AttributeError):
                raise RequestError(HTTPStatus.BAD_REQUEST, "expected a JSON object") from None
            self._json(HTTPStatus.OK, self.app.differential(labels))
        else:
            self._json(HTTPStatus.NOT_FOUND, {"error": f"not found: {path}"})


def check_host(cfg: DictConfig) -> None:
    if not is_loopback(str(cfg.host)) and not cfg.allow_remote:
        raise DataError(f"host={cfg.host} would open the page (no password) to other machines; the default "
                        f"host=127.0.0.1 serves this machine only. To serve the network on purpose, add "
                        f"allow_remote=true")


def make_server(cfg: DictConfig, predictor: Predictor | None = None) -> ThreadingHTTPServer:
    """The HTTP server, bound and ready for ``serve_forever``; the checkpoint is loaded unless given."""
    check_host(cfg)
    Limits.from_cfg(cfg)
    app = App(cfg, predictor or Predictor(cfg.ckpt_path, cfg.precision))
    handler = type("LeukonetHandler", (Handler,), {"app": app, "local_only": is_loopback(str(cfg.host))})
    try:
        return ThreadingHTTPServer((str(cfg.host), int(cfg.port)), handler)
    except OSError as err:
        raise DataError(f"cannot listen on {cfg.host}:{cfg.port}: {err.strerror or err}") from err


def _stop(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM ends the server as Ctrl-C does: the socket is closed, exit status 0


def serve(cfg: DictConfig) -> None:
    server = make_server(cfg)
    host, port = server.server_address[:2]
    shown = f"[{host}]" if ":" in str(host) else host
    print(f"leukonet: serving {Path(str(cfg.ckpt_path)).name} on http://{shown}:{port}/ (Ctrl-C stops)", flush=True)
    signal.signal(signal.SIGTERM, _stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        print("leukonet: stopped", flush=True)


@hydra.main(version_base="1.3", config_path=CONF, config_name="serve")
def main(cfg: DictConfig) -> None:
    exit_on_user_error(lambda: serve(cfg))


if __name__ == "__main__":
    main()
