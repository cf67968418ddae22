"""demo.py: its endpoints against a server in this process (port 0), every bad request answered in
JSON with the server still serving afterwards, its command line, and a real drawing in headless
Chromium (slow; skipped without selenium, chromium and chromedriver).

MNIST_DEMO_SCREENSHOT=docs/demo.png python -m pytest -q tests/test_demo.py -k browser
redraws the screenshot of the README."""
import base64
import http.client
import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib

import numpy as np
import pytest

import demo
from conftest import ROOT, run_script

# A proxy from the environment must not see requests to our own server.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture(scope="module")
def classifier():
    return demo.Classifier(os.path.join(ROOT, "weights", "mnist.pt"))


@pytest.fixture(scope="module")
def server(classifier):
    srv = demo.DemoServer(("127.0.0.1", 0), classifier, quiet=True)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv.url().rstrip("/")
    srv.shutdown()
    srv.server_close()
    thread.join(5)


@pytest.fixture(scope="module")
def digits():
    """The first eight MNIST test digits as PNG bytes, with their labels."""
    from data import load_split
    images, labels = load_split("mnist", "test")
    return [(png(images[i, 0].numpy()), str(int(labels[i]))) for i in range(8)]


def png(array, kind="PNG"):
    from PIL import Image
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, kind)
    return buffer.getvalue()


def png_declaring(width, height):
    """A PNG whose header declares width x height pixels, holding almost no data: a decompression bomb."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)   # 8-bit grayscale
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def call(base, path, method="GET", body=None, headers=None):
    """(status, headers, body bytes); an HTTP error status is an answer like any other."""
    request = urllib.request.Request(base + path, data=body, method=method, headers=headers or {})
    try:
        with OPENER.open(request, timeout=10) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.headers, e.read()


def predict(base, body, **headers):
    status, headers, data = call(base, "/predict", "POST", body, headers)
    assert headers["Content-Type"] == "application/json"
    return status, json.loads(data)


def test_the_page_is_one_self_contained_document(server):
    status, headers, body = call(server, "/")
    page = body.decode()
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert "<canvas" in page and "pointerdown" in page and 'type="file"' in page
    assert "://" not in page and "@import" not in page and " src=" not in page.replace(' src="data:', "")
    assert "Draw a digit" in page and "cnn from mnist.pt, 99.47 % on the MNIST test set" in page


def test_real_mnist_digits_are_read(server, digits):
    from PIL import Image
    for body, label in digits:
        status, answer = predict(server, body, **{"Content-Type": "image/png"})
        assert status == 200, answer
        assert answer["top"][0]["label"] == label
        probs = [row["prob"] for row in answer["top"]]
        assert len(probs) == 5 and probs == sorted(probs, reverse=True) and sum(probs) <= 1.0001
    prefix = "data:image/png;base64,"
    assert answer["input"].startswith(prefix)
    assert Image.open(io.BytesIO(base64.b64decode(answer["input"][len(prefix):]))).size == (28, 28)


def test_a_photo_of_dark_ink_on_paper_is_read(server, digits):
    """A JPEG of a digit, four times MNIST's size, dark on light: what a phone or a scanner gives."""
    from PIL import Image, ImageOps
    image = ImageOps.invert(Image.open(io.BytesIO(digits[0][0]))).resize((112, 112), Image.BICUBIC)
    status, answer = predict(server, png(np.asarray(image), "JPEG"))
    assert status == 200 and answer["top"][0]["label"] == digits[0][1]


def test_a_blank_canvas_gets_a_hint(server):
    status, answer = predict(server, png(np.full((280, 280), 255, np.uint8)))
    assert status == 422 and answer["blank"] is True and "looks blank" in answer["error"]


def refused(base, path, method, body, headers, status, words):
    started = time.perf_counter()
    got, answer_headers, data = call(base, path, method, body, headers)
    elapsed = time.perf_counter() - started
    answer = json.loads(data)
    assert got == status and words in answer["error"], answer
    assert answer_headers["Content-Type"] == "application/json"
    return answer_headers, elapsed


BAD = {
    "not an image": ("/predict", "POST", b"hello, this is text", {}, 400, "not an image this can read"),
    "over 2 MB": ("/predict", "POST", b"x" * 16, {"Content-Length": str(3 * 1024 * 1024)}, 413, "3,145,728 bytes"),
    "bad length": ("/predict", "POST", b"x" * 16, {"Content-Length": "16 bytes"}, 400, "one whole number"),
    "empty": ("/predict", "POST", b"", {}, 400, "no body"),
    "bomb": ("/predict", "POST", png_declaring(20000, 20000), {}, 400, "pixels"),
    "cut short": ("/predict", "POST", png_declaring(64, 64)[:60], {}, 400, "the upload"),
    "unknown path": ("/weights/mnist.pt", "GET", None, {}, 404, "nothing at /weights/mnist.pt"),
    "unknown path, POST": ("/predict/", "POST", b"x", {}, 404, "nothing at"),
    "dot dot": ("/../demo.py", "GET", None, {}, 400, "'..'"),
    "dot dot, encoded": ("/%2e%2e/%2E%2E/etc/passwd", "GET", None, {}, 400, "'..'"),
    "GET /predict": ("/predict", "GET", None, {}, 405, "/predict takes POST, not GET"),
    "PUT /": ("/", "PUT", b"x", {}, 405, "/ takes GET or HEAD, not PUT"),
    "DELETE /predict": ("/predict", "DELETE", None, {}, 405, "not DELETE"),
    "unknown method": ("/", "BREW", None, {}, 501, "Unsupported method"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_requests_get_4xx_json_and_the_server_carries_on(server, digits, case):
    headers, elapsed = refused(server, *BAD[case])
    if BAD[case][4] == 405:
        assert headers["Allow"] in ("POST", "GET, HEAD")
    assert elapsed < 2   # a bomb is refused from its header, before any pixel is decoded
    status, answer = predict(server, digits[0][0])
    assert status == 200 and answer["top"][0]["label"] == digits[0][1]


def test_a_body_without_a_length_gets_411(server, digits):
    """urllib always declares a length, so http.client sends these: no body and no length, then a
    chunked body announced in the headers (the server answers before any chunk arrives, so the test
    sends none: sending them raced with the server closing the connection)."""
    host, port = server.rsplit("/", 1)[1].split(":")
    for send in (lambda c: (c.putrequest("POST", "/predict"), c.endheaders()),
                 lambda c: (c.putrequest("POST", "/predict"), c.putheader("Transfer-Encoding", "chunked"),
                            c.endheaders())):
        connection = http.client.HTTPConnection(host, int(port), timeout=10)
        try:
            send(connection)
            response = connection.getresponse()
            assert response.status == 411 and "Content-Length" in json.loads(response.read())["error"]
        finally:
            connection.close()
    assert predict(server, digits[0][0])[0] == 200


def test_an_unexpected_error_costs_one_request_only(server, classifier, digits, monkeypatch):
    def broken(body):
        raise RuntimeError("a bug")
    monkeypatch.setattr(classifier, "predict", broken)
    status, answer = predict(server, digits[0][0])
    assert status == 500 and "unexpected RuntimeError" in answer["error"]
    monkeypatch.undo()
    assert predict(server, digits[0][0])[0] == 200


def test_head_of_the_page_sends_headers_only(server):
    status, headers, body = call(server, "/", "HEAD")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 1000


def test_the_page_names_the_checkpoints_classes(tmp_path):
    """Fashion-MNIST weights: the page lists clothes and asks for a photo."""
    page = demo.render_page(demo.Classifier(os.path.join(ROOT, "weights", "fashion-mnist.pt")))
    assert "Ankle boot" in page and "Upload a photo of a piece of clothing" in page


def test_a_port_in_use_is_one_line(capsys):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        code, out, err = run_script("demo", ["--port", str(port)], capsys)
    assert code == 1 and err == f"demo.py: error: port {port} on 127.0.0.1 is already in use; stop what holds " \
                                 f"it or pick another with --port\n"


@pytest.mark.parametrize("argv, words", [(["--port", "70000"], "invalid port number (0-65535) value: '70000'"),
                                         (["--ckpt", "nowhere.pt"], "checkpoint nowhere.pt does not exist")])
def test_bad_command_lines_are_one_line(capsys, argv, words):
    code, out, err = run_script("demo", argv, capsys)
    assert code == 2 and words in err and err.count("\n") == 1


@pytest.mark.slow
def test_the_command_prints_its_address_serves_and_stops_on_ctrl_c():
    process = subprocess.Popen([sys.executable, "demo.py", "--port", "0"], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = process.stdout.readline()
        assert line.startswith("serving cnn (mnist.pt) on http://127.0.0.1:"), line
        url = line.split(" on ")[1].split()[0]
        assert call(url.rstrip("/"), "/")[0] == 200
        process.send_signal(signal.SIGINT)
        assert process.wait(20) == 0
        assert process.stderr.read() == "GET / 200\nstopped\n"
    finally:
        process.kill()
        process.communicate()


# ---------------------------------------------------------------------------------------------
# A real browser
# ---------------------------------------------------------------------------------------------

def chrome(width, height):
    """Headless Chromium under Selenium, or a skip that says what to install."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install -r requirements-dev.txt)")
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (binary and driver):
        pytest.skip("chromium or chromedriver is not installed (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--force-device-scale-factor=1"):
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=Service(executable_path=driver))
    # The viewport itself, which --window-size leaves smaller by whatever the headless frame takes.
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
    return browser


def settled(browser):
    """Nothing drawn, scheduled or in flight: the bars show the last stroke."""
    return browser.execute_script("return !drawing && !busy && !again && timer === null")


def draw(browser, pad, points):
    """One stroke through points given from the pad's centre, with the mouse (pointer events)."""
    from selenium.webdriver.common.action_chains import ActionChains
    actions = ActionChains(browser, duration=20).move_to_element_with_offset(pad, *points[0]).click_and_hold()
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        for _ in range(6):
            actions.move_by_offset(round((x1 - x0) / 6), round((y1 - y0) / 6))
    actions.release().perform()


@pytest.mark.slow
def test_a_digit_drawn_in_a_real_browser_is_read(server, digits, tmp_path):
    browser = chrome(760, 500)   # first: it skips when selenium or chromium is missing
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    try:
        browser.get(server + "/")
        pad = browser.find_element(By.ID, "pad")
        status = browser.find_element(By.ID, "status")
        assert status.text == "Draw a digit, or upload a photo of one."
        draw(browser, pad, [(-72, -84), (72, -84), (-12, 96)])   # a seven: the bar, then down to the left
        WebDriverWait(browser, 20).until(settled)
        labels = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#bars .row .label")]
        assert labels[:1] == ["7"], labels
        assert browser.find_element(By.ID, "seen").get_attribute("src").startswith("data:image/png;base64,")
        if os.environ.get("MNIST_DEMO_SCREENSHOT"):
            screenshot(browser, os.environ["MNIST_DEMO_SCREENSHOT"])

        browser.find_element(By.ID, "clear").click()
        assert status.text.startswith("Draw a digit") and not browser.find_elements(By.CSS_SELECTOR, "#bars .row")
        assert not browser.find_element(By.ID, "seen-box").is_displayed()

        upload = tmp_path / "digit.png"
        upload.write_bytes(digits[1][0])
        browser.find_element(By.ID, "file").send_keys(str(upload))
        WebDriverWait(browser, 20).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#bars .row"))
        assert browser.find_element(By.CSS_SELECTOR, "#bars .row .label").text == digits[1][1]
    finally:
        browser.quit()


def screenshot(browser, path):
    """The window as a palette PNG: the page's few flat colours keep it small."""
    from PIL import Image
    image = Image.open(io.BytesIO(browser.get_screenshot_as_png())).convert("RGB")
    image.quantize(64, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
