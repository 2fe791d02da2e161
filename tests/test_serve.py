"""``python -m leukonet.serve``: the station as a real server (uvicorn), the caps on what a request may send, and the
lab's workflow end to end in a real headless browser (Debian's chromium driven by Playwright; skipped when either
is missing): create a case, drop cells including bad files, review three with the keyboard, watch the count
change, sign off, export, reload and find it all still there."""

from __future__ import annotations

import base64
import csv
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO

CHROMIUM = os.environ.get("LEUKONET_CHROMIUM", "/usr/bin/chromium")  # Debian's; Playwright downloads none here
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
CLASSES = ["basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"]
MAX_FILE_MB, MAX_REQUEST_MB = 0.1, 0.5
REVIEWED = "n => document.getElementById('progress').textContent.startsWith(n + ' of')"  # n cells reviewed


@pytest.fixture(scope="module")
def server(trained_run: Path, tmp_path_factory):
    """``python -m leukonet.serve`` on a free port (port=0) with small upload limits and its own station; its URL."""
    station = tmp_path_factory.mktemp("station")
    proc = subprocess.Popen(
        [sys.executable, "-m", "leukonet.serve", f"ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}", "port=0",
         f"station_dir={station}", f"max_file_mb={MAX_FILE_MB}", f"max_request_mb={MAX_REQUEST_MB}", "max_files=20"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if "serving" in line:
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    threading.Thread(target=proc.stderr.read, daemon=True).start()  # drained, so the server never blocks on it
    if not ready.wait(120):
        proc.kill()
        pytest.fail(f"the server did not start: {''.join(lines)}")
    yield next(line for line in lines if "serving" in line).split(" on ")[1].split()[0].rstrip("/")
    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "stopped" in "".join(lines)
    assert (station / "station.db").is_file()


def raw_request(url: str, head: str) -> str:
    """Send only a request's head (no body) and read what the server answers."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(head.encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data.decode("utf-8", "replace")


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_requests_over_the_caps_are_refused_unread(server: str) -> None:
    over = int(MAX_REQUEST_MB * 1e6) + 1
    answer = raw_request(server, "POST /api/cases/1/files HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                                 f"Content-Type: multipart/form-data; boundary=x\r\nContent-Length: {over}\r\n\r\n")
    assert answer.startswith("HTTP/1.1 413") and "limit is 0.5 MB a request" in answer
    answer = raw_request(server, "POST /api/cases HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                                 "Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n")
    assert answer.startswith("HTTP/1.1 413")  # JSON requests are small
    answer = raw_request(server, "POST /api/cases/1/files HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                                 "Transfer-Encoding: chunked\r\n\r\n")
    assert answer.startswith("HTTP/1.1 411")
    answer = raw_request(server, "GET /api/info HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n")
    assert answer.startswith("HTTP/1.1 403") and "nosniff" in answer  # a DNS-rebound name gets nothing
    answer = raw_request(server, "GET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    assert answer.startswith("HTTP/1.1 200") and "content-security-policy" in answer.lower()


@pytest.fixture(scope="module")
def browser():
    """Headless Debian chromium through Playwright (which downloads no browser here); skips without them."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not found: apt-get install chromium (make test installs it where it can)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright not installed: pip install -e '.[dev]'")
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, env=env)
        try:
            yield browser
        finally:
            browser.close()


def test_review_station_in_a_headless_browser(browser, server: str, cells: Path, tmp_path: Path) -> None:
    upload = [sorted((cells / c).glob("*.png"))[0] for c in CLASSES[:4]]
    bad = tmp_path / "bad.jpg"
    bad.write_text("this is a text file, not a picture\n")
    big = tmp_path / "big.png"  # over the 0.1 MB a file: refused by the page before it is sent
    big.write_bytes(png(np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)))
    blank = tmp_path / "blank.png"  # no cell at all: not a leukocyte, first in the queue
    Image.new("RGB", (64, 64), (235, 235, 235)).save(blank)
    dropped = sorted((cells / "neutrophil").glob("*.png"))[0].read_bytes()
    context = browser.new_context(viewport={"width": 1300, "height": 1000}, accept_downloads=True)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: m.type == "error" and errors.append(m.text))
    page.goto(server + "/")
    page.wait_for_selector("body[data-ready=true]", timeout=30_000)
    page.fill("#reviewer", "ann")
    page.dispatch_event("#reviewer", "change")
    page.fill("#note", "slide A-17")
    page.click("#new-case button")
    page.wait_for_selector("#case[data-case-id]:not([hidden])", timeout=30_000)
    case_id = page.get_attribute("#case", "data-case-id")

    page.set_input_files("#file-input", [*upload, bad, big, blank])
    page.wait_for_selector("#status[data-state=done]", timeout=120_000)
    assert page.locator("#errors li[data-file='bad.jpg']").inner_text().startswith("bad.jpg: not a readable image")
    assert page.locator("#errors li[data-file='big.png']").inner_text().startswith(
        "big.png: too large (0.12 MB); the limit is 0.1 MB a file")
    page.evaluate("""b64 => {  // drag and drop one more cell
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], 'dropped.png', {type: 'image/png'}));
        document.getElementById('status').dataset.state = '';
        document.getElementById('drop').dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true}));
    }""", base64.b64encode(dropped).decode())
    page.wait_for_selector("#status[data-state=done]", timeout=60_000)
    assert page.inner_text("#progress") == "0 of 6 cells reviewed"
    model_cells = int(page.get_attribute("#model-total", "data-cells"))
    assert 1 <= model_cells <= 5  # blank.png is not counted
    assert page.get_attribute("#reviewed-total", "data-cells") == "0"
    assert "no nucleus" in page.inner_text("#current")  # not a leukocyte comes first
    assert "last.ckpt" in page.inner_text("#case-meta")  # the checkpoint that classified the case
    loaded = page.eval_on_selector_all("#current img", "imgs => imgs.map(i => i.complete && i.naturalWidth > 0)")
    assert loaded == [True, True]  # the cell and its heat map

    # three reviews with the keyboard (X, then two corrections), one undone and redone
    page.focus("#current")
    labels = []
    for n, keys in enumerate((["x"], ["4"], ["1"]), start=1):
        cell = page.get_attribute("#current", "data-cell-id")
        for k in keys:
            page.keyboard.press(k)
        labels.append(page.get_attribute("#current", "data-label"))
        page.keyboard.press("Enter")
        page.wait_for_function(REVIEWED, arg=n)
        assert page.get_attribute("#current", "data-cell-id") != cell
    assert labels == ["not_a_leukocyte", "monocyte", "basophil"]
    page.keyboard.press("u")
    page.wait_for_function(REVIEWED, arg=2)
    page.keyboard.press("3")
    page.keyboard.press("Enter")
    page.wait_for_function(REVIEWED, arg=3)
    assert page.get_attribute("#reviewed-total", "data-cells") == "2"  # monocyte and lymphocyte: the count changed
    reviewed = {r.get_attribute("data-class"): r.get_attribute("data-reviewed")
                for r in page.locator("#differential tbody tr").all()}
    assert reviewed == {"basophil": "0", "eosinophil": "0", "lymphocyte": "1", "monocyte": "1", "neutrophil": "0"}
    assert "–" in page.locator("#differential tbody tr").first.inner_text()  # 95 % intervals
    page.click("#view-toggle")
    assert page.locator("#grid .cell").count() == 6 and page.locator("#grid .cell.done").count() == 3

    page.click("#sign-off")
    page.wait_for_selector("#case[data-signed=true]", timeout=30_000)
    assert page.inner_text("#signed").startswith("Signed off by ann")
    page.focus("#current")
    page.keyboard.press("2")
    page.keyboard.press("Enter")  # read-only: nothing happens
    with page.expect_download() as download:
        page.click("#export-csv")
    rows = list(csv.DictReader(io.StringIO(Path(download.value.path()).read_text())))
    assert len(rows) == 6 and sorted(r["review_label"] for r in rows if r["review_label"]) == [
        "lymphocyte", "monocyte", "not_a_leukocyte"]
    with page.expect_download() as download:
        page.click("#export-manifest")
    manifest = list(csv.DictReader(io.StringIO(Path(download.value.path()).read_text())))
    assert sorted(r["label"] for r in manifest) == ["lymphocyte", "monocyte"] and all(Path(r["path"]).is_file()
                                                                                      for r in manifest)
    report = page.request.get(server + page.get_attribute("#export-report", "href")).text()
    assert "Signed off by ann" in report and "slide A-17" in report
    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
    if os.environ.get("LEUKONET_SCREENSHOT"):
        shutil.copy(tmp_path / "page.png", os.environ["LEUKONET_SCREENSHOT"])

    page.reload()  # all of it is still there
    page.wait_for_selector("body[data-ready=true]", timeout=30_000)
    page.wait_for_selector("#case[data-signed=true]", timeout=30_000)
    assert page.get_attribute("#case", "data-case-id") == case_id
    assert page.inner_text("#progress") == "3 of 6 cells reviewed"
    assert page.get_attribute("#reviewed-total", "data-cells") == "2"
    assert page.get_attribute("#model-total", "data-cells") == str(model_cells)
    assert page.locator("#errors li[data-file='bad.jpg']").count() == 1  # refused files are kept on record too
    assert "slide A-17" in page.inner_text(f"#case-list tr[data-case='{case_id}']")
    assert errors == []
    context.close()
