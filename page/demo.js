"use strict";
// The page of demo.py. Its settings (the checkpoint's description, the hint, the class names, the
// server's body limit) come from GET /config, so that this file is the same for every checkpoint.
const GAP_MS = 150;
const pad = document.getElementById("pad"), ctx = pad.getContext("2d");
const statusLine = document.getElementById("status"), bars = document.getElementById("bars");
const seen = document.getElementById("seen"), seenBox = document.getElementById("seen-box");
let config = {about: "", hint: "", classes: [], max_body: Infinity, top: 5,   // until /config answers
              accept: [], formats: "PNG or JPEG"};
let drawing = false, last = null, busy = false, again = false, timer = null, lastSent = 0;
let generation = 0;   // bumped by Clear and uploads, so that an older answer arriving late is dropped

function say(text, isError) {
  statusLine.textContent = text;
  statusLine.className = isError ? "error" : "";
}

function clearPad() {
  generation++;
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, pad.width, pad.height);
  bars.replaceChildren();
  seenBox.hidden = true;
  say(config.hint);
}

function point(e) {
  const r = pad.getBoundingClientRect();
  return [(e.clientX - r.left) * pad.width / r.width, (e.clientY - r.top) * pad.height / r.height];
}

function stroke(from, to) {
  ctx.strokeStyle = "#000";
  ctx.lineWidth = 18;
  ctx.lineCap = ctx.lineJoin = "round";
  ctx.beginPath();
  ctx.moveTo(from[0], from[1]);
  ctx.lineTo(to[0], to[1]);
  ctx.stroke();
}

pad.addEventListener("pointerdown", e => {
  if (e.pointerType === "mouse" && e.button !== 0) return;
  pad.setPointerCapture(e.pointerId);
  drawing = true;
  last = point(e);
  stroke(last, last);
  schedule();
});
pad.addEventListener("pointermove", e => {
  if (!drawing) return;
  const events = e.getCoalescedEvents && e.getCoalescedEvents().length ? e.getCoalescedEvents() : [e];
  for (const ev of events) {
    const p = point(ev);
    stroke(last, p);
    last = p;
  }
  schedule();
});
for (const type of ["pointerup", "pointercancel"]) {
  pad.addEventListener(type, () => {
    if (!drawing) return;
    drawing = false;
    schedule();
  });
}

// At most one request in flight and one every GAP_MS; the last stroke is always sent.
function schedule() {
  if (busy) { again = true; return; }
  const wait = lastSent + GAP_MS - performance.now();
  if (wait > 0) {
    if (!timer) timer = setTimeout(() => { timer = null; schedule(); }, wait);
    return;
  }
  busy = true;
  lastSent = performance.now();
  const asked = generation;
  pad.toBlob(blob => send(blob, asked), "image/png");
}

async function send(blob, asked) {
  busy = true;
  try {
    const response = await fetch("/predict", {method: "POST", body: blob,
                                              headers: {"Content-Type": blob.type || "image/png"}});
    const data = await response.json().catch(() => ({error: "the server answered " + response.status}));
    if (asked !== generation) return;
    if (response.ok) show(data);
    else if (data.blank) { bars.replaceChildren(); seenBox.hidden = true; say(config.hint); }
    else say(data.error || "the server answered " + response.status, true);
  } catch (err) {
    if (asked === generation) say("cannot reach the demo server (" + err.message + "); is it still running?", true);
  } finally {
    busy = false;
    if (again) { again = false; schedule(); }
  }
}

function show(data) {
  say("");
  seen.src = data.input;
  seenBox.hidden = false;
  bars.replaceChildren(...data.top.slice(0, config.top).map(item => {
    const row = document.createElement("div"), label = document.createElement("span");
    const bar = document.createElement("div"), fill = document.createElement("div");
    const pct = document.createElement("span");
    row.className = "row";
    label.className = "label";
    label.textContent = label.title = item.label;
    bar.className = "bar";
    fill.style.width = (100 * item.prob).toFixed(1) + "%";   // CSSOM, which the CSP allows; style="" it would not
    bar.append(fill);
    pct.className = "pct";
    pct.textContent = (100 * item.prob).toFixed(1) + " %";
    row.append(label, bar, pct);
    return row;
  }));
}

// A photo is sent as its own bytes, read as predict.py reads a file; one over the server's limit is
// redrawn at most 1024 px wide or high first. One the browser cannot draw (TIFF outside Safari) is
// still sent when it fits: the server reads more formats, and its answer shows what it saw.
async function upload(file) {
  clearPad();
  const asked = generation;
  const image = await createImageBitmap(file).catch(() => null);
  if (!image && (file.size > config.max_body || (file.type && !config.accept.includes(file.type)))) {
    const limit = file.size > config.max_body ? " under " + Math.floor(config.max_body / 1048576) + " MB" : "";
    say(file.name + " is not an image this page can read; choose a " + config.formats + " file" + limit, true);
    return;
  }
  let body = file;
  if (image) {
    const fit = Math.min(pad.width / image.width, pad.height / image.height);
    const w = image.width * fit, h = image.height * fit;
    ctx.drawImage(image, (pad.width - w) / 2, (pad.height - h) / 2, w, h);
    if (file.size > config.max_body) {
      const shrink = Math.min(1, 1024 / Math.max(image.width, image.height));
      const small = document.createElement("canvas");
      small.width = Math.round(image.width * shrink);
      small.height = Math.round(image.height * shrink);
      small.getContext("2d").drawImage(image, 0, 0, small.width, small.height);
      body = await new Promise(done => small.toBlob(done, "image/jpeg", 0.9));
    }
  }
  say("reading " + file.name + "…");
  busy = true;
  send(body, asked);
}

// The pad works at once; the texts follow when /config answers. The hint is shown then only if
// nothing else (an answer, an error, a file being read) has taken its place meanwhile.
async function start() {
  try {
    const response = await fetch("/config");
    if (!response.ok) throw new Error("it answered " + response.status);
    config = await response.json();
  } catch (err) {
    say("cannot read the demo's settings from the server (" + err.message + "); reload the page", true);
    return;
  }
  document.getElementById("about").textContent = config.about;
  document.getElementById("file").accept = config.accept.join(",");
  document.getElementById("classes").textContent = "Classes: " + config.classes.join(" · ");
  if (!statusLine.textContent && !bars.children.length) say(config.hint);
}

document.getElementById("clear").addEventListener("click", clearPad);
document.getElementById("file").addEventListener("change", e => {
  const file = e.target.files[0];
  e.target.value = "";
  if (file) upload(file);
});
clearPad();
start();
