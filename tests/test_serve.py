"""The web page (leukonet.serve): limits and type checks over HTTP, the local-only default, and the page end
to end in a real headless browser (Debian's chromium driven by Playwright; skipped when either is missing)."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, compose_cfg, run_module
from leukonet.data.cells import synthetic_field
from leukonet.errors import DataError
from leukonet.serve import check_host, parse_multipart

CHROMIUM = os.environ.get("LEUKONET_CHROMIUM", "/usr/bin/chromium")  # Debian's; Playwright downloads none here
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
CLASSES = ["basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"]
MAX_FILE_MB, MAX_REQUEST_MB = 0.1, 0.5
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture(scope="module")
def server(trained_run: Path):
    """``python -m leukonet.serve`` on a free port (port=0) with small upload limits; its base URL."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "leukonet.serve", f"ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}", "port=0",
         f"max_file_mb={MAX_FILE_MB}", f"max_request_mb={MAX_REQUEST_MB}", "max_files=20"],
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
    url = next(line for line in lines if "serving" in line).split(" on ")[1].split()[0].rstrip("/")
    yield url
    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "stopped" in "".join(lines)


def multipart(files: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
                    f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n" for name, data in files)
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def post(url: str, body: bytes, content_type: str, headers: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": content_type, **(headers or {})})
    try:
        with NO_PROXY.open(req, timeout=60) as res:
            return res.status, json.loads(res.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def raw_request(url: str, head: str) -> str:
    """Send only a request's head (no body) and read what the server answers."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(head.encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data.decode("utf-8", "replace")


def jpeg(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_multipart_parser_keeps_binary_content() -> None:
    data = bytes(range(256)) * 3 + b"\r\n--not-the-boundary\r\n"
    body, ctype = multipart([("a.png", data), ("dir/b.jpg", b"")])
    assert parse_multipart(body, ctype) == [("files", "a.png", data), ("files", "dir/b.jpg", b"")]


def test_serve_binds_only_to_this_machine_unless_told(tmp_path: Path) -> None:
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        check_host(compose_cfg("serve", ["ckpt_path=x", f"host={host}"]))
    for host in ("0.0.0.0", "192.168.1.10", "example.org"):
        with pytest.raises(DataError, match="allow_remote=true"):
            check_host(compose_cfg("serve", ["ckpt_path=x", f"host={host}"]))
    check_host(compose_cfg("serve", ["ckpt_path=x", "host=0.0.0.0", "allow_remote=true"]))
    assert compose_cfg("serve", ["ckpt_path=x"]).host == "127.0.0.1"
    # from the command line: refused before the checkpoint is even read
    proc = run_module("leukonet.serve", f"ckpt_path={tmp_path / 'none.ckpt'}", "host=0.0.0.0")
    assert proc.returncode == 2 and "allow_remote=true" in proc.stderr, proc.stderr[-2000:]


def test_upload_limits_and_file_types_over_http(server: str, cells: Path) -> None:
    good = (cells / "lymphocyte").glob("*.png").__next__().read_bytes()
    noise = np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    big = png(noise)  # about 120 kB: over the 0.1 MB a file
    assert len(big) > MAX_FILE_MB * 1e6
    bomb = Image.new("L", (8_000, 8_000))  # 64 megapixels declared, a tiny file
    buf = io.BytesIO()
    bomb.save(buf, format="PNG")
    field, truth = synthetic_field(np.random.default_rng(0), (360, 480), 3, ["neutrophil", "lymphocyte", "eosinophil"])
    blank = png(np.full((64, 64, 3), 235, np.uint8))
    body, ctype = multipart([("good.png", good), ("field.jpg", jpeg(field)), ("notes.jpg", b"just some text\n"),
                             ("readme.txt", good), ("big.png", big), ("bomb.png", buf.getvalue()), ("empty.png", b""),
                             ("blank.png", blank),
                             ("../../etc/evil.png", good)])
    status, data = post(f"{server}/api/classify", body, ctype)
    assert status == 200, data
    results = {r["file"]: r for r in data["results"]}
    assert list(results) == ["good.png", "field.jpg", "notes.jpg", "readme.txt", "big.png", "bomb.png", "empty.png",
                             "blank.png", "evil.png"]
    (cell,) = results["good.png"]["cells"]
    assert cell["top_class"] in CLASSES and cell["confidence"] == max(cell["probabilities"].values())
    assert cell["predicted"] == (None if cell["not_a_leukocyte"] else cell["top_class"])
    assert cell["heatmap"].startswith("data:image/png;base64,") and cell["thumbnail"].startswith("data:image/png")
    assert Image.open(io.BytesIO(base64.b64decode(cell["heatmap"].split(",", 1)[1]))).mode == "RGB"
    assert [c["cell"] for c in results["field.jpg"]["cells"]] == list(range(len(truth)))  # one crop per leukocyte
    assert results["notes.jpg"]["error"].startswith("notes.jpg: not a readable image")
    assert "not an accepted image type (.txt)" in results["readme.txt"]["error"]
    assert results["big.png"]["error"].startswith("big.png: too large (0.12 MB); the limit is 0.1 MB a file")
    assert "bomb.png: too large, refused before decoding" in results["bomb.png"]["error"]
    assert results["empty.png"]["error"] == "empty.png: empty file (0 bytes)"
    (flagged,) = results["blank.png"]["cells"]  # no stained nucleus: flagged, no class, not for review
    assert flagged["not_a_leukocyte"] and flagged["ood_reason"] == "no nucleus" and flagged["predicted"] is None
    assert not flagged["needs_review"]
    assert "cells" in results["evil.png"]  # folders in a file name are dropped: nothing is written anyway

    # a request over the cap is answered 413 without its body being read
    answer = raw_request(server, "POST /api/classify HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                 f"Content-Type: {ctype}\r\nContent-Length: {int(MAX_REQUEST_MB * 1e6) + 1}\r\n\r\n")
    assert answer.startswith("HTTP/1.0 413") and "limit is 0.5 MB a request" in answer
    answer = raw_request(server, "POST /api/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert answer.startswith("HTTP/1.0 411")
    assert post(f"{server}/api/classify", b"{}", "application/json")[0] == 400
    assert post(f"{server}/api/classify", *multipart([(f"{i}.png", good) for i in range(21)]))[0] == 413  # max_files=20
    # another site's page, or a DNS-rebound name, gets nothing
    assert post(f"{server}/api/classify", body, ctype, {"Origin": "http://evil.example"})[0] == 403
    assert raw_request(server, "GET /api/info HTTP/1.1\r\nHost: evil.example\r\n\r\n").startswith("HTTP/1.0 403")
    status, count = post(f"{server}/api/differential", json.dumps({"labels": ["monocyte"] * 3 + ["basophil"]}).encode(),
                         "application/json")
    assert status == 200 and count["cells"] == 4
    assert {r["class"]: r["cells"] for r in count["differential"]}["monocyte"] == 3
    assert post(f"{server}/api/differential", b'{"labels": ["pickle"]}', "application/json")[0] == 400
    with NO_PROXY.open(f"{server}/api/info", timeout=30) as res:  # still serving after all of that
        assert json.loads(res.read())["classes"] == CLASSES


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


def test_page_in_a_headless_browser(browser, server: str, cells: Path, tmp_path: Path) -> None:
    upload = [sorted((cells / c).glob("*.png"))[0] for c in CLASSES[:4]]
    bad = tmp_path / "bad.jpg"
    bad.write_text("this is a text file, not a picture\n")
    big = tmp_path / "big.png"  # over the 0.1 MB a file: refused by the page before it is sent
    big.write_bytes(png(np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)))
    dropped = sorted((cells / "neutrophil").glob("*.png"))[0].read_bytes()
    page = browser.new_page(viewport={"width": 1200, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: m.type == "error" and errors.append(m.text))
    page.goto(server + "/")
    page.wait_for_selector("body[data-ready=true]", timeout=30_000)
    blank = tmp_path / "blank.png"  # no cell at all: shown as not a leukocyte, not counted
    Image.new("RGB", (64, 64), (235, 235, 235)).save(blank)
    page.set_input_files("#file-input", [*upload, bad, big, blank])
    page.wait_for_selector("#status[data-state=done]", timeout=120_000)

    cards = page.locator("#results .cell")
    assert cards.count() == 5
    counted = 0
    for i, f in enumerate(upload):
        card = cards.nth(i)
        assert card.get_attribute("data-file") == f.name
        confidence = float(card.get_attribute("data-confidence"))
        assert 0 < confidence <= 1
        assert card.locator(".confidence").inner_text().strip() == f"{100 * confidence:.1f} %"
        if "ood" in card.get_attribute("class"):  # the feature check may flag a cell of so small a model
            assert card.locator(".class").inner_text() == "not a leukocyte"
        else:
            counted += 1
            assert card.locator(".class").inner_text() == card.get_attribute("data-class")
            assert card.get_attribute("data-class") in CLASSES
            assert card.locator(".flag").inner_text() in ("review", "ok")
    assert counted >= 3
    assert cards.nth(4).get_attribute("data-file") == "blank.png" and "ood" in cards.nth(4).get_attribute("class")
    assert cards.nth(4).locator(".class").inner_text() == "not a leukocyte"
    assert cards.nth(4).locator(".flag").inner_text() == "no nucleus"
    error = page.locator("#errors li[data-file='bad.jpg']")
    assert error.count() == 1 and error.inner_text().startswith("bad.jpg: not a readable image")
    too_big = page.locator("#errors li[data-file='big.png']").inner_text()
    assert too_big.startswith("big.png: too large (0.12 MB); the limit is 0.1 MB a file")
    assert page.get_attribute("#diff-total", "data-cells") == str(counted)
    counts = page.locator("#differential tbody td.count").all_inner_texts()
    assert len(counts) == 5 and sum(map(int, counts)) == counted
    assert "–" in page.locator("#differential tbody tr").first.inner_text()  # a 95 % CI
    loaded = page.eval_on_selector_all(
        "#results img.heatmap", "imgs => imgs.map(i => i.complete && i.naturalWidth > 0)")
    assert loaded == [True] * 5

    # drag and drop adds to the session's count
    page.evaluate("""b64 => {
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], 'dropped.png', {type: 'image/png'}));
        document.getElementById('status').dataset.state = '';
        document.getElementById('drop').dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true}));
    }""", base64.b64encode(dropped).decode())
    page.wait_for_selector("#status[data-state=done]", timeout=60_000)
    assert cards.count() == 6 and cards.nth(5).get_attribute("data-file") == "dropped.png"
    dropped_counted = "ood" not in cards.nth(5).get_attribute("class")
    assert page.get_attribute("#diff-total", "data-cells") == str(counted + dropped_counted)
    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
    if os.environ.get("LEUKONET_SCREENSHOT"):
        shutil.copy(tmp_path / "page.png", os.environ["LEUKONET_SCREENSHOT"])
    page.click("#clear")  # a new session
    page.wait_for_selector("#diff-total[data-cells='0']", timeout=30_000)
    assert page.locator("#results .cell").count() == 0 and page.locator("#errors li").count() == 0
    assert errors == []
    page.close()
