"""demo.py: its endpoints against a server in this process (port 0), every bad request answered in
JSON with the server still serving afterwards, what it guards against (foreign Host and Origin, idle
and slow clients, oversize bodies, too many inferences), its command line, and a real drawing in
headless Chromium (slow; skipped without selenium, chromium and chromedriver).

MNIST_DEMO_SCREENSHOT=docs/demo.png python -m pytest -q tests/test_demo.py -k browser
redraws the screenshot of the README."""

import base64
import contextlib
import http.client
import io
import json
import os
import re
import select
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


@contextlib.contextmanager
def serving(classifier, host="127.0.0.1", quiet=True, **limits):
    """A DemoServer on a free port, serving in a thread: (server, base URL)."""
    srv = demo.DemoServer((host, 0), classifier, quiet=quiet, limits=demo.Limits(**limits))
    # A short poll, so that shutdown() returns at once rather than within the default half-second.
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield srv, f"http://127.0.0.1:{srv.server_port}"
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(5)


@pytest.fixture(scope="module")
def server(classifier):
    with serving(classifier) as (_, base):
        yield base


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

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def call(base, path, method="GET", body=None, headers=None):
    """(status, headers, body bytes); an HTTP error status is an answer like any other."""
    request = urllib.request.Request(base + path, data=body, method=method, headers=headers or {})
    try:
        with OPENER.open(request, timeout=10) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.headers, e.read()


def predict(base, body, content_type="image/png", **headers):
    status, headers, data = call(base, "/predict", "POST", body, {"Content-Type": content_type, **headers})
    assert headers["Content-Type"] == "application/json"
    return status, json.loads(data)


PAGE = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/demo.js": ("demo.js", "text/javascript; charset=utf-8"),
    "/demo.css": ("demo.css", "text/css; charset=utf-8"),
}


def test_the_page_is_its_files_and_fetches_nothing_from_elsewhere(server):
    texts = {}
    for path, (name, kind) in PAGE.items():
        status, headers, body = call(server, path)
        with open(os.path.join(ROOT, "page", name), "rb") as f:
            assert status == 200 and headers["Content-Type"] == kind and body == f.read()
        texts[name] = body.decode()
        assert "://" not in texts[name] and "@import" not in texts[name]
    html = texts["index.html"]
    # Nothing inline, which a CSP without 'unsafe-inline' would block: no <style>, no script body,
    # no style="" and no onclick="" attributes.
    assert "<style" not in html and not re.search(r"\s(style|on[a-z]+)\s*=", html, re.IGNORECASE)
    assert re.findall(r"<script[^>]*>", html) == ['<script src="/demo.js">'] and "</script>" in html
    assert re.findall(r'(?:src|href)="([^"]*)"', html) == ["data:,", "/demo.css", "/demo.js"]
    for id_ in ("pad", "clear", "file", "status", "seen-box", "seen", "bars", "about", "classes"):
        assert f'id="{id_}"' in html
    assert "pointerdown" in texts["demo.js"] and 'fetch("/config")' in texts["demo.js"]


def shipped_about():
    """The line the page shows for weights/mnist.pt, from the accuracy its record holds."""
    import torch

    ckpt = torch.load(os.path.join(ROOT, "weights", "mnist.pt"), map_location="cpu", weights_only=True)
    return f"cnn from mnist.pt, {ckpt['history'][-1]['test_acc']:.2f} % on the MNIST test set"


def test_the_config_gives_the_page_its_settings(server):
    status, headers, body = call(server, "/config")
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert json.loads(body) == {
        "about": shipped_about(),
        "hint": "Draw a digit, or upload a photo of one.",
        "classes": [str(i) for i in range(10)],
        "max_body": 2 * 1024 * 1024,
        "top": 5,
        "accept": list(demo.MIME_TYPES),
        "formats": demo.FORMAT_NAMES,
    }


def test_real_mnist_digits_are_read(server, digits):
    from PIL import Image

    for body, label in digits:
        status, answer = predict(server, body)
        assert status == 200, answer
        assert answer["top"][0]["label"] == label
        probs = [row["prob"] for row in answer["top"]]
        assert len(probs) == 5 and probs == sorted(probs, reverse=True) and sum(probs) <= 1.0001
    prefix = "data:image/png;base64,"
    assert answer["input"].startswith(prefix)
    assert Image.open(io.BytesIO(base64.b64decode(answer["input"][len(prefix) :]))).size == (28, 28)


def test_a_photo_of_dark_ink_on_paper_is_read(server, digits):
    """A JPEG of a digit, four times MNIST's size, dark on light: what a phone or a scanner gives."""
    from PIL import Image, ImageOps

    image = ImageOps.invert(Image.open(io.BytesIO(digits[0][0]))).resize((112, 112), Image.BICUBIC)
    status, answer = predict(server, png(np.asarray(image), "JPEG"), "image/jpeg")
    assert status == 200 and answer["top"][0]["label"] == digits[0][1]


def test_a_blank_canvas_gets_a_hint(server):
    status, answer = predict(server, png(np.full((280, 280), 255, np.uint8)))
    assert status == 422 and answer["blank"] is True and "looks blank" in answer["error"]


def refused(base, path, method, body, headers, status, words):
    if method == "POST":  # an image's type, so that each case meets the check it is about
        headers = {"Content-Type": "image/png", **headers}
    started = time.perf_counter()
    got, answer_headers, data = call(base, path, method, body, headers)
    elapsed = time.perf_counter() - started
    answer = json.loads(data)
    assert got == status and words in answer["error"], answer
    assert answer_headers["Content-Type"] == "application/json"
    return answer_headers, elapsed


BAD = {
    "not an image": ("/predict", "POST", b"hello, this is text", {}, 400, "not an image this"),
    "over 2 MB": ("/predict", "POST", b"x" * 16, {"Content-Length": str(3 * 1024 * 1024)}, 413, "3,145,728 bytes"),
    "bad length": ("/predict", "POST", b"x" * 16, {"Content-Length": "16 bytes"}, 400, "one whole number"),
    "empty": ("/predict", "POST", b"", {}, 400, "no body"),
    "bomb": ("/predict", "POST", png_declaring(20000, 20000), {}, 400, "pixels"),
    "cut short": ("/predict", "POST", png_declaring(64, 64)[:60], {}, 400, "the upload"),
    "unknown path": ("/weights/mnist.pt", "GET", None, {}, 404, "nothing at /weights/mnist.pt"),
    "a page file by its name": ("/index.html", "GET", None, {}, 404, "nothing at"),
    "the page folder": ("/page/demo.js", "GET", None, {}, 404, "nothing at"),
    "this script": ("/demo.py", "GET", None, {}, 404, "nothing at"),
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
    assert elapsed < 2  # a bomb is refused from its header, before any pixel is decoded
    status, answer = predict(server, digits[0][0])
    assert status == 200 and answer["top"][0]["label"] == digits[0][1]


def test_a_body_without_a_length_gets_411(server, digits):
    """urllib always declares a length, so http.client sends these: no body and no length, then a
    chunked body announced in the headers (the server answers before any chunk arrives, so the test
    sends none: sending them raced with the server closing the connection)."""
    host, port = server.rsplit("/", 1)[1].split(":")
    for send in (
        lambda c: (c.putrequest("POST", "/predict"), c.putheader("Content-Type", "image/png"), c.endheaders()),
        lambda c: (
            c.putrequest("POST", "/predict"),
            c.putheader("Content-Type", "image/png"),
            c.putheader("Transfer-Encoding", "chunked"),
            c.endheaders(),
        ),
    ):
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


def test_the_page_names_the_checkpoints_classes():
    """Fashion-MNIST weights: the page lists clothes and asks for a photo."""
    config = demo.page_config(demo.Classifier(os.path.join(ROOT, "weights", "fashion-mnist.pt")))
    assert "Ankle boot" in config["classes"] and "Upload a photo of a piece of clothing" in config["hint"]


def test_a_port_in_use_is_one_line(capsys):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        code, out, err = run_script("demo", ["--port", str(port)], capsys)
    assert (
        code == 1
        and err
        == f"demo.py: error: port {port} on 127.0.0.1 is already in use; stop what holds "
        f"it or pick another with --port\n"
    )


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--port", "70000"], "invalid port number (0-65535) value: '70000'"),
        (["--ckpt", "nowhere.pt"], "checkpoint nowhere.pt does not exist"),
    ],
)
def test_bad_command_lines_are_one_line(capsys, argv, words):
    code, out, err = run_script("demo", argv, capsys)
    assert code == 2 and words in err and err.count("\n") == 1


@pytest.mark.slow
def test_the_command_prints_its_address_serves_and_stops_on_ctrl_c():
    process = subprocess.Popen(
        [sys.executable, "demo.py", "--port", "0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
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
# What the server guards against, over real sockets
# ---------------------------------------------------------------------------------------------


def raw_request(port, data, timeout=5, send_buffer=None):
    """Send data over a fresh connection and read until the server closes it: (status, headers, body)."""
    with socket.socket() as s:
        if send_buffer:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
        s.settimeout(timeout)
        s.connect(("127.0.0.1", port))
        s.sendall(data)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    return parse_answer(answer)


def parse_answer(answer):
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v for k, _, v in (line.partition(": ") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def test_predict_takes_images_only(server, digits):
    for kind in ("text/plain", "application/x-www-form-urlencoded", "image/svg+xml", ""):
        status, _, data = call(server, "/predict", "POST", digits[0][0], {"Content-Type": kind})
        answer = json.loads(data)
        assert status == 415 and "image/png, image/jpeg" in answer["error"], answer
        assert answer["accepted"] == list(demo.MIME_TYPES)
    status, answer = predict(server, digits[0][0], "IMAGE/PNG; charset=binary")  # parameters and case aside
    assert status == 200 and answer["top"][0]["label"] == digits[0][1]


def test_a_request_from_another_sites_page_gets_403(server, digits):
    port = server.rsplit(":", 1)[1]
    for origin in ("http://evil.example", f"http://127.0.0.1:{port}.evil.example", "null", f"https://127.0.0.1:{port}"):
        for path, method, body in (("/predict", "POST", digits[0][0]), ("/", "GET", None), ("/config", "GET", None)):
            status, _, data = call(server, path, method, body, {"Content-Type": "image/png", "Origin": origin})
            assert status == 403 and "not one from" in json.loads(data)["error"], (origin, path)
    status, answer = predict(server, digits[0][0], Origin=f"http://127.0.0.1:{port}")  # its own page
    assert status == 200 and answer["top"][0]["label"] == digits[0][1]


def test_a_foreign_host_gets_421_from_a_loopback_server(server, digits):
    """DNS rebinding: a page of evil.example, its name re-pointed at 127.0.0.1, sends Host: evil.example."""
    port = server.rsplit(":", 1)[1]
    for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1.evil.example:{port}", "0.0.0.0", "[::2]"):
        for path, method in (("/", "GET"), ("/demo.js", "GET"), ("/predict", "POST"), ("/nowhere", "GET")):
            status, _, data = call(
                server,
                path,
                method,
                digits[0][0] if method == "POST" else None,
                {"Host": host, "Content-Type": "image/png"},
            )
            assert status == 421 and "127.0.0.1 or localhost only" in json.loads(data)["error"], (host, path)
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}", f"[::1]:{port}", "127.1.2.3"):
        assert call(server, "/", headers={"Host": host})[0] == 200, host


def test_every_answer_carries_a_strict_content_security_policy(server, digits):
    port = int(server.rsplit(":", 1)[1])
    answers = {path: call(server, path)[:2] for path in (*PAGE, "/config", "/nowhere", "/predict")}
    answers["HEAD /"] = call(server, "/", "HEAD")[:2]
    answers["POST /predict"] = call(server, "/predict", "POST", digits[0][0], {"Content-Type": "image/png"})[:2]
    answers["415"] = call(server, "/predict", "POST", b"x", {"Content-Type": "text/plain"})[:2]
    answers["421"] = call(server, "/", headers={"Host": "evil.example"})[:2]
    answers["BREW"] = raw_request(port, b"BREW / HTTP/1.0\r\n\r\n")[:2]  # refused by http.server itself
    assert [status for status, _ in answers.values()] == [200] * 4 + [404, 405, 200, 200, 415, 421, 501]
    for name, (_, headers) in answers.items():
        headers = {k.lower(): v for k, v in headers.items()}
        csp = headers["content-security-policy"]
        assert "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp and "default-src 'none'" in csp, name
        assert headers["x-content-type-options"] == "nosniff" and headers["cache-control"] == "no-store", name
        assert headers["referrer-policy"] == "no-referrer", name


def test_idle_connections_cannot_keep_out_a_real_request(classifier, digits):
    """300 connections that send nothing, over the cap of 256: the oldest are closed to make room."""
    with serving(classifier) as (srv, base):
        idle = []
        try:
            for _ in range(300):
                idle.append(socket.create_connection(("127.0.0.1", srv.server_port), timeout=5))
            started = time.perf_counter()
            status, answer = predict(base, digits[0][0])
            assert status == 200 and answer["top"][0]["label"] == digits[0][1]
            assert time.perf_counter() - started < 3
            assert idle[0].recv(1) == b""  # the oldest, closed by the server
            assert len([c for c in srv.connections.values() if not c.cut]) <= demo.Limits().connections
        finally:
            for s in idle:
                s.close()


def cut_off_after(s, byte, within):
    """Seconds until the server closes a connection sent one byte every 0.1 s; fails if it answers."""
    started = time.perf_counter()
    while time.perf_counter() - started < within:
        try:
            s.send(byte)
            if select.select([s], [], [], 0.1)[0]:
                assert s.recv(65536) == b"", "the server answered a request still arriving"
                return time.perf_counter() - started
        except (ConnectionResetError, BrokenPipeError):
            return time.perf_counter() - started
    pytest.fail(f"a client sending a byte every 0.1 s was still connected after {within} s")


def test_a_slow_client_is_cut_off_at_its_deadline(classifier):
    """Its headers, then its body, trickling in: a per-recv timeout (30 s) would never fire."""
    with serving(classifier, header_seconds=0.2, body_seconds=0.2) as (srv, base):
        starts = {
            b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ": b"x",
            b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
            b"Content-Length: 1000\r\n\r\n": b"\0",
        }
        for start, byte in starts.items():
            with socket.create_connection(("127.0.0.1", srv.server_port), timeout=5) as s:
                s.sendall(start)
                assert 0.15 < cut_off_after(s, byte, within=3) < 1.5
        assert call(base, "/")[0] == 200  # and it still serves


def test_an_oversize_upload_is_drained_so_that_the_client_reads_413(server):
    """A 3 MB body sent whole before reading, as a client on a slow link would: through a small send
    buffer, it is still arriving when the answer is sent, and a close on it unread would reset the
    connection (the client's send fails, and the answer is lost)."""
    port = int(server.rsplit(":", 1)[1])
    size = 3 * 1024 * 1024
    request = (
        f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: image/png\r\nContent-Length: {size}\r\n\r\n"
    ).encode() + b"\0" * size
    status, _, body = raw_request(port, request, send_buffer=64 * 1024)
    assert status == 413 and "3,145,728 bytes" in json.loads(body)["error"]


def test_inferences_beyond_the_limit_get_503_with_retry_after(classifier, digits):
    with serving(classifier, inferences=1) as (srv, base):
        assert srv.inferences.acquire(blocking=False)  # as an inference in progress would
        status, headers, data = call(base, "/predict", "POST", digits[0][0], {"Content-Type": "image/png"})
        assert status == 503 and headers["Retry-After"] == "1" and "try again" in json.loads(data)["error"]
        srv.inferences.release()
        assert predict(base, digits[0][0])[0] == 200
    with serving(classifier, inferences=0) as (_, base):
        assert call(base, "/predict", "POST", digits[0][0], {"Content-Type": "image/png"})[0] == 503


def test_a_full_server_answers_503_when_every_connection_is_busy(classifier, digits, monkeypatch):
    release = threading.Event()
    monkeypatch.setattr(classifier, "predict", lambda body: release.wait(5) and {"top": [], "input": ""})
    with serving(classifier, connections=1) as (srv, base):
        busy = threading.Thread(target=predict, args=(base, digits[0][0]))
        busy.start()
        try:
            deadline = time.perf_counter() + 5
            while not any(c.phase == "busy" for c in list(srv.connections.values())):
                assert time.perf_counter() < deadline
                time.sleep(0.01)
            status, headers, body = raw_request(srv.server_port, b"")  # answered as soon as it connects
            assert status == 503 and headers["retry-after"] == "1" and "busy" in json.loads(body)["error"]
            assert "frame-ancestors 'none'" in headers["content-security-policy"]
        finally:
            release.set()
            busy.join(5)


def test_log_lines_escape_control_characters_and_non_ascii(classifier, capsys):
    with serving(classifier, quiet=False) as (srv, _):
        status = raw_request(srv.server_port, "GET /a\x1b[31mred\x7f\u00e9 HTTP/1.0\r\n\r\n".encode())[0]
    assert status == 404
    err = capsys.readouterr().err
    assert err == "GET /a\\x1b[31mred\\x7f\\xc3\\xa9 404\n"


def test_a_server_reachable_from_elsewhere_warns_and_takes_any_host(classifier, capsys):
    with serving(classifier, quiet=False):
        pass
    assert capsys.readouterr().err == ""  # loopback: no warning
    with serving(classifier, host="0.0.0.0", quiet=False) as (_, base):
        assert call(base, "/", headers={"Host": "demo.example"})[0] == 200
    err = capsys.readouterr().err
    assert err.startswith("warning: listening on 0.0.0.0, not on this machine alone: anyone who can reach port ")
    assert err.count("\n") == 2 and err.endswith("GET / 200\n")


class ClosedPipe(io.StringIO):
    """A stream whose reader has gone, as stderr is under `python demo.py 2>&1 | head -1`."""

    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")


def test_a_log_nobody_reads_never_stops_the_serving(classifier, digits, monkeypatch):
    with serving(classifier, quiet=False) as (srv, base):
        monkeypatch.setattr(sys, "stderr", ClosedPipe())
        for _ in range(3):
            assert call(base, "/")[0] == 200
            assert predict(base, digits[0][0])[0] == 200
        assert srv.quiet  # it stopped trying after the first failure


@pytest.mark.slow
def test_the_command_piped_into_head_keeps_serving():
    """`python demo.py 2>&1 | head -1`: once head has its line, both pipes lose their reader."""
    process = subprocess.Popen(
        [sys.executable, "demo.py", "--port", "0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        url = process.stdout.readline().split(" on ")[1].split()[0].rstrip("/")
        process.stdout.close()
        for _ in range(3):
            assert call(url, "/")[0] == 200
        process.send_signal(signal.SIGINT)
        assert process.wait(20) == 0
    finally:
        process.kill()
        process.wait()


def reset(sock):
    """Close SOCK with a reset (RST) rather than an orderly end, as a client that crashed or a proxy would."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def settle(srv, within=5):
    """Wait until the server has finished with every connection (handle_error, then its close)."""
    deadline = time.perf_counter() + within
    while srv.connections:
        assert time.perf_counter() < deadline, srv.connections
        time.sleep(0.01)


def test_a_connection_reset_by_its_client_prints_no_traceback(classifier, digits, capsys):
    with serving(classifier, quiet=False) as (srv, base):
        for start in (
            b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Half: ",  # while the headers arrive
            b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\nContent-Length: 900\r\n\r\n"
            + digits[0][0][:100],  # and while the body does
        ):
            s = socket.create_connection(("127.0.0.1", srv.server_port), timeout=5)
            s.sendall(start)
            time.sleep(0.2)  # the server is reading it
            reset(s)
            settle(srv)
        assert call(base, "/")[0] == 200
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Error" not in err and len(err.splitlines()) <= 3, err


def test_headers_past_the_limits_are_refused_and_never_held(server, digits):
    """A browser sends one or two KB of headers; a request over the limits gets 431 (414 for its line)
    as soon as it passes them, rather than each connection holding 100 lines of 64 KB."""
    port = int(server.rsplit(":", 1)[1])
    head = f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
    cases = {
        "100 headers of 1 KB": (head + "".join(f"X-{k}: {'a' * 1000}\r\n" for k in range(100)) + "\r\n", 431, "32,768"),
        "one header of 60 KB": (head + f"Cookie: {'a' * 60000}\r\n\r\n", 431, "32,768 bytes"),
        "70 small headers": (head + "".join(f"X-{k}: a\r\n" for k in range(70)) + "\r\n", 431, "more than 64 headers"),
        "a 40 KB path": (f"GET /{'a' * 40000} HTTP/1.1\r\n\r\n", 414, "request line is over"),
    }
    for name, (request, status, words) in cases.items():
        got, headers, body = raw_request(port, request.encode())
        assert got == status and words in json.loads(body)["error"], (name, body[:200])
        assert headers["content-type"] == "application/json", name
    # 60 headers of 400 bytes (24 KB): within the limits
    status, _, _ = raw_request(port, (head + "".join(f"X-{k}: {'a' * 400}\r\n" for k in range(60)) + "\r\n").encode())
    assert status == 200
    # A header line still arriving is refused once it passes the limit, not held until its end.
    with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
        s.sendall((head + "X-Long: " + "a" * 40000).encode())
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    assert parse_answer(answer)[0] == 431
    assert predict(server, digits[0][0])[0] == 200


def test_a_model_that_outputs_nan_gets_a_json_error(digits):
    """Weights with a NaN give NaN probabilities: JSON has no NaN, so the answer is an error that says why."""
    import torch

    broken = demo.Classifier(os.path.join(ROOT, "weights", "mnist.pt"))
    with torch.no_grad():
        next(broken.model.parameters()).fill_(float("nan"))

    def strict(text):
        raise ValueError(f"{text} is not JSON")

    with serving(broken) as (_, base):
        status, headers, data = call(base, "/predict", "POST", digits[0][0], {"Content-Type": "image/png"})
        answer = json.loads(data, parse_constant=strict)
        assert status == 500 and "not a number" in answer["error"] and headers["Content-Type"] == "application/json"
    with pytest.raises(ValueError):
        demo.json_bytes({"prob": float("nan")})


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
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--force-device-scale-factor=1",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # to see what the CSP blocked
    browser = webdriver.Chrome(options=options, service=Service(executable_path=driver))
    # The viewport itself, which --window-size leaves smaller by whatever the headless frame takes.
    browser.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
    )
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
    browser = chrome(760, 500)  # first: it skips when selenium or chromium is missing
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        browser.get(server + "/")
        pad = browser.find_element(By.ID, "pad")
        status = browser.find_element(By.ID, "status")
        WebDriverWait(browser, 10).until(lambda b: status.text)  # the hint, once /config has answered
        assert status.text == "Draw a digit, or upload a photo of one."
        assert browser.find_element(By.ID, "about").text == shipped_about()
        assert browser.find_element(By.ID, "classes").text == "Classes: " + " · ".join(map(str, range(10)))
        draw(browser, pad, [(-72, -84), (72, -84), (-12, 96)])  # a seven: the bar, then down to the left
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
        # The bars' widths are set from script, which the CSP allows; nothing on the page was refused.
        assert browser.find_element(By.CSS_SELECTOR, "#bars .bar div").get_attribute("style").startswith("width:")
        assert not [e["message"] for e in browser.get_log("browser") if "Content Security Policy" in e["message"]]

        # The picker offers what the server reads. Chrome cannot draw a TIFF, so the page sends it as it
        # is and shows the server's reading; a file of another type gets one line.
        from PIL import Image

        assert browser.find_element(By.ID, "file").get_attribute("accept") == ",".join(demo.MIME_TYPES)
        Image.open(io.BytesIO(digits[3][0])).save(tmp_path / "digit.tif")
        browser.find_element(By.ID, "file").send_keys(str(tmp_path / "digit.tif"))
        WebDriverWait(browser, 20).until(lambda b: settled(b) and b.find_elements(By.CSS_SELECTOR, "#bars .row"))
        assert browser.find_element(By.CSS_SELECTOR, "#bars .row .label").text == digits[3][1]
        assert browser.find_element(By.ID, "seen-box").is_displayed()
        (tmp_path / "notes.txt").write_text("not a picture")
        browser.find_element(By.ID, "file").send_keys(str(tmp_path / "notes.txt"))
        WebDriverWait(browser, 20).until(lambda b: "notes.txt" in status.text)
        assert status.text == f"notes.txt is not an image this page can read; choose a {demo.FORMAT_NAMES} file"
        assert not browser.find_elements(By.CSS_SELECTOR, "#bars .row")
    finally:
        browser.quit()


def screenshot(browser, path):
    """The window as a palette PNG: the page's few flat colours keep it small."""
    from PIL import Image

    image = Image.open(io.BytesIO(browser.get_screenshot_as_png())).convert("RGB")
    image.quantize(64, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
