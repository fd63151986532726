"""The HTML attention viewer: decoder attention patterns of one generation as one self-contained page
(inline CSS, JS and JSON; no network), in the style and with the safety rules of the trajectory viewer:
token text travels as script-safe JSON and reaches the page only through `textContent`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Bool, Int

from diffusionlens.indexing import resolve_layers
from diffusionlens.trace import DenoisingTrace
from diffusionlens.viz._common import TokenDecoder
from diffusionlens.viz.attention import labelled_pattern, pattern_hook
from diffusionlens.viz.html_page import page_header, page_script, render_page, write_page

if TYPE_CHECKING:
    from diffusionlens.cache.denoising import DenoisingCache
    from diffusionlens.model import HookedDiffusionGemma


def attention_viewer_data(
    model: HookedDiffusionGemma,
    cache: DenoisingCache,
    trace: DenoisingTrace,
    *,
    tokens: Int[torch.Tensor, "batch length"],
    attention_mask: Bool[torch.Tensor, "batch prompt"] | Int[torch.Tensor, "batch prompt"] | None = None,
    layers: Sequence[int] | None = None,
    steps: Sequence[int] | None = None,
    canvas: int = 0,
    row: int = 0,
    tokenizer: TokenDecoder = None,
    title: str | None = None,
) -> dict[str, Any]:
    """The JSON-ready dict the attention page reads. Layers default to every decoder layer whose pattern
    was recorded, steps to every recorded step the trace ran; weights are rounded to 4 decimals."""
    if layers is None:
        layers = [layer for layer in range(model.cfg.num_hidden_layers) if pattern_hook(layer) in cache]
    if steps is None:
        steps = [s for s in cache.steps(canvas) if s < trace[canvas].n_steps]
    layers = resolve_layers(layers, model.cfg.num_hidden_layers)
    steps = [int(s) for s in steps]
    if not layers or not steps:
        raise ValueError(
            "no attention to show: record 'decoder.blocks.{l}.attn.hook_pattern' for some layer and step "
            f"(layers {layers}, steps {steps})"
        )
    prompt_keys: dict[str, Any] = {}
    patterns: dict[str, list] = {}
    canvas_texts: list[list[str]] = []
    for layer in layers:
        per_step = []
        for index, step in enumerate(steps):
            pattern, keys = labelled_pattern(
                model, cache, trace, step, layer, tokens=tokens, attention_mask=attention_mask, canvas=canvas,
                row=row, tokenizer=tokenizer,
            )  # fmt: skip
            per_step.append(pattern.round(decimals=4).tolist())
            n_prompt = keys.n_prompt
            prompt_keys[str(layer)] = {
                "texts": keys.texts[:n_prompt],
                "positions": keys.positions[:n_prompt],
                "padding": keys.padding[:n_prompt],
            }
            if len(canvas_texts) == index:
                canvas_texts.append(keys.texts[n_prompt:])
        patterns[str(layer)] = per_step
    return {
        **page_header(title, f"attention, canvas {canvas}, row {row}", canvas, row),
        "layers": layers,
        "steps": steps,
        "heads": {str(layer): len(patterns[str(layer)][0]) for layer in layers},
        "sliding": {str(layer): bool(model.cfg.is_sliding(layer)) for layer in layers},
        "prompt_keys": prompt_keys,
        "canvas_texts": canvas_texts,
        "patterns": patterns,
    }


def render_attention_viewer(
    model: HookedDiffusionGemma,
    cache: DenoisingCache,
    trace: DenoisingTrace,
    *,
    tokens: Int[torch.Tensor, "batch length"],
    attention_mask: Bool[torch.Tensor, "batch prompt"] | Int[torch.Tensor, "batch prompt"] | None = None,
    layers: Sequence[int] | None = None,
    steps: Sequence[int] | None = None,
    canvas: int = 0,
    row: int = 0,
    tokenizer: TokenDecoder = None,
    title: str | None = None,
) -> str:
    """Decoder attention patterns as a self-contained HTML page: choose the layer (`#layer-select`), head
    (`#head-select`) and step (`#step-slider`); the grid (`#pattern`) has one row per canvas query
    (`.query-label`) and one column per key (`.key-label`: the prompt keys the layer keeps, then the
    canvas the step read), each `.att-cell[data-query][data-key]` shaded by its weight. Hovering a cell
    or key label shows the query, the key (prompt/canvas position, padding) and the weight (`#tooltip`).

    `tokens` and `attention_mask` are as in `attention_labels`; the cache must hold
    `decoder.blocks.{l}.attn.hook_pattern` for the layers and steps shown.
    """
    data = attention_viewer_data(
        model, cache, trace, tokens=tokens, attention_mask=attention_mask, layers=layers, steps=steps,
        canvas=canvas, row=row, tokenizer=tokenizer, title=title,
    )  # fmt: skip
    fields = {"@MAX_STEP@": str(len(data["steps"]) - 1)}
    return render_page(
        _BODY, title=data["title"], style=_STYLE, script=_SCRIPT, data=data, data_id="attention-data", fields=fields
    )


def write_attention_viewer(
    model: HookedDiffusionGemma, cache: DenoisingCache, trace: DenoisingTrace, path: str | Path, **kw: Any
) -> Path:
    """Write `render_attention_viewer(model, cache, trace, **kw)` to `path` (UTF-8) and return the path."""
    return write_page(path, render_attention_viewer(model, cache, trace, **kw))


_BODY = """<section id="controls">
<label for="layer-select">layer</label> <select id="layer-select"></select>
<label for="head-select">head</label> <select id="head-select"></select>
<label for="step-slider">step</label>
<input type="range" id="step-slider" min="0" max="@MAX_STEP@" value="0" step="1" aria-label="denoising step">
<span id="step-label"></span>
</section>
<div id="layer-info"></div>
<div id="pattern-wrap"><table id="pattern"></table></div>
"""

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.2em; color: #222; }
h1 { font-size: 1.2em; margin: 0 0 0.2em 0; white-space: pre-wrap; }
#meta, #layer-info { color: #555; font-size: 0.85em; margin: 0.2em 0; }
#controls { display: flex; align-items: center; gap: 0.5em; flex-wrap: wrap; margin: 0.6em 0; }
#step-label { font-weight: 600; min-width: 6em; font-variant-numeric: tabular-nums; }
#pattern-wrap { overflow: auto; max-height: 80vh; }
#pattern { border-collapse: collapse; font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 10px; }
#pattern td, #pattern th { padding: 0; }
.key-label { writing-mode: vertical-rl; white-space: pre; font-weight: normal; padding: 2px 0; cursor: default; }
.key-label.prompt { color: #6a3d9a; }
.key-label.padding { color: #bbb; text-decoration: line-through; }
.key-label.first-canvas, .att-cell.first-canvas { border-left: 2px solid #444; }
.query-label { white-space: pre; text-align: right; padding-right: 4px; }
.att-cell { width: 11px; height: 11px; border: 1px solid #f4f4f4; }
#tooltip { position: absolute; background: #fff; border: 1px solid #888; border-radius: 4px; padding: 0.4em 0.6em;
  font-size: 0.8em; box-shadow: 0 2px 6px rgba(0,0,0,0.2); z-index: 10; pointer-events: none; white-space: pre; }
"""

_SCRIPT = page_script(
    "attention-data",
    """  var layerSelect = document.getElementById("layer-select");
  var headSelect = document.getElementById("head-select");
  var slider = document.getElementById("step-slider");
  var table = document.getElementById("pattern");
  var cells = [];

  function layer() { return layerSelect.value; }
  function stepIndex() { return Number(slider.value); }
  function keyOf(k) {
    var pk = data.prompt_keys[layer()];
    if (k < pk.texts.length) {
      return { kind: "prompt", position: pk.positions[k], text: pk.texts[k], padding: pk.padding[k] };
    }
    var q = k - pk.texts.length;
    return { kind: "canvas", position: q, text: data.canvas_texts[stepIndex()][q], padding: false };
  }
  function describe(key) {
    return key.kind + " " + key.position + " " + JSON.stringify(key.text) + (key.padding ? " (padding)" : "");
  }
  function colour(w) {
    var x = Math.min(1, Math.max(0, w));
    return "rgb(" + Math.round(255 - 247 * x) + "," + Math.round(255 - 174 * x) + "," + Math.round(255 - 99 * x) + ")";
  }

  document.getElementById("meta").textContent = "canvas " + data.canvas + ", row " + data.row + ", layers " +
    data.layers.join(", ") + ", steps " + data.steps.join(", ");
  data.layers.forEach(function (l) { layerSelect.appendChild(el("option", "", "layer " + l)).value = String(l); });

  function build() {
    var l = layer(), heads = data.heads[l], previous = headSelect.value;
    clear(headSelect);
    for (var h = 0; h < heads; h++) { headSelect.appendChild(el("option", "", "head " + h)).value = String(h); }
    if (previous !== "" && Number(previous) < heads) { headSelect.value = previous; }
    var pk = data.prompt_keys[l], nPrompt = pk.texts.length, nCanvas = data.canvas_texts[0].length;
    document.getElementById("layer-info").textContent = (data.sliding[l] ? "sliding" : "full") +
      " attention: " + nPrompt + " prompt keys kept, then " + nCanvas + " canvas keys";
    clear(table);
    cells = [];
    var head = el("tr");
    head.appendChild(el("th"));
    for (var k = 0; k < nPrompt + nCanvas; k++) {
      var th = el("th", "key-label");
      th.dataset.key = String(k);
      th.classList.add(k < nPrompt ? "prompt" : "canvas");
      if (k < nPrompt && pk.padding[k]) { th.classList.add("padding"); }
      if (k === nPrompt) { th.classList.add("first-canvas"); }
      th.addEventListener("mouseenter", (function (key) { return function (e) { show(e.target, null, key); }; })(k));
      th.addEventListener("mouseleave", hide);
      head.appendChild(th);
    }
    table.appendChild(head);
    for (var q = 0; q < nCanvas; q++) {
      var tr = el("tr");
      var label = el("td", "query-label");
      label.dataset.query = String(q);
      tr.appendChild(label);
      var rowCells = [];
      for (var k2 = 0; k2 < nPrompt + nCanvas; k2++) {
        var td = el("td", k2 === nPrompt ? "att-cell first-canvas" : "att-cell");
        td.dataset.query = String(q);
        td.dataset.key = String(k2);
        td.addEventListener("mouseenter", (function (qq, kk) {
          return function (e) { show(e.target, qq, kk); };
        })(q, k2));
        td.addEventListener("mouseleave", hide);
        tr.appendChild(td);
        rowCells.push(td);
      }
      cells.push(rowCells);
      table.appendChild(tr);
    }
    render();
  }

  function render() {
    var l = layer(), s = stepIndex(), h = Number(headSelect.value);
    var pattern = data.patterns[l][s][h], texts = data.canvas_texts[s];
    document.getElementById("step-label").textContent = "step " + data.steps[s];
    var labels = table.querySelectorAll(".key-label");
    for (var k = 0; k < labels.length; k++) { labels[k].textContent = keyOf(k).text; }
    var queries = table.querySelectorAll(".query-label");
    for (var q = 0; q < cells.length; q++) {
      queries[q].textContent = q + " " + texts[q];
      for (var k2 = 0; k2 < cells[q].length; k2++) {
        var w = pattern[q][k2];
        cells[q][k2].style.backgroundColor = colour(w);
        cells[q][k2].dataset.weight = String(w);
      }
    }
    table.dataset.layer = l;
    table.dataset.head = String(h);
    table.dataset.step = String(data.steps[s]);
  }

  function show(target, q, k) {
    var lines = [];
    if (q !== null) {
      lines.push("query: canvas " + q + " " + JSON.stringify(data.canvas_texts[stepIndex()][q]));
    }
    lines.push("key: " + describe(keyOf(k)));
    if (q !== null) {
      lines.push("weight " + Number(data.patterns[layer()][stepIndex()][Number(headSelect.value)][q][k]).toFixed(4));
    }
    clear(tooltip);
    lines.forEach(function (line) { tooltip.appendChild(el("div", "tip-line", line)); });
    showTooltipBelow(target);
  }
  function hide() { tooltip.hidden = true; }

  layerSelect.addEventListener("change", build);
  headSelect.addEventListener("change", render);
  slider.addEventListener("input", render);
  slider.addEventListener("change", render);
  build();
""",
)
