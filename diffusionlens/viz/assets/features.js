
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
        var t = el("span", i === center ? "ctx-token ctx-center" : "ctx-token", id === null ? "\u00b7" : text(id));
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
          var td = el("td", "feature-value", v === null ? "\u2013" : fmt(v, 2));
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
            var td = el("td", spec[1], v === null ? "\u2013" : fmt(v * spec[4], spec[3]));
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
