"""The run report's page (``ubc.scoring.report``): a Jinja2 template with its CSS and JS
inline, so the page needs no other host and works from ``file://``. The table is built in
the browser from the JSON the page carries (one row per case), one page of rows at a
time, which keeps a 10,000-case page small and quick and lets it sort, filter and search
without a reload."""

# ruff: noqa: E501 (the lines of a page template are HTML and JS, wrapped as they read best)

from __future__ import annotations

__all__ = ["PAGE"]

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>UBC run report: {{ data.run.cases }} cases</title>
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#1d232a;background:#f4f6f8}
header{background:#1d3557;color:#fff;padding:14px 20px}
header h1{margin:0;font-size:20px}
.banner{background:#ffe8a3;color:#5a4300;padding:8px 20px;font-weight:600}
main{padding:12px 20px}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:6px 0 14px}
.card{background:#fff;border-radius:6px;padding:8px 12px;box-shadow:0 1px 2px #0002}
.card b{display:block;font-size:20px}
.ok b{color:#2a7d2e}.no_lesion b{color:#5c6b7a}.error b{color:#b3261e}
.plots{display:flex;flex-wrap:wrap;gap:10px}
.plot{background:#fff;border-radius:6px;width:360px;height:150px;box-shadow:0 1px 2px #0002}
.plot rect{fill:#457b9d}.plot text{font-size:10px;fill:#333}.plot .t{font-size:12px;font-weight:600}
.plot .l{text-anchor:middle}.plot .l1{text-anchor:end}
.controls{margin:14px 0 8px;display:flex;flex-wrap:wrap;gap:10px;align-items:center}
table{border-collapse:collapse;background:#fff;width:100%;box-shadow:0 1px 2px #0002;table-layout:fixed}
th,td{padding:5px 8px;border-bottom:1px solid #e3e7eb;text-align:left;vertical-align:top}
th[data-sort]{cursor:pointer;user-select:none;background:#e9eef3;position:sticky;top:0}
th[aria-sort=ascending]::after{content:" \\25B2"}th[aria-sort=descending]::after{content:" \\25BC"}
td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.error td.status{color:#b3261e;font-weight:600}tr.no_lesion td.status{color:#5c6b7a}
td.pic img{height:110px;max-width:100%;object-fit:contain;object-position:left;cursor:zoom-in;background:#000}
td{overflow-wrap:anywhere}
.why{color:#6b7785;font-style:italic;max-width:260px}
.flag{display:inline-block;background:#eef2f6;border-radius:4px;padding:0 4px;margin:1px}
.err{color:#b3261e;max-width:420px}
#zoom{position:fixed;inset:0;background:#000c;display:none;align-items:center;
justify-content:center;cursor:zoom-out}#zoom img{max-width:96vw;max-height:92vh;min-height:50vh;object-fit:contain;image-rendering:pixelated}
dl.help dt{font-weight:600}dl.help dd{margin:0 0 6px 12px}
</style></head>
<body>
<header><h1>UBC run report</h1>
<div>{{ data.run.model or "model ?" }} &middot; weights {{ (data.run.bundle_sha256 or "?")[:12] }}
&middot; {{ data.run.backends|join(", ") or "no engine used" }}</div></header>
<div class="banner">Research software: not for diagnosis. P(HGG) is a model's output for
the slices shown, not a grade.</div>
<main>
<div class="cards">
<div class="card"><b>{{ data.run.cases }}</b>cases</div>
{% for s in statuses %}<div class="card {{ s }}"><b>{{ data.run.counts[s] }}</b>{{ s }}</div>{% endfor %}
<div class="card"><b>{{ "%.1f"|format(data.run.compute_seconds) }} s</b>compute, all rows</div>
{% if data.run.wall_seconds is not none %}<div class="card"><b>{{ "%.1f"|format(data.run.wall_seconds) }} s</b>wall, last run</div>{% endif %}
<div class="card"><b>{{ data.run.made }}</b>{{ data.run.machine }}</div>
</div>
<div class="plots">{% for svg in plots %}{{ svg|safe }}{% endfor %}</div>
{% if data.flags %}<details><summary>What the flags mean</summary><dl class="help">
{% for kind, f in data.flags.items() %}<dt>{{ kind }} ({{ f.count }})</dt><dd>{{ f.help or "See the row's flag text." }}</dd>{% endfor %}
</dl></details>{% endif %}
<div class="controls">
<label>Status <select id="status"><option value="">all</option>
{% for s in statuses %}<option value="{{ s }}">{{ s }}</option>{% endfor %}</select></label>
<label>Flag <select id="flag"><option value="">any</option><option value="-">none</option>
{% for kind in data.flags %}<option value="{{ kind }}">{{ kind }}</option>{% endfor %}</select></label>
<label>Case id <input id="search" type="search" placeholder="search"></label>
<label>Rows per page <select id="size"><option>100</option><option selected>250</option>
<option>1000</option><option value="0">all</option></select></label>
<button id="prev" type="button">&laquo; previous</button><button id="next" type="button">next &raquo;</button>
<span id="shown"></span>
</div>
<table id="cases"><colgroup><col style="width:14%"><col style="width:7%"><col style="width:5%">
<col style="width:6%"><col style="width:6%"><col style="width:6%"><col style="width:6%"><col style="width:18%">
<col style="width:32%"></colgroup><thead><tr>
<th data-sort="id">case id</th><th data-sort="status">status</th><th data-sort="cls">class</th>
<th data-sort="p">P(HGG)</th><th data-sort="ml">lesion mL</th><th data-sort="scored">slices</th>
<th data-sort="s">seconds</th><th data-sort="flags">flags</th><th>picture or error</th>
</tr></thead><tbody></tbody></table>
</main>
<div id="zoom"><img alt=""></div>
<script id="report-data" type="application/json">{{ payload|safe }}</script>
<script>
"use strict";
const data = JSON.parse(document.getElementById("report-data").textContent);
const help = data.flags, body = document.querySelector("#cases tbody");
const fmt = (v, d) => v === null || v === undefined ? "" : Number(v).toFixed(d);
const esc = t => String(t ?? "").replace(/[&<>"]/g, c => ({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;"})[c]);
function flagHtml(c) {
  return c.flags.split(";").filter(Boolean).map(f => {
    const kind = f.split(":")[0];
    return `<span class="flag" title="${esc((help[kind] || {}).help || "")}">${esc(f)}</span>`;
  }).join(" ");
}
function pictureHtml(c) {
  if (c.status === "error") return `<div class="err">${esc(c.error)}</div>`;
  if (c.outerr) return `<div class="err">scored, but outputs not written: ${esc(c.outerr)}</div>`;
  if (c.pic) return `<img loading="lazy" src="${esc(c.pic)}" alt="top slices of ${esc(c.id)}">`;
  return `<div class="why">No picture: this run was scored without --report or --overlays `
    + `(ubc-report --masks DIR draws one from the case's mask).</div>`;
}
// Rows are made when first shown and only one page of them is in the table at a time: a
// 5,000-row table takes seconds to lay out in a browser without a GPU, a page of 250 does not.
function makeRow(c) {
  const tr = document.createElement("tr");
  tr.className = c.status;
  tr.dataset.caseId = c.id;
  tr.innerHTML = `<td>${esc(c.id)}</td><td class="status">${esc(c.status)}</td>`
    + `<td>${esc(c.cls)}</td><td class="num">${fmt(c.p, 3)}</td><td class="num">${fmt(c.ml, 1)}</td>`
    + `<td class="num">${c.scored ?? ""}${c.total ? " / " + c.total : ""}</td>`
    + `<td class="num">${fmt(c.s, 2)}</td><td>${flagHtml(c)}</td><td class="pic">${pictureHtml(c)}</td>`;
  return tr;
}
const rows = data.cases.map(c => ({c, tr: null}));
let order = rows.slice(), page = 0;
const pageSize = () => Number(document.getElementById("size").value) || rows.length;
function matching() {
  const status = document.getElementById("status").value;
  const flag = document.getElementById("flag").value;
  const text = document.getElementById("search").value.toLowerCase();
  return order.filter(({c}) => (!status || c.status === status)
    && (!flag || (flag === "-" ? c.kinds.length === 0 : c.kinds.includes(flag)))
    && (!text || c.id.toLowerCase().includes(text)));
}
function render() {
  const found = matching(), size = pageSize();
  const pages = Math.max(1, Math.ceil(found.length / size));
  page = Math.min(page, pages - 1);
  const frag = document.createDocumentFragment();
  for (const row of found.slice(page * size, (page + 1) * size)) {
    row.tr = row.tr || makeRow(row.c);
    frag.appendChild(row.tr);
  }
  body.replaceChildren(frag);
  document.getElementById("shown").textContent =
    `${found.length} of ${rows.length} cases match; page ${page + 1} of ${pages}`;
  document.getElementById("prev").disabled = page === 0;
  document.getElementById("next").disabled = page >= pages - 1;
}
function turn(step) { page += step; render(); window.scrollTo(0, body.parentElement.offsetTop); }
function sortBy(th) {
  const key = th.dataset.sort;
  const up = th.getAttribute("aria-sort") !== "ascending";
  document.querySelectorAll("th[data-sort]").forEach(h => h.removeAttribute("aria-sort"));
  th.setAttribute("aria-sort", up ? "ascending" : "descending");
  const value = r => r.c[key];
  page = 0;
  order.sort((a, b) => {
    const x = value(a), y = value(b);
    if (x === y) return 0;
    if (x === null || x === undefined || x === "") return 1;   // empty cells last
    if (y === null || y === undefined || y === "") return -1;
    return (typeof x === "number" ? x - y : String(x).localeCompare(String(y))) * (up ? 1 : -1);
  });
  render();
}
document.querySelectorAll("th[data-sort]").forEach(th => th.addEventListener("click", () => sortBy(th)));
["status", "flag", "search", "size"].forEach(id => document.getElementById(id).addEventListener("input", () => { page = 0; render(); }));
document.getElementById("prev").addEventListener("click", () => turn(-1));
document.getElementById("next").addEventListener("click", () => turn(1));
const zoom = document.getElementById("zoom");
body.addEventListener("click", e => {
  if (e.target.tagName === "IMG") { zoom.querySelector("img").src = e.target.src; zoom.style.display = "flex"; }
});
zoom.addEventListener("click", () => { zoom.style.display = "none"; });
render();
// ready once the table has been laid out and painted (the next frame after it)
requestAnimationFrame(() => setTimeout(() => { document.body.dataset.ready = String(performance.now()); }));
</script>
</body></html>
"""
