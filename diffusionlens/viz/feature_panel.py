"""The SAE feature panel of the trajectory viewer.

Per chosen SAE feature: its activation at every step and canvas position of the run the viewer shows
(the feature cache `generate_with_sae` records), drawn as one curve across steps per position where it
fires most, with the run's top (step, position) examples and their token context; and, from
`top_activations` over an `ActivationStore`, its top examples in the store (prompt, seed, step,
position, the tokens read and finally written around it) and its mean activation and firing rate per
step. The page marks, at the slider's step, how strongly the selected feature fires at each position.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float

from diffusionlens.hooks.shapes import SAE_ACTS_SUFFIX
from diffusionlens.trace import CanvasTrace

if TYPE_CHECKING:
    from diffusionlens.cache.denoising import DenoisingCache
    from diffusionlens.features.sae import FeatureExamples


@dataclass
class FeaturePanel:
    """What the viewer's feature panel shows: `render_viewer(trace, tokenizer, features=FeaturePanel(...))`.

    `hook_name`: the hook the SAE reads. `cache`: the feature cache `generate_with_sae` returned for the
    run whose trace the viewer shows (it holds `hook_name + ".hook_sae_acts_post"`). `examples`:
    `top_activations(sae, store, hook_name)`, with `prompts` (`store.prompts`) to show each example's
    prompt. Give a cache, examples, or both. `features`: the SAE features to show (None: the `top`
    features that fire most strongly in the run, or with the strongest store examples when there is no
    cache). Per feature the chart draws the `curves` positions where it fires most; the `k` positions
    where it fires most are listed, each at the first step it peaks there, with the canvas read at that
    step `context` positions either side.
    """

    hook_name: str
    cache: DenoisingCache | None = None
    examples: FeatureExamples | None = None
    prompts: Sequence[str] | None = None
    features: Sequence[int] | None = None
    top: int = 6
    curves: int = 4
    k: int = 6
    context: int = 3

    def __post_init__(self) -> None:
        if self.cache is None and self.examples is None:
            raise ValueError(
                "a FeaturePanel needs cache= (the feature cache generate_with_sae returns) and/or "
                "examples= (top_activations over a store)"
            )
        if self.cache is not None and not self.cache.recorded_anywhere(self.acts_name):
            raise KeyError(
                f"the cache holds no {self.acts_name!r}; pass the third value generate_with_sae(model, ids, sae, "
                f"{self.hook_name!r}) returns"
            )
        trained_on = None if self.examples is None else self.examples.hook_name
        if trained_on is not None and trained_on != self.hook_name:
            raise ValueError(f"the examples were gathered at {trained_on!r}, not {self.hook_name!r}")
        for name in ("top", "curves", "k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.context < 0:
            raise ValueError(f"context must be >= 0 positions either side, got {self.context}")

    @property
    def acts_name(self) -> str:
        return self.hook_name + SAE_ACTS_SUFFIX


def _round(value: float | torch.Tensor) -> float | None:
    value = float(value)
    return round(value, 4) if value == value and abs(value) != float("inf") else None


def _run_activations(
    panel: FeaturePanel, trace: CanvasTrace, canvas: int, row: int, n_steps: int
) -> tuple[dict[int, torch.Tensor], list[int], int]:
    """Per recorded step (< n_steps): the row's `[pos, d_sae]` activations (NaN at positions not
    recorded); the recorded positions; d_sae."""
    cache = panel.cache
    assert cache is not None
    if canvas not in cache.canvases():
        raise ValueError(f"the feature cache recorded canvases {cache.canvases()}; the viewer shows canvas {canvas}")
    ran, length = trace.input_canvas.shape[0], trace.input_canvas.shape[-1]
    steps = cache.steps(canvas)
    if steps and steps[-1] >= ran:
        raise ValueError(
            f"the feature cache has step {steps[-1]} but the trace ran {ran} steps: record both in the same run"
        )
    per_step: dict[int, torch.Tensor] = {}
    positions: list[int] = []
    d_sae = 0
    for step in steps:
        if step >= n_steps:
            continue
        try:
            value = cache.get(panel.acts_name, canvas=canvas, step=step)
        except KeyError:
            continue  # the SAE was spliced only at some steps
        if not 0 <= row < value.shape[0]:
            raise IndexError(f"row {row} out of range: the feature cache has batch size {value.shape[0]}")
        positions = cache.positions if cache.positions is not None else list(range(value.shape[1]))
        if len(positions) != value.shape[1] or max(positions) >= length:
            raise ValueError(
                f"the feature cache holds {value.shape[1]} positions of a canvas of {length}: record it in the run "
                "the viewer shows"
            )
        full = torch.full((length, value.shape[-1]), float("nan"))
        full[positions] = value[row].detach().float().cpu()
        per_step[step], d_sae = full, value.shape[-1]
    if not per_step:
        raise ValueError(f"the feature cache holds no {panel.acts_name!r} at the steps row {row} ran (< {n_steps})")
    return per_step, positions, d_sae


def _choose(panel: FeaturePanel, run_max: Float[torch.Tensor, " d_sae"] | None, d_sae: int | None) -> list[int]:
    examples = panel.examples
    if panel.features is not None:
        chosen = [int(f) for f in panel.features]
        if d_sae is not None and any(not 0 <= f < d_sae for f in chosen):
            raise IndexError(f"features {chosen} out of range: the SAE has d_sae={d_sae} features")
        if examples is not None:
            missing = [f for f in chosen if f not in examples.features]
            if missing:
                raise ValueError(
                    f"features {missing} are not among the examples' features; run top_activations(..., "
                    f"features={chosen}) or leave features=None there"
                )
        return chosen
    candidates = list(range(d_sae)) if examples is None else list(examples.features)
    if run_max is not None:
        strength = run_max[torch.tensor(candidates)]
        order = strength.argsort(descending=True, stable=True)[: panel.top]
        chosen = [candidates[int(i)] for i in order if float(strength[i]) > 0]
        if not chosen:
            raise ValueError("no SAE feature fires in this run at the recorded steps; pass features=[...]")
        return chosen
    assert examples is not None
    order = examples.values[:, 0].argsort(descending=True, stable=True)[: panel.top]
    return [candidates[int(i)] for i in order]


def feature_panel_data(
    panel: FeaturePanel, trace: CanvasTrace, *, canvas: int, row: int, n_steps: int
) -> tuple[dict[str, Any], set[int]]:
    """The panel's JSON-ready data for one canvas and row of `trace` (its first `n_steps` steps), and the
    token ids whose text the page needs."""
    ids: set[int] = set()
    per_step: dict[int, torch.Tensor] = {}
    run_max = d_sae = None
    if panel.cache is not None:
        per_step, _, d_sae = _run_activations(panel, trace, canvas, row, n_steps)
        run_max = torch.stack([a.nan_to_num(0.0).amax(0) for a in per_step.values()]).amax(0)
    chosen = _choose(panel, run_max, d_sae)
    if panel.examples is not None and panel.prompts is not None:
        used = int(panel.examples.labels["prompt_id"].max()) if panel.examples.labels else -1
        if used >= len(panel.prompts):
            raise ValueError(
                f"the examples name prompt id {used} but prompts has {len(panel.prompts)}: pass store.prompts"
            )
    items = []
    for feature in chosen:
        item: dict[str, Any] = {"feature": feature, "run": None, "store": None}
        if per_step:
            item["run"] = _run_item(panel, trace, row, n_steps, per_step, feature, ids)
        if panel.examples is not None:
            item["store"] = _store_item(panel, feature, ids)
        items.append(item)
    data = {"title": f"SAE features at {panel.hook_name}", "hook": panel.hook_name, "items": items}
    return data, ids


def _run_item(
    panel: FeaturePanel,
    trace: CanvasTrace,
    row: int,
    n_steps: int,
    per_step: dict[int, torch.Tensor],
    feature: int,
    ids: set[int],
) -> dict[str, Any]:
    length = trace.input_canvas.shape[-1]
    acts = torch.full((n_steps, length), float("nan"))
    for step, value in per_step.items():
        acts[step] = value[:, feature]
    filled = acts.nan_to_num(0.0)
    peak = filled.amax(0)  # [pos]
    peak_step = (filled == peak).float().argmax(0)  # the first step at which each position peaks
    firing = [int(p) for p in peak.argsort(descending=True, stable=True) if float(peak[p]) > 0]
    examples = []
    w = panel.context
    for position in firing[: panel.k]:
        step, value = int(peak_step[position]), float(peak[position])
        canvas_read = trace.input_canvas[step, row].tolist()
        context = [canvas_read[p] if 0 <= p < length else None for p in range(position - w, position + w + 1)]
        ids.update(t for t in context if t is not None)
        examples.append({"value": _round(value), "step": step, "position": position, "context": context})
    return {
        "acts": [[_round(v) for v in step] for step in acts.tolist()],
        "max": _round(peak.max()),
        "curve_positions": firing[: panel.curves],
        "n_firing": len(firing),
        "examples": examples,
    }


def _store_item(panel: FeaturePanel, feature: int, ids: set[int]) -> dict[str, Any]:
    examples = panel.examples
    assert examples is not None
    i = examples.features.index(feature)
    rows = []
    for j in range(examples.values.shape[1]):
        if int(examples.rows[i, j]) < 0:
            break
        label = {name: int(v[i, j]) for name, v in examples.labels.items()}
        contexts = {
            name: [None if t < 0 else t for t in examples.context[name][i, j].tolist()] if examples.context else []
            for name in ("input_token", "final_token")
        }
        for context in contexts.values():
            ids.update(t for t in context if t is not None)
        ids.update((label["input_token"], label["final_token"]))
        prompt = None if panel.prompts is None else panel.prompts[label["prompt_id"]]
        rows.append(
            {
                "value": _round(examples.values[i, j]),
                "prompt": prompt,
                **label,
                "context_input": contexts["input_token"],
                "context_final": contexts["final_token"],
            }
        )
    return {
        "mean_by_step": [_round(v) for v in examples.mean_by_step[i].tolist()],
        "fire_rate_by_step": [_round(v) for v in examples.fire_rate_by_step[i].tolist()],
        "context_width": examples.context_width,
        "examples": rows,
    }


FEATURES_HTML = """<section id="features" hidden>
<h2 id="features-title"></h2>
<div id="features-controls"><label for="feature-select">feature</label> <select id="feature-select"></select>
<span id="feature-summary"></span></div>
<svg id="feature-chart" width="420" height="150" role="img" aria-label="activation across steps"></svg>
<div id="feature-legend">activation by step: solid, this run at the positions in the table; dashed, the
store's mean activation on the rows where the feature fires</div>
<table id="feature-steps"></table>
<h3 id="feature-run-head">strongest positions in this run, each at the step it peaks</h3>
<table id="feature-run-examples"></table>
<h3 id="feature-store-head">top examples in the store</h3>
<table id="feature-store-examples"></table>
</section>"""

FEATURES_STYLE = """
#features h2 { font-size: 0.95em; margin: 1.2em 0 0.3em 0; }
#features h3 { font-size: 0.85em; margin: 0.8em 0 0.2em 0; }
#features table { border-collapse: collapse; font-size: 0.75em;
  font-family: ui-monospace, "DejaVu Sans Mono", monospace; }
#features td, #features th { padding: 1px 5px; border: 1px solid #eee; text-align: right; white-space: pre; }
#features th.current, #features td.current { border-left: 2px solid #08519c; border-right: 2px solid #08519c; }
#features tr.run-example { cursor: pointer; }
#feature-legend { color: #555; font-size: 0.75em; margin-bottom: 0.4em; }
#feature-summary { color: #555; font-size: 0.85em; margin-left: 0.6em; }
#features td.ctx-cell, #feature-store-examples td.prompt { text-align: left; }
.ctx-token { padding: 0 1px; border-bottom: 1px dotted #bbb; }
.ctx-token.ctx-center { background: #fdd0a2; font-weight: 700; }
.swatch-line { display: inline-block; width: 1.2em; height: 0.25em; vertical-align: middle; margin-right: 0.3em; }
.feature-act { display: block; height: 3px; width: 100%; background: #e6550d; margin-top: 1px; }
"""

# Runs inside the viewer's script (it uses `data`, `cells`, `el`, `fmt`, `text` and `go` from there).
FEATURES_SCRIPT = """
  var updateFeatures = setupFeatures();
  function setupFeatures() {
    var fd = data.features;
    if (fd === null) { return function () {}; }
    var COLOURS = ["#e6550d", "#3182bd", "#31a354", "#756bb1", "#636363", "#d6616b"];
    var select = document.getElementById("feature-select");
    var chart = document.getElementById("feature-chart");
    var SVG = chart.namespaceURI;
    var marks = cells.map(function (cell) {
      var m = el("span", "feature-act");
      cell.appendChild(m);
      return m;
    });
    document.getElementById("features").hidden = false;
    document.getElementById("features-title").textContent = fd.title;
    fd.items.forEach(function (item, i) {
      var option = el("option", "", "feature " + item.feature +
        (item.run !== null ? " (max " + fmt(item.run.max, 2) + " in this run)" : ""));
      option.value = String(i);
      select.appendChild(option);
    });
    function svg(tag, attrs) {
      var node = document.createElementNS(SVG, tag);
      Object.keys(attrs).forEach(function (k) { node.setAttribute(k, String(attrs[k])); });
      return node;
    }
    function clear(node) { while (node.firstChild) { node.removeChild(node.firstChild); } }
    function tokens(ids, center) {
      var span = el("span", "ctx");
      ids.forEach(function (id, i) {
        var t = el("span", i === center ? "ctx-token ctx-center" : "ctx-token", id === null ? "\\u00b7" : text(id));
        t.dataset.tokenId = id === null ? "" : String(id);
        span.appendChild(t);
      });
      return span;
    }
    function row(table, cls, values) {
      var tr = el("tr", cls);
      values.forEach(function (v) { tr.appendChild(v instanceof Node ? wrap(v) : el("td", "", v)); });
      table.appendChild(tr);
      return tr;
    }
    function wrap(node) { var td = el("td", "ctx-cell"); td.appendChild(node); return td; }
    function whenFiring(store, s) {
      var m = store.mean_by_step[s], r = store.fire_rate_by_step[s];
      return m === null || r === null || r === 0 ? null : m / r;
    }
    function curves(item) {
      var lines = [];
      if (item.run !== null) {
        item.run.curve_positions.forEach(function (p, i) {
          lines.push({label: "position " + p, colour: COLOURS[i % COLOURS.length], position: p,
            values: item.run.acts.map(function (step) { return step[p]; })});
        });
      }
      if (item.store !== null) {
        lines.push({label: "store: mean when firing", colour: "#999", dashed: true, position: null,
          values: item.store.mean_by_step.slice(0, data.n_steps).map(function (_, s) {
            return whenFiring(item.store, s);
          })});
      }
      return lines;
    }
    function drawChart(lines, step) {
      clear(chart);
      var W = 420, H = 150, left = 40, right = 10, top = 10, bottom = 25;
      var n = Math.max(1, data.n_steps - 1), peak = 0;
      lines.forEach(function (l) { l.values.forEach(function (v) { if (v !== null && v > peak) { peak = v; } }); });
      peak = peak > 0 ? peak : 1;
      function x(s) { return left + (W - left - right) * s / n; }
      function y(v) { return H - bottom - (H - top - bottom) * v / peak; }
      chart.appendChild(svg("line", {x1: left, y1: H - bottom, x2: W - right, y2: H - bottom, stroke: "#999"}));
      chart.appendChild(svg("line", {x1: left, y1: top, x2: left, y2: H - bottom, stroke: "#999"}));
      var yMax = svg("text", {x: left - 4, y: top + 8, "text-anchor": "end", "font-size": 10});
      yMax.textContent = fmt(peak, 2);
      chart.appendChild(yMax);
      for (var s = 0; s < data.n_steps; s++) {
        var tick = svg("text", {x: x(s), y: H - bottom + 12, "text-anchor": "middle", "font-size": 9});
        tick.textContent = String(s);
        chart.appendChild(tick);
      }
      var now = svg("line", {x1: x(step), y1: top, x2: x(step), y2: H - bottom, stroke: "#08519c",
        "stroke-dasharray": "3,2", "class": "feature-step-line"});
      chart.appendChild(now);
      lines.forEach(function (l) {
        var points = [];
        l.values.forEach(function (v, s) { if (v !== null) { points.push(x(s) + "," + y(v)); } });
        var line = svg("polyline", {points: points.join(" "), fill: "none", stroke: l.colour, "stroke-width": 2,
          "class": "feature-curve"});
        if (l.dashed) { line.setAttribute("stroke-dasharray", "5,3"); }
        if (l.position !== null) { line.dataset.position = String(l.position); }
        var title = svg("title", {});
        title.textContent = l.label;
        line.appendChild(title);
        chart.appendChild(line);
      });
    }
    function stepTable(item, lines) {
      var table = document.getElementById("feature-steps");
      clear(table);
      var head = el("tr");
      head.appendChild(el("th", "", "step"));
      for (var s = 0; s < data.n_steps; s++) {
        var th = el("th", "step-head", String(s));
        th.dataset.step = String(s);
        head.appendChild(th);
      }
      table.appendChild(head);
      lines.forEach(function (l) {
        if (l.position === null) { return; }
        var tr = el("tr", "curve-row");
        var name = el("td");
        var sw = el("span", "swatch-line");
        sw.style.background = l.colour;
        name.appendChild(sw);
        name.appendChild(document.createTextNode("pos " + l.position + " "));
        name.appendChild(tokens([data.final[l.position]], 0));
        tr.appendChild(name);
        l.values.forEach(function (v, s) {
          var td = el("td", "feature-value", v === null ? "\\u2013" : fmt(v, 2));
          td.dataset.step = String(s);
          td.dataset.position = String(l.position);
          td.dataset.value = v === null ? "" : String(v);
          tr.appendChild(td);
        });
        table.appendChild(tr);
      });
      if (item.store !== null) {
        var firing = item.store.mean_by_step.map(function (_, s) { return whenFiring(item.store, s); });
        [["store, when firing", "feature-store-mean", firing, 2, 1],
         ["store fires (%)", "feature-store-rate", item.store.fire_rate_by_step, 1, 100]].forEach(function (spec) {
          var tr = el("tr", "store-row");
          tr.appendChild(el("td", "", spec[0]));
          for (var s = 0; s < data.n_steps; s++) {
            var v = s < spec[2].length ? spec[2][s] : null;
            var td = el("td", spec[1], v === null ? "\\u2013" : fmt(v * spec[4], spec[3]));
            td.dataset.step = String(s);
            td.dataset.value = v === null ? "" : String(v);
            tr.appendChild(td);
          }
          table.appendChild(tr);
        });
      }
    }
    function exampleTables(item) {
      var runTable = document.getElementById("feature-run-examples");
      var storeTable = document.getElementById("feature-store-examples");
      clear(runTable);
      clear(storeTable);
      document.getElementById("feature-run-head").hidden = item.run === null;
      document.getElementById("feature-store-head").hidden = item.store === null;
      if (item.run !== null) {
        row(runTable, "", ["activation", "step", "position", "canvas read"]).classList.add("head");
        item.run.examples.forEach(function (ex) {
          var tr = row(runTable, "run-example", [fmt(ex.value, 3), String(ex.step), String(ex.position),
            tokens(ex.context, (ex.context.length - 1) / 2)]);
          tr.dataset.step = String(ex.step);
          tr.dataset.position = String(ex.position);
          tr.dataset.value = String(ex.value);
          tr.title = "click to show step " + ex.step;
          tr.addEventListener("click", function () { go(ex.step); });
        });
      }
      if (item.store !== null) {
        var w = item.store.context_width;
        row(storeTable, "", ["activation", "prompt", "seed", "step", "position", "read", "final"])
          .classList.add("head");
        item.store.examples.forEach(function (ex) {
          var read = ex.context_input.length ? tokens(ex.context_input, w) : tokens([ex.input_token], 0);
          var fin = ex.context_final.length ? tokens(ex.context_final, w) : tokens([ex.final_token], 0);
          var tr = row(storeTable, "store-example", [fmt(ex.value, 3),
            ex.prompt === null ? "prompt " + ex.prompt_id : ex.prompt, String(ex.seed), String(ex.step),
            String(ex.position), read, fin]);
          tr.children[1].className = "prompt";
          tr.dataset.promptId = String(ex.prompt_id);
          tr.dataset.step = String(ex.step);
          tr.dataset.position = String(ex.position);
          tr.dataset.value = String(ex.value);
        });
      }
    }
    var item = null, lines = [];
    function choose() {
      item = fd.items[Number(select.value)];
      lines = curves(item);
      var summary = "feature " + item.feature;
      if (item.run !== null) {
        summary += ": fires at " + item.run.n_firing + " of " + data.length + " positions in this run (max " +
          fmt(item.run.max, 3) + ")";
      }
      document.getElementById("feature-summary").textContent = summary;
      stepTable(item, lines);
      exampleTables(item);
    }
    select.addEventListener("change", function () { choose(); render(); });
    choose();
    return function (step) {
      drawChart(lines, step);
      Array.prototype.forEach.call(document.querySelectorAll("#feature-steps [data-step]"), function (node) {
        node.classList.toggle("current", Number(node.dataset.step) === step);
      });
      var acts = item.run === null ? null : item.run.acts[step];
      var peak = item.run === null || !item.run.max ? 1 : item.run.max;
      marks.forEach(function (m, p) {
        var v = acts === null ? null : acts[p];
        m.dataset.value = v === null ? "" : String(v);
        m.style.opacity = v === null || v <= 0 ? "0" : String(Math.max(0.15, Math.min(1, v / peak)));
        m.title = v === null ? "" : "feature " + item.feature + ": " + fmt(v, 3);
      });
    };
  }
"""
