"""Draw in the browser and watch a trained model read it: a page served from this machine.

    python demo.py                                   # then open http://127.0.0.1:8000/ and draw a digit
    python demo.py --ckpt weights/fashion-mnist.pt   # upload photos of clothing instead
    python demo.py --host 0.0.0.0 --port 8080        # reachable from other machines: anyone there may use it

The page is page/, its texts from GET /config; what you draw goes to POST /predict, read as predict.py
reads a file. What clients may hold is bounded (Limits), and check_names keeps other sites out.
"""

import base64
import contextlib
import errno
import http.server
import io
import ipaddress
import json
import os
import pathlib
import re
import socket
import socketserver
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass

from checkpoint import add_ckpt_flag, build_model, load_checkpoint
from cli import Parser, UserError, printable, run
from preprocess import FORMAT_NAMES, MIME_TYPES, classify, read_gray, to_input

HERE = os.path.dirname(os.path.abspath(__file__))
MAX_BODY = 2 * 1024 * 1024  # a drawn PNG is a few KB; the page shrinks larger photos before sending
TOP = 5
DATASETS = {
    "mnist": ("MNIST", "Draw a digit, or upload a photo of one."),  # (title, hint)
    "fashion-mnist": ("Fashion-MNIST", "Upload a photo of a piece of clothing, or draw one."),
    "kmnist": ("KMNIST", "Draw a hiragana character, or upload a photo of one."),
}
# All that GET serves from page/, read once at start: no request can name a file.
PAGE_FILES = {
    "/": ("index.html", "text/html"),
    "/demo.js": ("demo.js", "text/javascript"),
    "/demo.css": ("demo.css", "text/css"),
}
ROUTES = {**{path: ("GET", "HEAD") for path in (*PAGE_FILES, "/config")}, "/predict": ("POST",)}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SAFETY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
}
LOOPBACK_HOST = re.compile(r"(localhost|127(\.\d{1,3}){3}|\[::1\])(:\d{1,5})?", re.ASCII | re.IGNORECASE)


@dataclass
class Limits:
    """What the clients of one server may hold at once; tests shorten the deadlines."""

    connections: int = 256  # beyond this, the oldest still waiting for its request is closed
    header_seconds: float = 10  # for a request line and headers, as a whole, not per packet
    # A request line and headers, in bytes and in lines: a browser sends one or two KB. http.server's
    # own bounds (http.client's globals) let each stalled connection hold 100 lines of 64 KB.
    header_bytes: int = 32 << 10
    headers: int = 64
    body_seconds: float = 10  # for a body, as a whole: 2 MB at 200 KB/s
    drain_bytes: int = 16 << 20  # of a refused body read and dropped, so that the client reads the refusal
    drain_seconds: float = 5
    inferences: int = os.cpu_count() or 1  # more at once only share the same cores, each slower


@dataclass
class Connection:
    """One open connection as the cap and the reaper see it."""

    sock: socket.socket
    phase: str  # "headers" or "body" while the client owes bytes, "busy" while the server does
    since: float  # when it opened: at the cap, the oldest waiting is closed first
    deadline: float | None  # time.monotonic() past which the reaper cuts it; None while busy
    cut: str = ""  # why it was shut down, once it is


class Refused(Exception):
    """A request answered with a 4xx or 5xx status and {"error": message, **extra}."""

    def __init__(self, status, message, headers=None, **extra):
        super().__init__(message)
        self.status, self.headers, self.extra = status, headers or {}, extra


class HeadReader:
    """The connection's reader while a request line and its headers arrive (http.server reads them with
    readline): within limits.header_bytes and limits.headers lines in all, or Refused, 414 or 431.
    The body's reads pass through."""

    def __init__(self, raw, limits):
        self.raw, self.limits, self.left, self.lines = raw, limits, limits.header_bytes, 0
        self.read, self.read1 = raw.read, raw.read1

    def readline(self, limit=-1):
        self.lines += 1
        if self.lines > self.limits.headers + 2:  # the request line, the headers, the blank line
            raise Refused(431, f"the request has more than {self.limits.headers} headers; this server takes no more")
        line = self.raw.readline(self.left + 1 if limit is None or limit < 0 else min(limit, self.left + 1))
        self.left -= len(line)
        if self.left < 0:
            what = "request line is" if self.lines == 1 else "request line and headers are"
            raise Refused(
                414 if self.lines == 1 else 431,
                f"the {what} over {self.limits.header_bytes:,} bytes; this server takes no more",
            )
        return line


class Classifier:
    """A checkpoint's model and class names; predict(body) is the whole of reading an upload."""

    def __init__(self, path):
        self.path, self.ckpt = path, load_checkpoint(path)
        self.model = build_model(self.ckpt, path=path)[0].eval()
        self.classes = self.ckpt["data"]["classes"]

    def predict(self, body):
        try:
            gray = read_gray(body, "the upload")
        except UserError as e:
            raise Refused(400, str(e)) from None
        try:  # by the rule the model was trained with: as MNIST's digits, or (own class folders) fitted
            x = to_input(gray, self.ckpt["data"].get("rule", "mnist"), "the upload")
        except UserError as e:  # the only complaint to_mnist has: nothing stands out from the paper
            raise Refused(422, str(e), blank=True) from None
        probs = classify(self.model, self.ckpt, x[None])[0]
        if not probs.isfinite().all():  # NaN or infinite weights: no reading to give, and NaN is no JSON
            raise Refused(500, f"the model's output is not a number; its checkpoint {self.path} is damaged")
        values, indices = probs.topk(min(TOP, len(self.classes)))
        top = [{"label": self.classes[i], "prob": round(v, 4)} for v, i in zip(values.tolist(), indices.tolist())]
        return {"top": top, "input": png_data_url(x)}


def png_data_url(x):
    """A uint8 [28, 28] image as a data: URL the page can show."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.frombytes("L", (x.shape[1], x.shape[0]), x.contiguous().numpy().tobytes()).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def page_config(classifier):
    """GET /config: what the page says and how it sends, for this checkpoint."""
    dataset = classifier.ckpt["data"].get("dataset", "")
    accuracy = (classifier.ckpt.get("history") or [{}])[-1].get("test_acc")
    about = f"{classifier.ckpt['model']['name']} from {os.path.basename(classifier.path)}"
    title, hint = DATASETS.get(
        dataset,
        (os.path.basename(dataset.rstrip("/")) or dataset, "Draw one of the classes below, or upload a photo of one."),
    )
    if isinstance(accuracy, (int, float)):
        about += f", {accuracy:.2f} % on the {title} test set"
    return {
        "about": about,
        "hint": hint,
        "classes": list(classifier.classes),
        "max_body": MAX_BODY,
        "top": TOP,
        "accept": list(MIME_TYPES),
        "formats": FORMAT_NAMES,
    }


def json_bytes(value):
    return json.dumps(value, allow_nan=False).encode()  # a NaN would be JavaScript, not JSON


def tell(line, stream):
    """Print LINE on STREAM; False when it cannot be (`demo.py 2>&1 | head -1`: the reader has gone).
    Then the stream is pointed at /dev/null, so that the final flush at exit cannot fail either."""
    try:
        print(line, file=stream, flush=True)
        return True
    except (OSError, ValueError):  # ValueError: the stream was closed
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
        return False


class Handler(http.server.BaseHTTPRequestHandler):
    """Routes every method through respond, which answers every request, whatever goes wrong."""

    server_version = "mnist-demo"
    timeout = 30  # per send: the reaper's deadlines bound the receiving, this a client that stops reading

    def handle_one_request(self):
        self.conn, self.body_read = self.server.connections[self.request], False
        self.server.expect(self.conn, "headers", self.server.limits.header_seconds)
        self.command, self.path, self.request_version = "", "", ""  # until a request line says otherwise
        raw, self.rfile = self.rfile, HeadReader(self.rfile, self.server.limits)
        try:
            super().handle_one_request()
        except Refused as e:  # a request line or headers past the limits, refused as soon as it is
            self.close_connection = True
            self.answer(e.status, json_bytes({"error": str(e)}), "application/json", e.headers)
            with contextlib.suppress(OSError):  # then what else it sends is dropped, as drain does
                self.connection.shutdown(socket.SHUT_WR)
            self.drain(self.server.limits.drain_bytes)
        finally:
            self.rfile = raw

    def respond(self):
        self.server.expect(self.conn, "busy", None)
        try:
            status, body, content_type, headers = 200, *self.route()
        except Refused as e:
            status, headers = e.status, e.headers
            body, content_type = json_bytes({"error": str(e), **e.extra}), "application/json"
        except Exception as e:  # a bug must cost one request, not the server
            self.server.note(f"{self.command} {self.short_path()}: unexpected {type(e).__name__}: {e}")
            status, headers, content_type = 500, {}, "application/json"
            body = json_bytes({"error": f"unexpected {type(e).__name__} in the server; see its console"})
        self.answer(status, body, content_type, headers)
        if not self.body_read and ("Content-Length" in self.headers or "Transfer-Encoding" in self.headers):
            self.close_connection = True  # what is left of the body would be read as the next request
            length = self.headers.get("Content-Length", "").strip()
            self.drain(min(int(length), self.server.limits.drain_bytes) if length.isascii() and length.isdigit() else 0)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = respond

    def route(self):
        """(body, content type, extra headers) of a good request; Refused otherwise."""
        self.check_names()
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        if ".." in path:
            raise Refused(400, "a path may not contain '..'; this server has the page at / and POST /predict only")
        if path not in ROUTES:
            raise Refused(404, f"nothing at {self.short_path()}; the page is at / and predictions at POST /predict")
        allowed = ROUTES[path]
        if self.command not in allowed:
            raise Refused(
                405, f"{path} takes {' or '.join(allowed)}, not {self.command}", headers={"Allow": ", ".join(allowed)}
            )
        if path in PAGE_FILES:
            return self.server.files[path], PAGE_FILES[path][1] + "; charset=utf-8", {}
        if path == "/config":
            return json_bytes(self.server.config), "application/json", {}
        return json_bytes(self.predict()), "application/json", {}

    def check_names(self):
        """421 for a Host naming another machine while listening on loopback, so that a site whose name is
        re-pointed at 127.0.0.1 (DNS rebinding) cannot use the demo; 403 for a request from another site."""
        host, origin, url = self.headers.get("Host"), self.headers.get("Origin"), self.server.url()
        if self.server.loopback and host is not None and not LOOPBACK_HOST.fullmatch(host.strip()):
            raise Refused(421, f"this server answers to 127.0.0.1 or localhost only, not {host!r}; open {url}")
        # A browser sends the Host it was given, and leaves port 80 out of the Origin.
        own = "http://" + (host or "").strip().lower().removesuffix(":80")
        if origin is not None and (host is None or origin.strip().lower() != own):
            raise Refused(403, f"this server answers its own page, not one from {origin!r}; open {url}")

    def predict(self):
        kind = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if kind not in MIME_TYPES:
            raise Refused(
                415,
                f"POST /predict takes an image ({', '.join(MIME_TYPES)}), not "
                f"{kind or 'a body without a Content-Type'}",
                accepted=list(MIME_TYPES),
            )
        body = self.read_body()
        if not self.server.inferences.acquire(blocking=False):
            raise Refused(503, "busy reading other images; try again in a second", headers={"Retry-After": "1"})
        try:
            return self.server.classifier.predict(body)
        finally:
            self.server.inferences.release()

    def read_body(self):
        """The request body, refused before a byte of it is read when its declared length is wrong."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise Refused(411, "send the image with a Content-Length header, not in chunks")
        lengths = self.headers.get_all("Content-Length") or []
        if not lengths:
            raise Refused(411, "POST /predict needs a Content-Length header giving the image's size in bytes")
        length = lengths[0].strip()
        if len(lengths) > 1 or not (length.isascii() and length.isdigit()):
            raise Refused(400, f"Content-Length must be one whole number of bytes, got {', '.join(lengths)!r}")
        size = int(length)
        if size > MAX_BODY:
            raise Refused(413, f"the upload is {size:,} bytes, over the {MAX_BODY:,} this takes; send a smaller image")
        if size == 0:
            raise Refused(400, "the request has no body; send the image's PNG or JPEG bytes")
        self.server.expect(self.conn, "body", self.server.limits.body_seconds)
        try:
            body, self.body_read = self.rfile.read(size), True
        except ConnectionError:  # the client reset the connection mid-upload: no bug, and nobody to answer
            body, self.body_read = b"", True
        self.server.expect(self.conn, "busy", None)
        if len(body) < size:
            raise Refused(400, f"the upload ended after {len(body):,} of the {size:,} bytes it declared")
        return body

    def drain(self, left):
        """Read and drop up to LEFT bytes of a refused request, within limits: closing a socket with unread
        bytes sends a reset, and a reset makes the client drop the answer it has not read yet."""
        self.server.expect(self.conn, "body", self.server.limits.drain_seconds)
        with contextlib.suppress(OSError):  # the client gone, or the reaper's cut at the drain's deadline
            while left > 0 and (chunk := self.rfile.read1(min(left, 1 << 16))):
                left -= len(chunk)

    def answer(self, status, body, content_type, headers):
        if self.conn.cut:  # shut down under this request: nobody is left to read an answer
            self.close_connection = True
            return self.server.note(f"{self.command or '-'} {self.short_path()} cut off: {self.conn.cut}")
        headers = {"Content-Type": content_type, "Content-Length": str(len(body)), **SAFETY_HEADERS, **headers}
        try:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
        except OSError:  # the page moved on (a newer stroke's request), or the client stopped reading
            self.close_connection = True

    def send_error(self, code, message=None, explain=None):
        # http.server's own refusals (a garbled request line, an unknown method) answer JSON like ours.
        self.close_connection = True
        self.answer(code, json_bytes({"error": message or http.HTTPStatus(code).phrase}), "application/json", {})

    def version_string(self):
        return self.server_version

    def short_path(self):
        path = str(getattr(self, "path", ""))
        return path if len(path) <= 80 else path[:77] + "..."

    def log_request(self, code="-", size="-"):
        self.server.note(f"{self.command or '-'} {self.short_path()} {int(code)}")

    def log_message(self, format, *args):  # http.server's long default lines; log_request says enough
        pass


class DemoServer(http.server.ThreadingHTTPServer):
    """The demo on (host, port); port 0 picks a free one, which server_address then holds. A thread a
    connection, at most limits.connections of them, and a reaper thread while the socket is open."""

    daemon_threads = True
    request_queue_size = 1024  # a burst of connections waits in the kernel's queue, not a second's SYN retry

    def __init__(self, address, classifier, quiet=False, limits=None):
        self.classifier, self.quiet, self.limits = classifier, quiet, limits or Limits()
        self.config = page_config(classifier)
        self.files = {route: pathlib.Path(HERE, "page", name).read_bytes() for route, (name, _) in PAGE_FILES.items()}
        self.inferences = threading.BoundedSemaphore(self.limits.inferences)
        self.connections, self.lock = {}, threading.RLock()  # socket -> Connection, guarded by lock
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, Handler)
        threading.Thread(target=self.reap, daemon=True).start()
        self.loopback = ipaddress.ip_address(self.server_address[0]).is_loopback
        if not self.loopback:
            self.note(
                f"warning: listening on {address[0]}, not on this machine alone: anyone who can reach "
                f"port {self.server_port} can use this demo (--host 127.0.0.1 keeps it here)"
            )

    def server_bind(self):
        # HTTPServer.server_bind looks the host up in DNS (getfqdn), which stalls on a machine offline.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def process_request(self, request, client_address):
        """At the cap, close the oldest connection still waiting for a whole request first, so that idle
        clients cannot keep out one with a real request; 503 when every one is busy with a real one."""
        now = time.monotonic()
        with self.lock:
            live = [c for c in self.connections.values() if not c.cut]
            if len(live) >= self.limits.connections:
                waiting = [c for c in live if c.phase != "busy"]
                if not waiting:
                    return self.refuse(request)
                self.cut(min(waiting, key=lambda c: c.since), f"closed for a newer one at {len(live)} open")
            self.connections[request] = Connection(request, "headers", now, now + self.limits.header_seconds)
        super().process_request(request, client_address)

    def refuse(self, sock):
        """503, sent without blocking: the accepting thread must never wait on a client."""
        body = json_bytes({"error": "every connection of the server is busy; try again in a second"})
        head = {"Content-Type": "application/json", "Content-Length": len(body), **SAFETY_HEADERS, "Retry-After": "1"}
        with contextlib.suppress(OSError):
            sock.setblocking(False)
            sock.send(
                "\r\n".join(
                    ["HTTP/1.0 503 Service Unavailable", *(f"{k}: {v}" for k, v in head.items()), "", ""]
                ).encode()
                + body
            )
        self.shutdown_request(sock)

    def shutdown_request(self, request):
        with self.lock:
            self.connections.pop(request, None)
        super().shutdown_request(request)

    def expect(self, conn, phase, seconds):
        with self.lock:
            conn.phase, conn.deadline = phase, None if seconds is None else time.monotonic() + seconds

    def cut(self, conn, why):
        """Shut a connection down, under self.lock. Shut down, not closed: its thread owns the descriptor,
        and closing it under that thread could hand the number to a new connection mid-read."""
        conn.cut, conn.deadline = why, None
        with contextlib.suppress(OSError):  # the client has gone already
            conn.sock.shutdown(socket.SHUT_RDWR)

    def reap(self):
        """Cut the connections past their deadline: one for the whole request's headers, one for the
        whole body, which a client sending a byte at a time cannot stretch as it can a socket timeout."""
        while self.socket.fileno() >= 0:  # until server_close closes the listening socket
            time.sleep(0.1)  # how far past its deadline a connection may live
            now = time.monotonic()
            with self.lock:
                for conn in self.connections.values():
                    if not conn.cut and conn.deadline is not None and conn.deadline < now:
                        self.cut(conn, f"past the deadline for its {conn.phase}")

    def handle_error(self, request, client_address):
        # A client that resets its connection or stops reading is no error of the server's, and
        # socketserver's 25-line traceback for each would bury the log; anything else is a bug: shown.
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)

    def note(self, line):
        # Control characters and non-ASCII escaped: a request's path must not drive the terminal. The log
        # never stops the serving: once nobody reads it (a closed pipe), it goes quiet.
        if not self.quiet:
            line = "".join(c if " " <= c <= "~" else c.encode("unicode_escape").decode() for c in line)
            self.quiet = not tell(line, sys.stderr)

    def url(self):
        host, port = self.server_address[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/"


def port_number(text):
    if not (text.isascii() and text.isdigit() and int(text) <= 65535):
        raise ValueError(text)
    return int(text)


port_number.__name__ = "port number (0-65535)"


def build_parser():
    p = Parser(
        prog="demo.py",
        description="Serve a page to draw on (or upload a photo to) that shows what a trained model reads.",
    )
    p.add_argument(
        "--port", type=port_number, default=8000, help="port to listen on (default: 8000; 0 picks a free one)"
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 lets anyone who can reach it in)",
    )
    add_ckpt_flag(p)
    return p


def main(argv):
    args = build_parser().parse_args(argv)
    classifier = Classifier(args.ckpt)
    try:
        server = DemoServer((args.host, args.port), classifier)
    except OSError as e:
        if e.filename:  # the page's files, not the address
            raise UserError(f"cannot read {e.filename} ({e.strerror}); the demo needs its page/ folder whole") from None
        if e.errno == errno.EADDRINUSE:
            raise UserError(
                f"port {args.port} on {args.host} is already in use; stop what holds it or pick another with --port"
            ) from None
        if e.errno == errno.EACCES:
            raise UserError(f"port {args.port} needs administrator rights; pick one above 1023 with --port") from None
        raise UserError(f"cannot listen on {args.host} port {args.port} ({e.strerror or e}); check --host", 2) from None
    with server:
        tell(
            f"serving {classifier.ckpt['model']['name']} ({printable(os.path.basename(args.ckpt))}) on "
            f"{server.url()} (Ctrl-C stops it)",
            sys.stdout,
        )
        try:
            server.serve_forever()
        except KeyboardInterrupt:  # the way to stop a server, not a failure
            if not server.quiet:
                tell("stopped", sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
