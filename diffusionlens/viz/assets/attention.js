  var layerSelect = document.getElementById("layer-select");
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
