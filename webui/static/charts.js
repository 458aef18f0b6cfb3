// Live charts of the extended counters' per-second rates: polls the JSON API
// every second and draws one SVG line chart per counter. No libraries.
(function () {
  "use strict";
  var SVG = "http://www.w3.org/2000/svg";
  var KEEP = 120;          // samples kept (2 minutes at 1 per second)
  var W = 340, H = 110, PAD = 18;
  var box = document.getElementById("ext-charts");
  if (!box || box.dataset.available !== "yes") { return; }
  var src = box.dataset.src;
  var charts = {};

  function el(name, attrs, parent) {
    var e = document.createElementNS(SVG, name);
    Object.keys(attrs).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    if (parent) { parent.appendChild(e); }
    return e;
  }

  function fmt(v) {
    if (v >= 1e9) { return (v / 1e9).toFixed(1) + "G"; }
    if (v >= 1e6) { return (v / 1e6).toFixed(1) + "M"; }
    if (v >= 1e4) { return (v / 1e3).toFixed(1) + "K"; }
    return (Math.round(v * 10) / 10).toString();
  }

  function chart(name) {
    if (charts[name]) { return charts[name]; }
    var div = document.createElement("div");
    div.className = "chart";
    div.dataset.counter = name;
    var h = document.createElement("h3");
    var now = document.createElement("span");
    now.className = "now";
    h.textContent = name + " /s";
    h.appendChild(now);
    div.appendChild(h);
    var svg = el("svg", {viewBox: "0 0 " + W + " " + H, preserveAspectRatio: "none",
                         role: "img", "aria-label": name + " per second"}, div);
    el("line", {x1: PAD, y1: H - PAD, x2: W, y2: H - PAD, "class": "axis"}, svg);
    var max = el("text", {x: 0, y: 10, "class": "label"}, svg);
    var area = el("path", {"class": "area", d: ""}, svg);
    var line = el("path", {"class": "line", d: ""}, svg);
    box.appendChild(div);
    charts[name] = {data: [], line: line, area: area, max: max, now: now};
    return charts[name];
  }

  function draw(c) {
    var top = Math.max.apply(null, c.data.concat([1]));
    var step = (W - PAD) / (KEEP - 1);
    var x0 = W - step * (c.data.length - 1);
    var pts = c.data.map(function (v, i) {
      var y = (H - PAD) - (v / top) * (H - PAD - 12);
      return (x0 + i * step).toFixed(1) + "," + y.toFixed(1);
    });
    if (!pts.length) { return; }
    c.line.setAttribute("d", "M" + pts.join(" L"));
    c.area.setAttribute("d", "M" + x0.toFixed(1) + "," + (H - PAD) + " L" + pts.join(" L") +
                        " L" + W + "," + (H - PAD) + " Z");
    c.max.textContent = fmt(top);
    c.now.textContent = fmt(c.data[c.data.length - 1]);
  }

  function updateTable(totals, rates) {
    Object.keys(totals).forEach(function (name) {
      var row = document.querySelector('#ext-totals tr[data-counter="' + name + '"]');
      if (!row) { return; }
      row.querySelector(".total").textContent = totals[name];
      row.querySelector(".rate").textContent = fmt(rates[name] || 0);
    });
  }

  function tick() {
    fetch(src, {credentials: "same-origin", headers: {"Accept": "application/json"}})
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (d) {
        if (!d || !d.available) { return; }
        Object.keys(d.rates).sort(function (a, b) {
          // SYN-proxy counters first, then the rest alphabetically
          var sa = a.indexOf("synproxy") === 0 ? 0 : 1, sb = b.indexOf("synproxy") === 0 ? 0 : 1;
          return sa - sb || (a < b ? -1 : a > b ? 1 : 0);
        }).forEach(function (name) {
          var c = chart(name);
          c.data.push(d.rates[name]);
          if (c.data.length > KEEP) { c.data.shift(); }
          draw(c);
        });
        updateTable(d.totals, d.rates);
        box.dataset.samples = String((Number(box.dataset.samples) || 0) + 1);
      })
      .catch(function () { /* keep the last picture; try again next second */ });
  }

  tick();
  window.setInterval(tick, 1000);
}());
