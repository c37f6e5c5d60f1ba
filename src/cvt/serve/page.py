"""The web page at `/`: drop or choose an image, see the top-5 as bars and the class token's attention over it.

One self-contained HTML document (no external scripts, styles or fonts: it works offline and on loopback). The
script posts the file to `/predict?top_k=5` and to `/attention`, then draws the bars and shows the overlay.
"""

from __future__ import annotations

import html
from string import Template

_PAGE = Template("""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>cvt serve: $name</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 60rem; color: #222; padding: 0 1rem; }
  h1 { font-size: 1.4rem; margin-bottom: .2rem; }
  .meta { color: #666; font-size: .9rem; margin-top: 0; }
  #drop { display: block; margin-top: 1rem; border: 2px dashed #999; border-radius: 8px; padding: 1.5rem;
          text-align: center; cursor: pointer; }
  #drop.over { border-color: #2a6fdb; background: #eef4ff; }
  #result { display: flex; gap: 1.5rem; flex-wrap: wrap; margin-top: 1.5rem; }
  figure { margin: 0; }
  figure img { width: 224px; height: 224px; object-fit: contain; border: 1px solid #ddd; background: #fafafa; }
  figcaption { font-size: .85rem; color: #555; text-align: center; }
  #predictions { flex: 1; min-width: 16rem; }
  .row { display: grid; grid-template-columns: 10rem 1fr 4rem; align-items: center; gap: .5rem; margin: .35rem 0; }
  .label { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
  .track { background: #eee; border-radius: 4px; height: 1rem; }
  .bar { background: #2a6fdb; border-radius: 4px; height: 100%; }
  .score { text-align: right; font-variant-numeric: tabular-nums; }
  #status { margin-top: 1rem; min-height: 1.2rem; }
  #status.error { color: #b00020; }
</style>
</head>
<body>
<h1>cvt serve: $name</h1>
<p class="meta">$classes classes, input $height&times;$width, backend $backend.
  API: <code>POST /predict</code>, <code>POST /v2/models/$name/infer</code>, <code>GET /metrics</code></p>
<label id="drop" for="file">Drop an image here, or click to choose one
  <input id="file" type="file" accept="image/*" hidden></label>
<div id="status"></div>
<div id="result" hidden>
  <figure><img id="preview" alt="the image"><figcaption>the image</figcaption></figure>
  <figure><img id="attention" alt="attention map"><figcaption>class-token attention, last block</figcaption></figure>
  <div id="predictions"></div>
</div>
<script>
const drop = document.getElementById("drop"), input = document.getElementById("file");
const statusLine = document.getElementById("status");

function say(text, isError) {
  statusLine.textContent = text;
  statusLine.className = isError ? "error" : "";
}

async function post(path, file) {
  const response = await fetch(path, {method: "POST", body: file,
                                      headers: {"Content-Type": file.type || "application/octet-stream"}});
  if (!response.ok) {
    let reason = response.statusText;
    try { reason = (await response.json()).error || reason; } catch (e) {}
    throw new Error(response.status + ": " + reason);
  }
  return response;
}

function showPredictions(predictions) {
  const box = document.getElementById("predictions");
  box.replaceChildren();
  for (const p of predictions) {
    const row = document.createElement("div");
    row.className = "row prediction";
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = label.title = p.label;
    const track = document.createElement("div");
    track.className = "track";
    const bar = document.createElement("div");
    bar.className = "bar";
    bar.style.width = (100 * p.score).toFixed(1) + "%";
    track.append(bar);
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = (100 * p.score).toFixed(1) + "%";
    row.append(label, track, score);
    box.append(row);
  }
}

async function classify(file) {
  say("classifying " + file.name + " ...");
  document.getElementById("preview").src = URL.createObjectURL(file);
  try {
    const [predictions, attention] = await Promise.all([
      post("/predict?top_k=5", file).then(r => r.json()),
      post("/attention", file).then(r => r.blob()),
    ]);
    showPredictions(predictions);
    document.getElementById("attention").src = URL.createObjectURL(attention);
    document.getElementById("result").hidden = false;
    say(file.name + ": " + predictions[0].label);
  } catch (err) {
    say(err.message, true);
  }
}

input.addEventListener("change", () => input.files.length && classify(input.files[0]));
drop.addEventListener("dragover", e => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", e => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files.length) classify(e.dataTransfer.files[0]);
});
</script>
</body>
</html>
""")


def render_page(name: str, *, classes: int, input_size: tuple[int, int], backend: str) -> str:
    """The page for the model `name`, with its facts in the header line."""
    return _PAGE.substitute(
        name=html.escape(name),
        classes=classes,
        height=input_size[0],
        width=input_size[1],
        backend=html.escape(backend),
    )
