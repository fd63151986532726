"""The HTML trajectory viewer: one self-contained file (inline CSS, JS and JSON; no network) with a step
slider over one canvas of a DenoisingTrace.

Token text never reaches the page as markup: `viz.html_page` (the frame every page shares) carries the
data as script-safe JSON, builds every element with `textContent` and sets a Content-Security-Policy
that allows no network access and only the viewer's own script (by hash).
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffusionlens.trace import TOKEN_FIELDS, CanvasTrace, DenoisingTrace
from diffusionlens.viz._common import RowView, TokenDecoder, token_texts
from diffusionlens.viz.dla import MAX_COMPONENTS, dla_title, shown_components
from diffusionlens.viz.feature_panel import (
    FEATURES_HTML,
    FEATURES_SCRIPT,
    FEATURES_STYLE,
    FeaturePanel,
    feature_panel_data,
)
from diffusionlens.viz.html_page import page_csp as page_csp  # moved to html_page; importable here as before
from diffusionlens.viz.html_page import page_header, page_script, render_page, write_page
from diffusionlens.viz.html_page import script_safe_json as script_safe_json  # likewise

if TYPE_CHECKING:
    from diffusionlens.analysis.dla import DLAByStep


def _round(value: float, digits: int) -> float | None:
    value = float(value)
    return round(value, digits) if math.isfinite(value) else None


def viewer_data(
    trace: DenoisingTrace | CanvasTrace,
    tokenizer: TokenDecoder = None,
    *,
    canvas: int = 0,
    row: int = 0,
    title: str | None = None,
    dla: DLAByStep | None = None,
    features: FeaturePanel | None = None,
) -> dict[str, Any]:
    """The JSON-ready dict the viewer page reads: per-step token ids of every field, entropy, accepted
    flags, top-k (when recorded), commit steps, the DLA and feature panels' data when given, and the
    text of every token id that appears."""
    prompt_length = trace.prompt_length if isinstance(trace, DenoisingTrace) else None
    view = RowView.select(trace, canvas, row)
    ct, n_steps = view.trace, view.n_steps
    fields = {name: view.per_step(name).tolist() for name in TOKEN_FIELDS}
    entropy = view.per_step("entropy").float()
    finite = entropy[entropy.isfinite()]
    top_tokens = top_probs = None
    if ct.top_k_tokens is not None and ct.top_k_probs is not None:
        top_tokens = ct.top_k_tokens[:n_steps, row].tolist()
        top_probs = [[[_round(p, 4) for p in ps] for ps in step] for step in ct.top_k_probs[:n_steps, row].tolist()]
    ids = {i for rows in fields.values() for step in rows for i in step}
    if top_tokens is not None:
        ids |= {i for step in top_tokens for ks in step for i in ks}
    panel = None
    if features is not None:
        panel, panel_ids = feature_panel_data(features, ct, canvas=canvas, row=row, n_steps=n_steps)
        ids |= panel_ids
    ordered = sorted(ids)
    texts = dict(zip((str(i) for i in ordered), token_texts(tokenizer, ordered), strict=True))
    return {
        **page_header(title, f"canvas {canvas}, row {row}", canvas, row),
        "prompt_length": prompt_length,
        "n_steps": n_steps,
        "length": ct.input_canvas.shape[-1],
        "k": 0 if top_tokens is None else len(top_tokens[0][0]),
        "text": texts,
        "fields": fields,
        "entropy": [[_round(e, 4) for e in step] for step in entropy.tolist()],
        "max_entropy": _round(float(finite.max()), 4) if finite.numel() else 0.0,
        "accepted": view.per_step("accepted").int().tolist(),
        "finished": ct.finished[:n_steps, row].tolist(),
        "temperature": [_round(v, 4) for v in ct.temperature[:n_steps].tolist()],
        "t": ct.t[:n_steps].tolist(),
        "top_k_tokens": top_tokens,
        "top_k_probs": top_probs,
        "commit": view.commit_steps().tolist(),
        "final": ct.argmax[n_steps - 1, row].tolist(),
        "dla": None if dla is None else _dla_data(dla, tokenizer, canvas, row),
        "features": panel,
    }


def _dla_data(dla: DLAByStep, tokenizer: TokenDecoder, canvas: int, row: int) -> dict[str, Any]:
    """The DLA panel's data: one row per step, one column per component (at most `MAX_COMPONENTS` and
    `rest`), and which columns start a new block."""
    if (dla.canvas, dla.row) != (canvas, row):
        raise ValueError(f"the DLA table is of canvas {dla.canvas}, row {dla.row}; the viewer shows {canvas}, {row}")
    dla, note = shown_components(dla, MAX_COMPONENTS)
    layers = dla.layers
    return {
        "title": "direct logit attribution: " + dla_title(dla, tokenizer) + note,
        "position": dla.position,
        "labels": dla.labels,
        "block_start": [layer is not None and (i == 0 or layer != layers[i - 1]) for i, layer in enumerate(layers)],
        "steps": dla.steps,
        "values": [[_round(v, 4) for v in step] for step in dla.attributions.tolist()],
        "logit": [_round(v, 4) for v in dla.logit.tolist()],
        "max_abs": _round(float(dla.attributions.abs().max()), 4),
    }


def render_viewer(
    trace: DenoisingTrace | CanvasTrace,
    tokenizer: TokenDecoder = None,
    *,
    canvas: int = 0,
    row: int = 0,
    title: str | None = None,
    step: int = 0,
    dla: DLAByStep | None = None,
    features: FeaturePanel | None = None,
) -> str:
    """The viewer for one canvas and batch row of `trace`, as a self-contained HTML page.

    A step slider (`#step-slider`, also arrow keys and play) shows the canvas at each step: by default
    the draft answer (argmax), or the sampled tokens, the canvas the decoder read, or the canvas after
    renoising (`#view-select`). Each position (`.cell[data-position]` holding `.token[data-position]`) is
    coloured by its entropy at that step, outlined when accepted at that step, and labels its commit
    step (`.commit`). Hovering a position shows its top-k tokens and probabilities (`#tooltip`) when the
    trace was generated with `record_top_k`. `tokenizer` turns ids into text (an object with `decode`,
    a callable id -> str, or None for ids); `step` is the step shown first. Steps run to the one after
    which the row stopped.

    With `dla` (a `dla_by_step` table of the same canvas and row) a panel (`#dla`) shows it as a step ×
    component heatmap (`.dla-cell[data-step][data-component]`), the slider's step highlighted, and the
    position it attributes outlined on the canvas. Either granularity of `dla_by_step` shows (blocks are
    separated by a rule); a table of more than `viz.dla.MAX_COMPONENTS` components shows the largest
    and a `rest` column (`DLAByStep.keep_top`), as the title says.

    With `features` (a `FeaturePanel` of SAE feature activations recorded by `generate_with_sae` in the
    same run, and/or `top_activations` examples from a store) a panel (`#features`) shows one feature at a
    time (`#feature-select`): its activation across steps at the positions where it fires most (a chart
    and `.feature-value[data-step][data-position]` cells), the run's strongest (step, position) examples
    with the canvas read around them (`.run-example`, click to jump to that step), the store's top
    examples with prompt, seed, step, position and token context (`.store-example`) and the store's mean
    activation when it fires and its firing rate per step; a bar under each canvas position
    (`.feature-act`) shows the activation at the slider's step.
    """
    data = viewer_data(trace, tokenizer, canvas=canvas, row=row, title=title, dla=dla, features=features)
    if not 0 <= step < data["n_steps"]:
        raise IndexError(f"step {step} out of range: row {row} of canvas {canvas} has {data['n_steps']} steps")
    fields = {"@MAX_STEP@": str(data["n_steps"] - 1), "@STEP@": str(step), "@VIEW_OPTIONS@": _view_options()}
    fields["@FEATURES@"] = FEATURES_HTML
    return render_page(
        _BODY, title=data["title"], style=_STYLE, script=_SCRIPT, data=data, data_id="trace-data", fields=fields
    )


def _view_options() -> str:
    """One `<option>` per token field of the trace; the first (the draft answer) is shown first."""
    return "\n".join(
        f'<option value="{name}"{" selected" if i == 0 else ""}>{html.escape(label)}</option>'
        for i, (name, label) in enumerate(TOKEN_FIELDS.items())
    )


def write_viewer(trace: DenoisingTrace | CanvasTrace, tokenizer: TokenDecoder, path: str | Path, **kw: Any) -> Path:
    """Write `render_viewer(trace, tokenizer, **kw)` to `path` (UTF-8) and return the path."""
    return write_page(path, render_viewer(trace, tokenizer, **kw))


_BODY = """<section id="controls">
<button type="button" id="prev-step" title="previous step">&#9664;</button>
<input type="range" id="step-slider" min="0" max="@MAX_STEP@" value="@STEP@" step="1" aria-label="denoising step">
<button type="button" id="next-step" title="next step">&#9654;</button>
<button type="button" id="play">play</button>
<span id="step-label"></span>
<label for="view-select">show</label>
<select id="view-select">
@VIEW_OPTIONS@
</select>
</section>
<div id="step-info"></div>
<div id="step-bars" aria-label="accepted tokens per step"></div>
<div id="canvas" aria-live="polite"></div>
<div id="legend">
<span class="legend-item">entropy <span id="entropy-min">0</span>
<span class="gradient"></span> <span id="entropy-max"></span> nats</span>
<span class="legend-item"><span class="swatch accepted-swatch"></span> accepted at this step</span>
<span class="legend-item"><b>bold</b>: committed (argmax final from here)</span>
<span class="legend-item"><span class="commit-example">c3</span>: commits at step 3</span>
<span class="legend-item" id="topk-note"></span>
</div>
<section id="dla" hidden>
<h2 id="dla-title"></h2>
<table id="dla-table"></table>
</section>
@FEATURES@
"""

_STYLE = (
    """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.2em; color: #222; }
h1 { font-size: 1.2em; margin: 0 0 0.2em 0; white-space: pre-wrap; }
#meta, #step-info { color: #555; font-size: 0.85em; margin: 0.2em 0; }
#controls { display: flex; align-items: center; gap: 0.5em; flex-wrap: wrap; margin: 0.6em 0; }
#step-slider { width: 22em; }
#step-label { font-weight: 600; min-width: 7em; font-variant-numeric: tabular-nums; }
#step-bars { display: flex; align-items: flex-end; gap: 2px; height: 36px; margin: 0.4em 0 0.8em 0; }
.step-bar { width: 10px; background: #9ecae1; cursor: pointer; min-height: 2px; }
.step-bar.current { background: #08519c; }
#canvas { display: flex; flex-wrap: wrap; gap: 3px; font-family: ui-monospace, "DejaVu Sans Mono", monospace; }
.cell { display: inline-flex; flex-direction: column; align-items: center; min-width: 1.7em;
  border: 2px solid #ddd; border-radius: 4px; padding: 1px 2px; cursor: default; }
.cell.accepted { border-color: #1a9641; box-shadow: inset 0 -3px 0 #1a9641; }
.cell:focus { outline: 2px solid #08519c; }
.pos { font-size: 0.6em; color: #888; }
.token { white-space: pre; font-size: 1.05em; min-height: 1.2em; color: #666; }
.cell.committed .token { font-weight: 700; color: #000; }
.cell.blank .token { min-width: 0.8em; border-bottom: 1px dotted #999; }
.commit, .commit-example { font-size: 0.6em; color: #555; }
#legend { margin-top: 1em; font-size: 0.8em; color: #444; display: flex; gap: 1.5em; flex-wrap: wrap; }
.gradient { display: inline-block; width: 6em; height: 0.8em; vertical-align: middle;
  background: linear-gradient(to right, rgb(255,255,255), rgb(255,105,35)); border: 1px solid #ccc; }
.swatch { display: inline-block; width: 1em; height: 0.8em; vertical-align: middle; }
.accepted-swatch { border: 2px solid #1a9641; box-shadow: inset 0 -3px 0 #1a9641; }
#tooltip { position: absolute; background: #fff; border: 1px solid #888; border-radius: 4px; padding: 0.4em 0.6em;
  font-size: 0.8em; box-shadow: 0 2px 6px rgba(0,0,0,0.2); z-index: 10; pointer-events: none; min-width: 10em; }
#tooltip .tip-head { font-weight: 600; white-space: pre; }
#tooltip table { border-collapse: collapse; margin-top: 0.3em; }
#tooltip td { padding: 0 0.4em; font-family: ui-monospace, "DejaVu Sans Mono", monospace; white-space: pre; }
#tooltip .topk-token.blank { border-bottom: 1px dotted #999; min-width: 0.6em; display: inline-block; }
#tooltip .bar { display: inline-block; height: 0.7em; background: #6baed6; }
#dla h2 { font-size: 0.95em; margin: 1.2em 0 0.3em 0; white-space: pre; }
#dla-table { border-collapse: collapse; font-size: 0.7em; font-family: ui-monospace, "DejaVu Sans Mono", monospace; }
#dla-table th { writing-mode: vertical-rl; font-weight: normal; padding: 2px 0; }
#dla-table td { min-width: 1.6em; height: 1.3em; text-align: center; border: 1px solid #eee; }
#dla-table tr.current td.dla-step { font-weight: 700; }
#dla-table .dla-block-start { border-left: 2px solid #888; }
#dla-table tr.current td { border-top: 2px solid #08519c; border-bottom: 2px solid #08519c; }
.cell.dla-position { outline: 2px dashed #6a3d9a; }
"""
    + FEATURES_STYLE
)

_SCRIPT = page_script(
    "trace-data",
    """  var slider = document.getElementById("step-slider");
  var label = document.getElementById("step-label");
  var info = document.getElementById("step-info");
  var view = document.getElementById("view-select");
  var board = document.getElementById("canvas");
  var bars = document.getElementById("step-bars");
  var cells = [], tokens = [], stepBars = [];
  var hovered = null, timer = null;

  function text(id) {
    var t = data.text[String(id)];
    return t === undefined ? String(id) : t;
  }
  function fmt(x, digits) { return x === null ? "n/a" : Number(x).toFixed(digits); }
  function colour(e) {
    if (e === null) { return "rgb(255,255,255)"; }
    var x = data.max_entropy > 0 ? Math.min(1, Math.max(0, e / data.max_entropy)) : 0;
    return "rgb(255," + Math.round(255 - 150 * x) + "," + Math.round(255 - 220 * x) + ")";
  }
  function current() { return Number(slider.value); }

  var meta = "canvas " + data.canvas + ", row " + data.row + ", " + data.length + " positions, " +
    data.n_steps + " steps";
  if (data.prompt_length !== null) { meta += ", prompt of " + data.prompt_length + " tokens"; }
  document.getElementById("meta").textContent = meta;
  document.getElementById("entropy-max").textContent = fmt(data.max_entropy, 2);
  document.getElementById("topk-note").textContent = data.k > 0 ?
    "hover a position for its top-" + data.k + " tokens" :
    "hover a position for details (generate with record_top_k=k to see alternatives)";

  for (var s = 0; s < data.n_steps; s++) {
    var count = data.accepted[s].reduce(function (a, b) { return a + b; }, 0);
    var bar = el("div", "step-bar");
    bar.dataset.step = String(s);
    bar.style.height = Math.max(2, Math.round(34 * count / Math.max(1, data.length))) + "px";
    bar.title = "step " + s + ": " + count + " accepted";
    bar.addEventListener("click", (function (step) { return function () { go(step); }; })(s));
    bars.appendChild(bar);
    stepBars.push(bar);
  }

  for (var p = 0; p < data.length; p++) {
    var cell = el("div", "cell");
    cell.dataset.position = String(p);
    cell.tabIndex = 0;
    var tok = el("span", "token");
    tok.dataset.position = String(p);
    var com = el("span", "commit", "c" + data.commit[p]);
    com.dataset.position = String(p);
    cell.appendChild(el("span", "pos", String(p)));
    cell.appendChild(tok);
    cell.appendChild(com);
    cell.addEventListener("mouseenter", (function (q) { return function () { show(q); }; })(p));
    cell.addEventListener("focus", (function (q) { return function () { show(q); }; })(p));
    cell.addEventListener("mouseleave", hide);
    cell.addEventListener("blur", hide);
    board.appendChild(cell);
    cells.push(cell);
    tokens.push(tok);
  }

  function show(p) {
    hovered = p;
    var step = current();
    var ids = data.fields[view.value][step];
    clear(tooltip);
    tooltip.appendChild(el("div", "tip-head", "position " + p + ": " + JSON.stringify(text(ids[p]))));
    tooltip.appendChild(el("div", "tip-line", "entropy " + fmt(data.entropy[step][p], 3) + " nats" +
      (data.accepted[step][p] ? ", accepted at step " + step : ", not accepted at step " + step)));
    tooltip.appendChild(el("div", "tip-line", "commit step " + data.commit[p] + ", final " +
      JSON.stringify(text(data.final[p]))));
    if (data.top_k_tokens !== null) {
      var table = el("table", "topk");
      var ks = data.top_k_tokens[step][p], ps = data.top_k_probs[step][p];
      for (var i = 0; i < ks.length; i++) {
        var tr = el("tr", "topk-row");
        tr.dataset.tokenId = String(ks[i]);
        var word = text(ks[i]);
        tr.appendChild(el("td", word.trim() === "" ? "topk-token blank" : "topk-token", word));
        tr.appendChild(el("td", "topk-prob", fmt(ps[i], 3)));
        var cellBar = el("td");
        var b = el("span", "bar");
        b.style.width = Math.round(60 * (ps[i] || 0)) + "px";
        cellBar.appendChild(b);
        tr.appendChild(cellBar);
        table.appendChild(tr);
      }
      tooltip.appendChild(table);
    }
    showTooltipBelow(cells[p]);
  }
  function hide() { hovered = null; tooltip.hidden = true; }

  var dlaRows = {};
  if (data.dla !== null) {
    var dla = data.dla, dlaTable = document.getElementById("dla-table");
    document.getElementById("dla").hidden = false;
    document.getElementById("dla-title").textContent = dla.title;
    cells[dla.position].classList.add("dla-position");
    var head = el("tr");
    head.appendChild(el("th", "", "step (logit)"));
    dla.labels.forEach(function (name, c) {
      head.appendChild(el("th", dla.block_start[c] ? "dla-label dla-block-start" : "dla-label", name));
    });
    dlaTable.appendChild(head);
    dla.steps.forEach(function (s, i) {
      var tr = el("tr");
      tr.dataset.step = String(s);
      tr.appendChild(el("td", "dla-step", s + " (" + fmt(dla.logit[i], 2) + ")"));
      dla.values[i].forEach(function (v, c) {
        var td = el("td", dla.block_start[c] ? "dla-cell dla-block-start" : "dla-cell");
        var x = dla.max_abs > 0 && v !== null ? Math.max(-1, Math.min(1, v / dla.max_abs)) : 0;
        td.style.backgroundColor = x >= 0 ?
          "rgb(255," + Math.round(255 - 200 * x) + "," + Math.round(255 - 200 * x) + ")" :
          "rgb(" + Math.round(255 + 200 * x) + "," + Math.round(255 + 200 * x) + ",255)";
        td.dataset.step = String(s);
        td.dataset.component = dla.labels[c];
        td.dataset.value = String(v);
        td.title = dla.labels[c] + " at step " + s + ": " + fmt(v, 3);
        tr.appendChild(td);
      });
      dlaTable.appendChild(tr);
      dlaRows[s] = tr;
    });
  }
/*@FEATURES@*/

  function render() {
    var step = current();
    Object.keys(dlaRows).forEach(function (s) { dlaRows[s].classList.toggle("current", Number(s) === step); });
    var ids = data.fields[view.value][step];
    var ent = data.entropy[step], acc = data.accepted[step];
    for (var p = 0; p < data.length; p++) {
      var t = text(ids[p]);
      tokens[p].textContent = t;
      tokens[p].dataset.tokenId = String(ids[p]);
      cells[p].style.backgroundColor = colour(ent[p]);
      cells[p].dataset.entropy = ent[p] === null ? "" : String(ent[p]);
      cells[p].dataset.accepted = acc[p] ? "1" : "0";
      cells[p].classList.toggle("accepted", acc[p] === 1);
      cells[p].classList.toggle("committed", step >= data.commit[p]);
      cells[p].classList.toggle("blank", t.trim() === "");
    }
    for (var s = 0; s < stepBars.length; s++) { stepBars[s].classList.toggle("current", s === step); }
    var accepted = acc.reduce(function (a, b) { return a + b; }, 0);
    label.textContent = "step " + step + " / " + (data.n_steps - 1);
    info.textContent = "t = " + data.t[step] + ", temperature " + fmt(data.temperature[step], 3) + ", " +
      accepted + " accepted" + (data.finished[step] ? ", stopped after this step" : "");
    board.dataset.step = String(step);
    updateFeatures(step);
    if (hovered !== null) { show(hovered); }
  }
  function go(step) {
    slider.value = String(Math.max(0, Math.min(data.n_steps - 1, step)));
    render();
  }

  slider.addEventListener("input", render);
  slider.addEventListener("change", render);
  view.addEventListener("change", render);
  document.getElementById("prev-step").addEventListener("click", function () { go(current() - 1); });
  document.getElementById("next-step").addEventListener("click", function () { go(current() + 1); });
  var play = document.getElementById("play");
  play.addEventListener("click", function () {
    if (timer !== null) { clearInterval(timer); timer = null; play.textContent = "play"; return; }
    if (current() >= data.n_steps - 1) { go(0); }
    play.textContent = "pause";
    timer = setInterval(function () {
      if (current() >= data.n_steps - 1) { clearInterval(timer); timer = null; play.textContent = "play"; return; }
      go(current() + 1);
    }, 600);
  });
  render();
""".replace("/*@FEATURES@*/", FEATURES_SCRIPT),
)
