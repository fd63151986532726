
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("@DATA_ID@").textContent);
  var tooltip = document.getElementById("tooltip");

  function el(tag, cls, content) {
    var node = document.createElement(tag);
    if (cls) { node.className = cls; }
    if (content !== undefined) { node.textContent = content; }
    return node;
  }
  function clear(node) { while (node.firstChild) { node.removeChild(node.firstChild); } }
  function showTooltipBelow(target) {
    var r = target.getBoundingClientRect();
    tooltip.style.left = Math.max(0, r.left + window.scrollX) + "px";
    tooltip.style.top = (r.bottom + window.scrollY + 4) + "px";
    tooltip.hidden = false;
  }
