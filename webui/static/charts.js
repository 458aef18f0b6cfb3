// Live charts, polled from the JSON API every second and drawn as SVG line charts.
// No libraries, no inline script or style (the console's CSP allows neither):
// colours come from style.css classes.
//  - The attack view (#attack, /api/attack): per SYN-proxy service one chart of
//    SYNs, cookies, valid ACKs and proxied connections per second, its "under
//    flood" badge and its drops by reason.
//  - All extended counters (#ext-charts, /api/ext-stats): one chart per counter.
//  - The XDP fast path (#xdp, /api/xdp): per interface, its mode and counters
//    with their per-second rates (tables, redrawn each second).
// Y axes run from 0 to a round top in steps of 1, 2 or 5 x 10^n, labelled with
// K/M/G and "/s"; the x axis is the last 2 minutes.
(function () {
  "use strict";
  var SVG = "http://www.w3.org/2000/svg";
  var KEEP = 120;          // samples kept (2 minutes at 1 per second)
  var W = 360, H = 130;    // viewBox; the plot leaves room for the axis labels
  var LEFT = 44, RIGHT = 6, TOP = 8, BOTTOM = 16;
  var TICKS = 4;           // about this many steps up the y axis
  // The attack view's lines, in legend order: keys of /api/attack's "rates".
  var ATTACK = [["syns", "SYNs"], ["cookies", "cookies sent"], ["valid_acks", "valid ACKs"],
                ["proxied", "connections proxied"]];
  var box = document.getElementById("ext-charts");
  var charts = {};

  function el(name, attrs, parent) {
    var e = document.createElementNS(SVG, name);
    Object.keys(attrs).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    if (parent) { parent.appendChild(e); }
    return e;
  }

  // At most 3 significant digits, no trailing zeros: 1234.5 -> "1235", 12.34 -> "12.3".
  function trim(x) {
    var a = Math.abs(x);
    return String(Number(x.toFixed(a >= 100 ? 0 : a >= 10 ? 1 : 2)));
  }

  // A number for people: 950, 1.5K, 12.3K, 2M.
  function fmt(v) {
    var units = [[1e9, "G"], [1e6, "M"], [1e3, "K"]];
    for (var i = 0; i < units.length; i++) {
      if (Math.abs(v) >= units[i][0]) { return trim(v / units[i][0]) + units[i][1]; }
    }
    return trim(v);
  }

  // The y axis for data up to max: 0 to a round top in about TICKS steps of
  // 1, 2 or 5 x 10^n (never a top such as 3.1); at least 0-1/s.
  function niceScale(max) {
    max = max > 1 ? max : 1;
    var raw = max / TICKS;
    var mag = Math.pow(10, Math.floor(Math.log(raw) / Math.LN10));
    var n = raw / mag;
    var step = (n <= 1 ? 1 : n <= 2 ? 2 : n <= 5 ? 5 : 10) * mag;
    var top = Math.ceil(max / step - 1e-9) * step;
    var ticks = [];
    for (var i = 0; i * step <= top + step / 2; i++) { ticks.push(i * step); }
    return {top: top, ticks: ticks};
  }

  // An SVG chart in parent: gridlines with y labels, x labels, one line per series
  // ({key, area}); series i is drawn with CSS class "s<i>".
  function makeChart(parent, series, label) {
    var svg = el("svg", {viewBox: "0 0 " + W + " " + H, role: "img", "aria-label": label},
                 parent);
    var c = {svg: svg, grid: el("g", {"class": "grid"}, svg), series: []};
    [["-2 min", LEFT, ""], ["-1 min", (LEFT + W - RIGHT) / 2, " middle"],
     ["now", W - RIGHT, " end"]].forEach(function (x) {
      el("text", {x: x[1], y: H - 3, "class": "label" + x[2]}, svg).textContent = x[0];
    });
    series.forEach(function (s, i) {
      c.series.push({key: s.key, data: [],
                     area: s.area ? el("path", {"class": "area s" + i, d: ""}, svg) : null,
                     line: el("path", {"class": "line s" + i, d: ""}, svg)});
    });
    return c;
  }

  function push(c, values) {
    c.series.forEach(function (s) {
      s.data.push(Number(values[s.key]) || 0);
      if (s.data.length > KEEP) { s.data.shift(); }
    });
    draw(c);
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
    box.appendChild(div);
    charts[name] = makeChart(div, [{key: name, area: true}], name + " per second");
    charts[name].now = now;
    return charts[name];
  }

  function draw(c) {
    var max = 0;
    c.series.forEach(function (s) {
      s.data.forEach(function (v) { if (v > max) { max = v; } });
    });
    var sc = niceScale(max);
    var x1 = W - RIGHT, y0 = H - BOTTOM, ph = y0 - TOP, step = (x1 - LEFT) / (KEEP - 1);
    while (c.grid.firstChild) { c.grid.removeChild(c.grid.firstChild); }
    sc.ticks.forEach(function (t) {
      var y = y0 - (t / sc.top) * ph;
      el("line", {x1: LEFT, y1: y.toFixed(1), x2: x1, y2: y.toFixed(1),
                  "class": t === 0 ? "axis" : "tick"}, c.grid);
      el("text", {x: LEFT - 4, y: (y + 3.5).toFixed(1), "class": "label end"},
         c.grid).textContent = fmt(t) + "/s";
    });
    c.series.forEach(function (s) {
      if (!s.data.length) { return; }
      var x0 = x1 - step * (s.data.length - 1);
      var pts = s.data.map(function (v, i) {
        return (x0 + i * step).toFixed(1) + "," + (y0 - (v / sc.top) * ph).toFixed(1);
      });
      s.line.setAttribute("d", "M" + pts.join(" L"));
      if (s.area) {
        s.area.setAttribute("d", "M" + x0.toFixed(1) + "," + y0 + " L" + pts.join(" L") +
                            " L" + x1 + "," + y0 + " Z");
      }
    });
  }

  function updateTable(totals, rates) {
    Object.keys(totals).forEach(function (name) {
      var row = document.querySelector('#ext-totals tr[data-counter="' + name + '"]');
      if (!row) { return; }
      row.querySelector(".total").textContent = totals[name];
      row.querySelector(".rate").textContent = fmt(rates[name] || 0);
    });
  }

  function getJSON(src) {
    return fetch(src, {credentials: "same-origin", headers: {"Accept": "application/json"}})
      .then(function (r) { return r.ok ? r.json() : null; });
  }

  function tick() {
    getJSON(box.dataset.src)
      .then(function (d) {
        if (!d || !d.available) { return; }
        Object.keys(d.rates).sort(function (a, b) {
          // SYN-proxy counters first, then the rest alphabetically
          var sa = a.indexOf("synproxy") === 0 ? 0 : 1, sb = b.indexOf("synproxy") === 0 ? 0 : 1;
          return sa - sb || (a < b ? -1 : a > b ? 1 : 0);
        }).forEach(function (name) {
          var c = chart(name);
          push(c, d.rates);
          c.now.textContent = fmt(d.rates[name]) + "/s";
        });
        updateTable(d.totals, d.rates);
        box.dataset.samples = String((Number(box.dataset.samples) || 0) + 1);
      })
      .catch(function () { /* keep the last picture; try again next second */ });
  }

  // ---- the attack view

  var attack = document.getElementById("attack");
  var cards = {};

  function tag(name, cls, text, parent) {
    var e = document.createElement(name);
    if (cls) { e.className = cls; }
    if (text !== undefined) { e.textContent = text; }
    if (parent) { parent.appendChild(e); }
    return e;
  }

  // A service's card as the page renders it (for services that appear later).
  function newCard(s) {
    var div = tag("div", "vip-card", undefined, document.getElementById("attack-cards"));
    div.dataset.service = s.id;
    div.dataset.vip = s.vip || "";
    var h = tag("h3", "", s.name + " ", div);
    var badge = tag("span", "badge", "calm", h);
    badge.dataset.service = s.id;
    badge.dataset.vip = s.vip || "";
    badge.dataset.state = "calm";
    tag("div", "multi-chart", undefined, div).dataset.service = s.id;
    var table = tag("table", "grid drops", undefined, div);
    table.dataset.service = s.id;
    var tr = tag("tr", "", undefined, tag("thead", "", undefined, table));
    ["Drop reason", "Total", "Per second"].forEach(function (t) { tag("th", "", t, tr); });
    tag("tbody", "", undefined, table);
    return div;
  }

  function card(s) {
    if (cards[s.id]) { return cards[s.id]; }
    var div = attack.querySelector('.vip-card[data-service="' + s.id + '"]') || newCard(s);
    var holder = div.querySelector(".multi-chart");
    var c = makeChart(holder, ATTACK.map(function (a) { return {key: a[0]}; }),
                      s.name + ": SYNs, cookies sent, valid ACKs and connections proxied " +
                      "per second");
    var legend = tag("ul", "legend", undefined, holder);
    c.now = {};
    ATTACK.forEach(function (a, i) {
      var li = tag("li", "", undefined, legend);
      tag("span", "swatch s" + i, undefined, li);
      tag("span", "", a[1] + " ", li);
      c.now[a[0]] = tag("span", "now", "", li);
    });
    cards[s.id] = {div: div, chart: c, badge: div.querySelector(".badge"),
                   drops: div.querySelector("table.drops tbody")};
    return cards[s.id];
  }

  function showDrops(tbody, drops) {
    var reasons = Object.keys(drops).filter(function (r) { return drops[r].total > 0; });
    reasons.sort(function (a, b) {
      return drops[b].rate - drops[a].rate || drops[b].total - drops[a].total || (a < b ? -1 : 1);
    });
    while (tbody.firstChild) { tbody.removeChild(tbody.firstChild); }
    reasons.forEach(function (r) {
      var tr = tag("tr", "", undefined, tbody);
      tr.dataset.reason = r;
      tag("td", "", r, tr);
      tag("td", "num total", String(drops[r].total), tr);
      tag("td", "num rate", fmt(drops[r].rate) + "/s", tr);
    });
    if (!reasons.length) {
      tag("td", "", "no drops", tag("tr", "none", undefined, tbody)).colSpan = 3;
    }
  }

  function showService(s) {
    var c = card(s);
    push(c.chart, s.rates);
    ATTACK.forEach(function (a) { c.chart.now[a[0]].textContent = fmt(s.rates[a[0]]) + "/s"; });
    var state = s.under_flood ? "flood" : "calm";
    c.badge.dataset.state = state;
    c.badge.textContent = s.under_flood ? "under flood" : "calm";
    c.badge.title = s.under_flood ? (s.clears_in_s === null ? "flooded now" :
                                     "clears in " + s.clears_in_s + " s unless flooded again") :
      "valid ACKs per cookie: " + (s.valid_ack_ratio === null ? "-" : s.valid_ack_ratio);
    c.div.dataset.state = state;
    showDrops(c.drops, s.drops);
  }

  function tickAttack() {
    getJSON(attack.dataset.src)
      .then(function (d) {
        if (!d) { return; }
        var seen = {};
        d.services.forEach(function (s) { seen[s.id] = true; showService(s); });
        Array.prototype.forEach.call(attack.querySelectorAll(".vip-card"), function (div) {
          if (!seen[div.dataset.service]) {
            div.parentNode.removeChild(div);
            delete cards[div.dataset.service];
          }
        });
        document.getElementById("attack-none").hidden = d.services.length > 0;
        attack.dataset.samples = String((Number(attack.dataset.samples) || 0) + 1);
      })
      .catch(function () { /* keep the last picture; try again next second */ });
  }

  // ---- the XDP fast path

  var xdp = document.getElementById("xdp");

  function xdpTable(d, parent) {
    var table = tag("table", "grid xdp", undefined, parent);
    table.dataset.device = d.device;
    tag("caption", "", d.device + " (" + (d.mode || "not attached") + ")", table);
    var tr = tag("tr", "", undefined, tag("thead", "", undefined, table));
    ["Counter", "Total", "Per second"].forEach(function (t) { tag("th", "", t, tr); });
    var tbody = tag("tbody", "", undefined, table);
    Object.keys(d.counters).forEach(function (name) {
      var row = tag("tr", "", undefined, tbody);
      row.dataset.counter = name;
      tag("td", "", name, row);
      tag("td", "num total", String(d.counters[name]), row);
      tag("td", "num rate", fmt(d.rates[name] || 0) + "/s", row);
    });
  }

  function tickXdp() {
    getJSON(xdp.dataset.src)
      .then(function (d) {
        if (!d) { return; }
        var holder = document.getElementById("xdp-devices");
        while (holder.firstChild) { holder.removeChild(holder.firstChild); }
        d.devices.forEach(function (dev) { xdpTable(dev, holder); });
        document.getElementById("xdp-none").hidden = d.devices.length > 0;
        xdp.dataset.samples = String((Number(xdp.dataset.samples) || 0) + 1);
      })
      .catch(function () { /* keep the last picture; try again next second */ });
  }

  if (xdp) {
    tickXdp();
    window.setInterval(tickXdp, 1000);
  }
  if (attack) {
    tickAttack();
    window.setInterval(tickAttack, 1000);
  }
  if (box && box.dataset.available === "yes") {
    tick();
    window.setInterval(tick, 1000);
  }
}());
