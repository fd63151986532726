  var slider = document.getElementById("step-slider");
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
