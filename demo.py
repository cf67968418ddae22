"""Draw in the browser and watch a trained model read it: one page served from this machine.

    python demo.py                                   # then open http://127.0.0.1:8000/ and draw a digit
    python demo.py --ckpt weights/fashion-mnist.pt   # upload photos of clothing instead
    python demo.py --host 0.0.0.0 --port 8080        # reachable from other machines: anyone there may use it

The page is self-contained (nothing is fetched from elsewhere). As you draw, it POSTs the canvas as a
PNG to /predict, which reads it exactly as predict.py reads a file (images.py) and answers the top
classes and the 28x28 image the model saw.
"""
import base64
import errno
import html
import http.server
import io
import json
import os
import socket
import socketserver
import sys
import urllib.parse

from checkpoint import build_model, load_checkpoint
from cli import Parser, UserError, run
from images import classify, read_gray, to_mnist

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CKPT = os.path.join(HERE, "weights", "mnist.pt")
MAX_BODY = 2 * 1024 * 1024   # a drawn PNG is a few KB; the page shrinks larger photos before sending
TOP = 5
DATASETS = {"mnist": ("MNIST", "Draw a digit, or upload a photo of one."),          # (title, hint)
            "fashion-mnist": ("Fashion-MNIST", "Upload a photo of a piece of clothing, or draw one."),
            "kmnist": ("KMNIST", "Draw a hiragana character, or upload a photo of one.")}


class Refused(Exception):
    """A request answered with a 4xx status and {"error": message, **extra}."""

    def __init__(self, status, message, headers=None, **extra):
        super().__init__(message)
        self.status, self.headers, self.extra = status, headers or {}, extra


class Classifier:
    """A checkpoint's model and class names; predict(body) is all of POST /predict."""

    def __init__(self, path):
        self.path, self.ckpt = path, load_checkpoint(path)
        self.model, _ = build_model(self.ckpt, path=path)
        self.model.eval()
        self.classes = self.ckpt["data"]["classes"]

    def predict(self, body):
        try:
            gray = read_gray(body, "the upload")
        except UserError as e:
            raise Refused(400, str(e)) from None
        try:
            x = to_mnist(gray, "the upload")
        except UserError as e:   # the only complaint to_mnist has: nothing stands out from the paper
            raise Refused(422, str(e), blank=True) from None
        probs = classify(self.model, self.ckpt, x[None])[0]
        values, indices = probs.topk(min(TOP, len(self.classes)))
        top = [{"label": self.classes[i], "prob": round(v, 4)} for v, i in zip(values.tolist(), indices.tolist())]
        return {"top": top, "input": png_data_url(x)}


def png_data_url(x):
    """A uint8 [28, 28] image as a data: URL the page can show."""
    from PIL import Image
    buffer = io.BytesIO()
    Image.frombytes("L", (x.shape[1], x.shape[0]), x.contiguous().numpy().tobytes()).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


class Handler(http.server.BaseHTTPRequestHandler):
    """Routes every method through respond, which answers every request, whatever goes wrong."""

    server_version = "mnist-demo"
    timeout = 30   # a client that stops sending mid-request must not hold a thread forever
    ROUTES = {"/": ("GET", "HEAD"), "/predict": ("POST",)}

    def respond(self):
        try:
            status, body, content_type, headers = 200, *self.route()
        except Refused as e:
            status, headers = e.status, e.headers
            body, content_type = json_bytes({"error": str(e), **e.extra}), "application/json"
        except Exception as e:   # a bug must cost one request, not the server
            self.server.note(f"{self.command} {self.short_path()}: unexpected {type(e).__name__}: {e}")
            status, headers = 500, {}
            body = json_bytes({"error": f"unexpected {type(e).__name__} in the server; see its console"})
            content_type = "application/json"
        self.answer(status, body, content_type, headers)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = respond

    def route(self):
        """(body, content type, extra headers) of a good request; Refused otherwise."""
        raw = urllib.parse.urlsplit(self.path).path
        path = urllib.parse.unquote(raw)
        if ".." in path:
            raise Refused(400, "a path may not contain '..'; this server has the page at / and POST /predict only")
        if path not in self.ROUTES:
            raise Refused(404, f"nothing at {self.short_path()}; the page is at / and predictions at POST /predict")
        allowed = self.ROUTES[path]
        if self.command not in allowed:
            raise Refused(405, f"{path} takes {' or '.join(allowed)}, not {self.command}",
                          headers={"Allow": ", ".join(allowed)})
        if path == "/":
            return self.server.page, "text/html; charset=utf-8", {"Content-Security-Policy": CSP}
        return json_bytes(self.server.classifier.predict(self.read_body())), "application/json", {}

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
            raise Refused(413, f"the upload is {size:,} bytes, more than the {MAX_BODY:,} this takes; "
                               f"send a smaller image")
        if size == 0:
            raise Refused(400, "the request has no body; send the image's PNG or JPEG bytes")
        try:
            body = self.rfile.read(size)
        except TimeoutError:
            raise Refused(408, f"the upload stopped arriving for {self.timeout} s; send it again") from None
        if len(body) < size:
            raise Refused(400, f"the upload ended after {len(body):,} of the {size:,} bytes it declared")
        return body

    def answer(self, status, body, content_type, headers):
        try:
            self.send_response(status)
            for key, value in {"Content-Type": content_type, "Content-Length": str(len(body)),
                               "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff", **headers}.items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):   # the page moved on, e.g. a newer stroke's request
            self.close_connection = True

    def send_error(self, code, message=None, explain=None):
        # http.server's own refusals (a garbled request line, an unknown method) answer JSON like ours.
        self.close_connection = True
        text = message or http.HTTPStatus(code).phrase
        self.answer(code, json_bytes({"error": text}), "application/json", {})

    def version_string(self):
        return self.server_version

    def short_path(self):
        path = str(getattr(self, "path", ""))
        return path if len(path) <= 80 else path[:77] + "..."

    def log_request(self, code="-", size="-"):
        self.server.note(f"{self.command} {self.short_path()} {int(code)}")

    def log_message(self, format, *args):   # http.server's long default lines; log_request says enough
        pass


def json_bytes(value):
    return json.dumps(value).encode()


class DemoServer(http.server.ThreadingHTTPServer):
    """The demo on (host, port); port 0 picks a free one, which server_address then holds."""

    daemon_threads = True

    def __init__(self, address, classifier, quiet=False):
        self.classifier, self.quiet = classifier, quiet
        self.page = render_page(classifier).encode()
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, Handler)

    def server_bind(self):
        # HTTPServer.server_bind looks the host up in DNS (getfqdn), which stalls on a machine offline.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def note(self, line):
        if not self.quiet:
            print(line, file=sys.stderr, flush=True)

    def url(self):
        host, port = self.server_address[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/"


def render_page(classifier):
    data = classifier.ckpt["data"]
    dataset = data.get("dataset", "")
    accuracy = classifier.ckpt.get("metrics", {}).get("test_acc")
    about = f"{classifier.ckpt['model']['name']} from {os.path.basename(classifier.path)}"
    title, hint = DATASETS.get(dataset, (dataset, "Draw one of the classes below, or upload a photo of one."))
    if isinstance(accuracy, (int, float)):
        about += f", {accuracy:.2f} % on the {title} test set"
    text = {"about": about, "hint": hint, "classes": " · ".join(classifier.classes)}
    # Into the script as JSON, with "<" escaped so that no value can close the <script> element.
    script = {"hint_js": hint, "max_body": MAX_BODY}
    return PAGE.format(**{k: html.escape(v) for k, v in text.items()},
                       **{k: json.dumps(v).replace("<", "\\u003c") for k, v in script.items()})


CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data: blob:; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'")

# Braces of CSS and JS are doubled ({{ ... }}); single ones are filled in by render_page.
PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>MNIST demo</title>
<style>
  :root {{ --ink: #1f2430; --muted: #667085; --line: #d0d5dd; --accent: #3565d8; --soft: #e6ebf5; }}
  * {{ box-sizing: border-box; }}
  [hidden] {{ display: none !important; }}
  body {{ margin: 0; background: #f3f4f7; color: var(--ink);
         font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }}
  main {{ max-width: 720px; margin: 0 auto; padding: 22px 16px; }}
  h1 {{ font-size: 20px; margin: 0; }}
  .about {{ color: var(--muted); margin: 2px 0 18px; font-size: 13px; }}
  .panes {{ display: flex; flex-wrap: wrap; gap: 18px; }}
  .card {{ background: #fff; border-radius: 12px; padding: 16px; box-shadow: 0 1px 3px rgba(16, 24, 40, .1); }}
  #pad {{ display: block; width: 280px; height: 280px; border: 1px solid var(--line); border-radius: 8px;
         touch-action: none; cursor: crosshair; background: #fff; }}
  .tools {{ display: flex; gap: 8px; margin-top: 12px; }}
  button, label.upload {{ font: inherit; font-size: 14px; padding: 6px 14px; border-radius: 8px; cursor: pointer;
                         border: 1px solid var(--line); background: #fff; color: var(--ink); }}
  button:hover, label.upload:hover {{ background: #f6f7f9; }}
  label.upload input {{ display: none; }}
  .result {{ flex: 1; min-width: 260px; }}
  .seen {{ display: flex; align-items: center; gap: 12px; margin-bottom: 12px; color: var(--muted); font-size: 13px; }}
  #seen {{ width: 84px; height: 84px; image-rendering: pixelated; background: #000; border-radius: 4px; }}
  #status {{ color: var(--muted); margin: 0 0 12px; }}
  #status:empty {{ display: none; }}
  #status.error {{ color: #b42318; }}
  /* One grid for all rows, so that the bars line up after the longest class name. */
  #bars {{ display: grid; grid-template-columns: max-content 1fr 3.6em; align-items: center; gap: 10px 12px; }}
  .row {{ display: contents; }}
  .row .label {{ max-width: 9em; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }}
  .row:first-child .label {{ font-weight: 650; }}
  .bar {{ height: 12px; background: var(--soft); border-radius: 6px; overflow: hidden; }}
  .bar div {{ height: 100%; background: var(--accent); border-radius: 6px; }}
  .pct {{ text-align: right; font-variant-numeric: tabular-nums; color: var(--muted); font-size: 13px; }}
  .classes {{ color: var(--muted); font-size: 12px; margin-top: 14px; }}
</style>
</head>
<body>
<main>
  <h1>What does the model see?</h1>
  <p class="about">{about}</p>
  <div class="panes">
    <div class="card">
      <canvas id="pad" width="280" height="280" aria-label="drawing pad"></canvas>
      <div class="tools">
        <button id="clear" type="button">Clear</button>
        <label class="upload">Upload a photo…<input id="file" type="file" accept="image/png,image/jpeg"></label>
      </div>
    </div>
    <div class="card result">
      <p id="status">{hint}</p>
      <div class="seen" id="seen-box" hidden><img id="seen" alt="the 28x28 image the model saw">
        <span>The 28&times;28 image<br>the model saw</span></div>
      <div id="bars"></div>
      <div class="classes">Classes: {classes}</div>
    </div>
  </div>
</main>
<script>
"use strict";
const HINT = {hint_js}, MAX_BODY = {max_body}, GAP_MS = 150;
const pad = document.getElementById("pad"), ctx = pad.getContext("2d");
const statusLine = document.getElementById("status"), bars = document.getElementById("bars");
const seen = document.getElementById("seen"), seenBox = document.getElementById("seen-box");
let drawing = false, last = null, busy = false, again = false, timer = null, lastSent = 0;
let generation = 0;   // bumped by Clear and uploads, so that an older answer arriving late is dropped

function say(text, isError) {{
  statusLine.textContent = text;
  statusLine.className = isError ? "error" : "";
}}

function clearPad() {{
  generation++;
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, pad.width, pad.height);
  bars.replaceChildren();
  seenBox.hidden = true;
  say(HINT);
}}

function point(e) {{
  const r = pad.getBoundingClientRect();
  return [(e.clientX - r.left) * pad.width / r.width, (e.clientY - r.top) * pad.height / r.height];
}}

function stroke(from, to) {{
  ctx.strokeStyle = "#000";
  ctx.lineWidth = 18;
  ctx.lineCap = ctx.lineJoin = "round";
  ctx.beginPath();
  ctx.moveTo(from[0], from[1]);
  ctx.lineTo(to[0], to[1]);
  ctx.stroke();
}}

pad.addEventListener("pointerdown", e => {{
  if (e.pointerType === "mouse" && e.button !== 0) return;
  pad.setPointerCapture(e.pointerId);
  drawing = true;
  last = point(e);
  stroke(last, last);
  schedule();
}});
pad.addEventListener("pointermove", e => {{
  if (!drawing) return;
  const events = e.getCoalescedEvents && e.getCoalescedEvents().length ? e.getCoalescedEvents() : [e];
  for (const ev of events) {{
    const p = point(ev);
    stroke(last, p);
    last = p;
  }}
  schedule();
}});
for (const type of ["pointerup", "pointercancel"]) {{
  pad.addEventListener(type, () => {{
    if (!drawing) return;
    drawing = false;
    schedule();
  }});
}}

// At most one request in flight and one every GAP_MS; the last stroke is always sent.
function schedule() {{
  if (busy) {{ again = true; return; }}
  const wait = lastSent + GAP_MS - performance.now();
  if (wait > 0) {{
    if (!timer) timer = setTimeout(() => {{ timer = null; schedule(); }}, wait);
    return;
  }}
  busy = true;
  lastSent = performance.now();
  const asked = generation;
  pad.toBlob(blob => send(blob, asked), "image/png");
}}

async function send(blob, asked) {{
  busy = true;
  try {{
    const response = await fetch("/predict", {{method: "POST", body: blob,
                                               headers: {{"Content-Type": blob.type || "image/png"}}}});
    const data = await response.json().catch(() => ({{error: "the server answered " + response.status}}));
    if (asked !== generation) return;
    if (response.ok) show(data);
    else if (data.blank) {{ bars.replaceChildren(); seenBox.hidden = true; say(HINT); }}
    else say(data.error || "the server answered " + response.status, true);
  }} catch (err) {{
    if (asked === generation) say("cannot reach the demo server (" + err.message + "); is it still running?", true);
  }} finally {{
    busy = false;
    if (again) {{ again = false; schedule(); }}
  }}
}}

function show(data) {{
  say("");
  seen.src = data.input;
  seenBox.hidden = false;
  bars.replaceChildren(...data.top.map(item => {{
    const row = document.createElement("div"), label = document.createElement("span");
    const bar = document.createElement("div"), fill = document.createElement("div");
    const pct = document.createElement("span");
    row.className = "row";
    label.className = "label";
    label.textContent = label.title = item.label;
    bar.className = "bar";
    fill.style.width = (100 * item.prob).toFixed(1) + "%";
    bar.append(fill);
    pct.className = "pct";
    pct.textContent = (100 * item.prob).toFixed(1) + " %";
    row.append(label, bar, pct);
    return row;
  }}));
}}

// A photo is sent as its own bytes, read as predict.py reads a file; one over the server's limit is
// redrawn at most 1024 px wide or high first.
async function upload(file) {{
  clearPad();
  const asked = generation;
  let image;
  try {{
    image = await createImageBitmap(file);
  }} catch (err) {{
    say(file.name + " is not an image this page can read; choose a PNG or JPEG file", true);
    return;
  }}
  const fit = Math.min(pad.width / image.width, pad.height / image.height);
  const w = image.width * fit, h = image.height * fit;
  ctx.drawImage(image, (pad.width - w) / 2, (pad.height - h) / 2, w, h);
  let body = file;
  if (file.size > MAX_BODY) {{
    const shrink = Math.min(1, 1024 / Math.max(image.width, image.height));
    const small = document.createElement("canvas");
    small.width = Math.round(image.width * shrink);
    small.height = Math.round(image.height * shrink);
    small.getContext("2d").drawImage(image, 0, 0, small.width, small.height);
    body = await new Promise(done => small.toBlob(done, "image/jpeg", 0.9));
  }}
  say("reading " + file.name + "…");
  busy = true;
  send(body, asked);
}}

document.getElementById("clear").addEventListener("click", clearPad);
document.getElementById("file").addEventListener("change", e => {{
  const file = e.target.files[0];
  e.target.value = "";
  if (file) upload(file);
}});
clearPad();
</script>
</body>
</html>
"""


def port_number(text):
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise ValueError(text)
    return port


port_number.__name__ = "port number (0-65535)"


def build_parser():
    p = Parser(prog="demo.py", description="Serve a page to draw on (or upload a photo to) that shows what a "
                                           "trained model reads.")
    p.add_argument("--port", type=port_number, default=8000, help="port to listen on (default: 8000; 0 picks "
                   "a free one)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine "
                   "only; 0.0.0.0 lets anyone who can reach it in)")
    p.add_argument("--ckpt", default=DEFAULT_CKPT, help="checkpoint or run folder (default: weights/mnist.pt, "
                   "shipped with the toolkit)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def main(argv):
    args = build_parser().parse_args(argv)
    if args.ckpt == DEFAULT_CKPT and not os.path.exists(DEFAULT_CKPT):
        raise UserError(f"the shipped weights {DEFAULT_CKPT} are missing; pass --ckpt with a checkpoint "
                        f"from train.py", 2)
    classifier = Classifier(args.ckpt)
    try:
        server = DemoServer((args.host, args.port), classifier)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise UserError(f"port {args.port} on {args.host} is already in use; stop what holds it or pick "
                            f"another with --port") from None
        if e.errno == errno.EACCES:
            raise UserError(f"port {args.port} needs administrator rights; pick one above 1023 with --port") from None
        raise UserError(f"cannot listen on {args.host} port {args.port} ({e.strerror or e}); check --host", 2) from None
    with server:
        print(f"serving {classifier.ckpt['model']['name']} ({os.path.basename(args.ckpt)}) on {server.url()} "
              f"(Ctrl-C stops it)", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:   # the way to stop a server, not a failure
            print("stopped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
