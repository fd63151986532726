  var SVG_NS = "http://www.w3.org/2000/svg";
  var SLOT = 14, GAP = 12, LEFT = 34, TOP = 24, LABEL_BAND = 46, POSITIVE = "#2b6cb0", NEGATIVE = "#c53030";
  var nodes = data.nodes, links = data.links;
  var wrap = document.getElementById("graph-wrap");
  var details = document.getElementById("details");
  var thresholdInput = document.getElementById("threshold");
  var selected = null;

  function svgEl(tag, cls, attrs) {
    var node = document.createElementNS(SVG_NS, tag);
    if (cls) { node.setAttribute("class", cls); }
    Object.keys(attrs || {}).forEach(function (name) { node.setAttribute(name, String(attrs[name])); });
    return node;
  }
  function fmt(x, digits) { return x === null || x === undefined ? "–" : Number(x).toFixed(digits); }
  function quoted(text) { return JSON.stringify(text); }
  function title(n) {
    var at = " @ step " + n.step + " pos " + n.position;
    if (n.kind === "feature") { return "feature " + n.feature + " L" + n.layer + at; }
    if (n.kind === "error") { return "error L" + n.layer + at; }
    if (n.kind === "token") { return "canvas token " + quoted(n.text) + at; }
    if (n.kind === "prompt") { return "prompt token " + quoted(n.text) + " @ pos " + n.position; }
    return "target " + data.target + at;
  }
  function columnKey(n) { return n.kind === "logit" ? "target" : String(n.step); }

  // ------------------------------------------------------------------ layout: columns, rows, slots
  var columns = [];
  if (data.prompt_length > 0) { columns.push({ key: "-1", label: "prompt", slots: data.prompt_length }); }
  for (var s = 0; s < data.n_steps; s++) { columns.push({ key: String(s), label: "step " + s, slots: data.canvas_length }); }
  columns.push({ key: "target", label: "target", slots: 1 });
  var columnOf = {}, x = LEFT;
  columns.forEach(function (c, i) {
    // at least wide enough for its heading; positions spread evenly over the width
    c.x = x; c.width = Math.max(c.slots * SLOT, 52); c.index = i; columnOf[c.key] = c; x += c.width + GAP;
  });
  var width = x;

  var groups = {}, stackOf = {};
  nodes.forEach(function (n, i) {
    var key = columnKey(n) + "|" + n.layer + "|" + n.position;
    (groups[key] = groups[key] || []).push(i);
  });
  var maxStack = {};
  Object.keys(groups).forEach(function (key) {
    var members = groups[key];
    members.sort(function (a, b) {
      var ea = nodes[a].kind === "error", eb = nodes[b].kind === "error";
      return ea === eb ? (nodes[a].feature || 0) - (nodes[b].feature || 0) : (ea ? 1 : -1);
    });
    members.forEach(function (i, k) { stackOf[i] = [k, members.length]; });
    var layer = nodes[members[0]].layer;
    maxStack[layer] = Math.max(maxStack[layer] || 0, members.length);
  });
  // rows bottom to top: the tokens (E, layer -1), the layers, the target (layer n_layers)
  var rows = [], y = TOP;
  for (var l = data.n_layers; l >= -1; l--) {
    var rowHeight = Math.min(220, Math.max(26, 9 * (maxStack[l] || 1) + 8));
    rows.push({ layer: l, y: y, height: rowHeight });
    y += rowHeight;
  }
  var rowOf = {};
  rows.forEach(function (r) { rowOf[r.layer] = r; });
  var height = y + LABEL_BAND;

  nodes.forEach(function (n, i) {
    var c = columnOf[columnKey(n)], r = rowOf[n.layer], slot = n.kind === "logit" ? 0 : n.position;
    var stack = stackOf[i], spacing = (r.height - 8) / stack[1];
    n.x = c.x + (slot + 0.5) * c.width / c.slots;
    n.y = r.y + 4 + spacing * (stack[0] + 0.5);
    n.incoming = []; n.outgoing = [];
  });
  var maxAbs = 0;
  links.forEach(function (link, j) {
    maxAbs = Math.max(maxAbs, Math.abs(link[2] || 0));
    nodes[link[0]].outgoing.push(j);
    nodes[link[1]].incoming.push(j);
  });
  function byStrength(a, b) { return Math.abs(links[b][2] || 0) - Math.abs(links[a][2] || 0); }
  nodes.forEach(function (n) { n.incoming.sort(byStrength); n.outgoing.sort(byStrength); });

  // ------------------------------------------------------------------ drawing
  var svg = svgEl("svg", "", { id: "graph", width: width, height: height, viewBox: "0 0 " + width + " " + height });
  var columnLayer = svgEl("g", "columns"), linkLayer = svgEl("g", "links"), nodeLayer = svgEl("g", "nodes");
  svg.appendChild(columnLayer); svg.appendChild(linkLayer); svg.appendChild(nodeLayer);
  columns.forEach(function (c) {
    var g = svgEl("g", "column", { "data-step": c.key });
    g.appendChild(svgEl("rect", "column-band" + (c.index % 2 ? " odd" : ""), {
      x: c.x - 2, y: TOP, width: c.width + 4, height: y - TOP
    }));
    var label = svgEl("text", "column-label", { x: c.x, y: TOP - 8 });
    label.textContent = c.label;
    g.appendChild(label);
    columnLayer.appendChild(g);
  });
  rows.forEach(function (r) {
    columnLayer.appendChild(svgEl("line", "row-rule", { x1: LEFT - 4, x2: width, y1: r.y + r.height, y2: r.y + r.height }));
    var label = svgEl("text", "row-label", { x: 2, y: r.y + r.height / 2 + 3, "data-layer": r.layer });
    label.textContent = r.layer === -1 ? "E" : r.layer === data.n_layers ? "logit" : "L" + r.layer;
    columnLayer.appendChild(label);
  });

  var linkElements = links.map(function (link, j) {
    var a = nodes[link[0]], b = nodes[link[1]], w = link[2] || 0, strength = maxAbs > 0 ? Math.abs(w) / maxAbs : 0;
    var mid = (a.x + b.x) / 2;
    var d = a.x === b.x ? "M" + a.x + "," + a.y + " L" + b.x + "," + b.y
      : "M" + a.x + "," + a.y + " C" + mid + "," + a.y + " " + mid + "," + b.y + " " + b.x + "," + b.y;
    var path = svgEl("path", "link", {
      d: d, stroke: w >= 0 ? POSITIVE : NEGATIVE, "stroke-width": (0.4 + 3.6 * strength).toFixed(2),
      "stroke-opacity": (0.15 + 0.75 * strength).toFixed(3), "data-link": j, "data-source": link[0],
      "data-target": link[1], "data-weight": w
    });
    linkLayer.appendChild(path);
    return path;
  });

  var nodeElements = nodes.map(function (n, i) {
    var shape;
    if (n.kind === "feature") {
      shape = svgEl("circle", "", { cx: n.x, cy: n.y, r: 4.5 });
    } else if (n.kind === "error") {
      shape = svgEl("rect", "", { x: n.x - 3.5, y: n.y - 3.5, width: 7, height: 7,
        transform: "rotate(45 " + n.x + " " + n.y + ")" });
    } else {
      var half = n.kind === "logit" ? 6 : 5;
      shape = svgEl("rect", "", { x: n.x - half, y: n.y - half, width: 2 * half, height: 2 * half, rx: 1.5 });
    }
    shape.setAttribute("class", "node kind-" + n.kind);
    [["node", i], ["kind", n.kind], ["step", n.step], ["layer", n.layer], ["position", n.position]].forEach(
      function (pair) { shape.setAttribute("data-" + pair[0], String(pair[1])); });
    shape.addEventListener("mouseenter", function () { showTip(shape, n); });
    shape.addEventListener("mouseleave", function () { tooltip.hidden = true; });
    shape.addEventListener("click", function (event) { event.stopPropagation(); select(i); });
    nodeLayer.appendChild(shape);
    if (n.text !== null) {
      var label = svgEl("text", "token-label", {
        x: n.x + 3, y: y + 4, transform: "rotate(90 " + (n.x + 3) + " " + (y + 4) + ")", "data-node": i
      });
      if (n.kind === "logit") { label.setAttribute("y", n.y + 16); label.removeAttribute("transform"); }
      label.textContent = n.text.length > 6 ? n.text.slice(0, 5) + "…" : n.text;
      nodeLayer.appendChild(label);
    }
    return shape;
  });
  svg.addEventListener("click", function () { select(null); });
  wrap.appendChild(svg);

  // ------------------------------------------------------------------ interaction
  function showTip(target, n) {
    clear(tooltip);
    tooltip.appendChild(el("div", "tip-line", title(n)));
    if (n.activation !== null) { tooltip.appendChild(el("div", "tip-line", "activation " + fmt(n.activation, 4))); }
    tooltip.appendChild(el("div", "tip-line", n.incoming.length + " in, " + n.outgoing.length + " out"));
    showTooltipBelow(target);
  }

  function linkList(heading, list, end) {
    details.appendChild(el("h3", "", heading + " (" + Math.min(list.length, data.top_links) + " of " + list.length + ")"));
    var box = el("div", "link-list");
    box.dataset.direction = end === 0 ? "incoming" : "outgoing";
    list.slice(0, data.top_links).forEach(function (j) {
      var other = links[j][end], w = links[j][2] || 0;
      var row = el("div", "link-row");
      row.dataset.node = String(other);
      row.dataset.weight = String(w);
      row.appendChild(el("span", "weight " + (w >= 0 ? "positive" : "negative"), (w >= 0 ? "+" : "") + fmt(w, 4)));
      row.appendChild(el("span", "other", title(nodes[other])));
      row.addEventListener("click", function () { select(other); });
      box.appendChild(row);
    });
    details.appendChild(box);
  }

  function select(i) {
    selected = i;
    nodeElements.forEach(function (e) { e.classList.remove("selected"); e.classList.remove("linked"); });
    linkElements.forEach(function (e) { e.classList.remove("active"); });
    clear(details);
    if (i === null) {
      svg.classList.remove("has-selection");
      delete details.dataset.node;
      details.appendChild(el("p", "hint", "Click a node to see its links."));
      return;
    }
    var n = nodes[i];
    svg.classList.add("has-selection");
    nodeElements[i].classList.add("selected");
    n.incoming.concat(n.outgoing).forEach(function (j) {
      linkElements[j].classList.add("active");
      nodeElements[links[j][0]].classList.add("linked");
      nodeElements[links[j][1]].classList.add("linked");
    });
    nodeElements[i].classList.remove("linked");
    details.dataset.node = String(i);
    details.appendChild(el("h2", "", title(n)));
    var lines = [
      ["kind", n.kind], ["step", n.kind === "prompt" ? "– (the prompt precedes every step)" : String(n.step)],
      ["layer", n.layer === -1 ? "– (embedding)" : n.kind === "logit" ? "– (logit)" : String(n.layer)],
      ["position", String(n.position) + (n.kind === "prompt" ? " (prompt)" : " (canvas)")],
      ["feature", n.feature === null ? "–" : String(n.feature)],
      ["token", n.text === null ? "–" : quoted(n.text) + " (id " + n.token + ")"],
      ["activation", fmt(n.activation, 6)], ["influence", fmt(n.influence, 4)], ["id", n.id]
    ];
    lines.forEach(function (pair) {
      var line = el("div", "detail-line", pair[0] + ": " + pair[1]);
      line.dataset.field = pair[0];
      details.appendChild(line);
    });
    linkList("strongest incoming", n.incoming, 0);
    linkList("strongest outgoing", n.outgoing, 1);
  }

  function applyThreshold() {
    var fraction = Number(thresholdInput.value), cut = fraction * maxAbs, shown = 0;
    linkElements.forEach(function (e, j) {
      var hide = Math.abs(links[j][2] || 0) < cut;
      e.classList.toggle("hidden", hide);
      if (!hide) { shown += 1; }
    });
    document.getElementById("threshold-label").textContent = fraction.toFixed(2) + " × max |weight| = " + cut.toPrecision(3);
    var count = document.getElementById("link-count");
    count.textContent = shown + " of " + links.length + " links shown";
    count.dataset.shown = String(shown);
  }
  thresholdInput.addEventListener("input", applyThreshold);
  thresholdInput.addEventListener("change", applyThreshold);

  var counts = {};
  nodes.forEach(function (n) { counts[n.kind] = (counts[n.kind] || 0) + 1; });
  document.getElementById("meta").textContent = (data.prompt ? "prompt " + quoted(data.prompt) + " · " : "") +
    data.n_steps + " steps, " + data.n_layers + " layers · nodes: " + Object.keys(counts).map(function (k) {
      return counts[k] + " " + k;
    }).join(", ") + " · " + links.length + " links";
  applyThreshold();
