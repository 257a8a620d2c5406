"use strict";
// pathopeft viewer: slide + heatmap as two aligned DeepZoom layers; an SVG overlay with the exported
// GeoJSON regions (solid, as written by `pathopeft heatmap`) and the tiles at or above the threshold
// slider (dashed, from the per-tile scores).
const $ = (id) => document.getElementById(id);
const state = { slides: [], cur: null, info: null, regions: null, above: null,
  regionsOn: true, aboveOn: true, heatOn: true, sort: { by: "id", desc: false } };
// slide list columns: the URL's sort= name -> the listing's field
const SORT_FIELDS = { id: "slide_id", task: "task", p: "bag_probability", class: "predicted_class", regions: "n_regions" };
const viewer = OpenSeadragon({ id: "osd", prefixUrl: "/static/openseadragon/images/", showNavigator: true,
  crossOriginPolicy: false, maxZoomPixelRatio: 4 });
window.pathopeftViewer = viewer;
window.pathopeftState = state;
const NS = "http://www.w3.org/2000/svg";
const svg = document.createElementNS(NS, "svg");
svg.setAttribute("class", "regions");
const gRegions = document.createElementNS(NS, "g");
gRegions.setAttribute("id", "regions");
const gAbove = document.createElementNS(NS, "g");
gAbove.setAttribute("id", "above");
svg.append(gAbove, gRegions);
viewer.canvas.appendChild(svg);

function base(s) { return `/api/${encodeURIComponent(s.task)}/${encodeURIComponent(s.slide_id)}`; }
function heatLayer() { return viewer.world.getItemCount() > 1 ? viewer.world.getItemAt(1) : null; }
async function getJson(url) {
  const r = await fetch(url);
  const body = await r.json();
  if (!r.ok) throw new Error(`${url}: ${body.error || r.status}`);
  return body;
}

function writeUrl() {
  const p = new URLSearchParams();
  if (state.cur) {
    p.set("task", state.cur.task); p.set("slide", state.cur.slide_id);
    p.set("opacity", $("opacity").value); p.set("threshold", $("threshold").value);
    const c = viewer.viewport.getCenter(), z = viewer.viewport.getZoom();
    if (!state.cur.error && isFinite(c.x)) { p.set("x", c.x.toFixed(5)); p.set("y", c.y.toFixed(5)); p.set("z", z.toFixed(4)); }
  }
  p.set("sort", state.sort.by); p.set("order", state.sort.desc ? "desc" : "asc");
  history.replaceState(null, "", "?" + p.toString());
}

function markActive() {
  const key = state.cur ? state.cur.task + "/" + state.cur.slide_id : null;
  document.querySelectorAll("#slides tbody tr").forEach((tr) => tr.classList.toggle("active", tr.dataset.key === key));
}

// a slide whose file was found nowhere (see `pathopeft view --slides`): listed, with the reason, no layers
function showMissing(s) {
  state.info = null;
  viewer.close();
  draw();
  $("meta").textContent = "";
  $("abovenote").textContent = "";
  $("exportthr").textContent = "–";
  $("error").textContent = `${s.task}/${s.slide_id}: ${s.error}`;
  writeUrl();
}

// view: {threshold, x, y, z} to land on (from the URL or the slide being left); absent = whole slide
async function loadSlide(s, view) {
  state.cur = s;
  state.regions = state.above = null;
  if ($("task").value !== s.task) $("task").value = s.task;
  markActive();
  if (s.error) { showMissing(s); return; }
  const info = await getJson(base(s) + "/info");
  if (state.cur !== s) return;
  state.info = info;
  $("error").textContent = "";
  $("abovenote").textContent = info.scores ? (info.scores.endsWith(".csv") ? "" : `(tile scores from ${info.scores}: no CSV exported)`)
    : `The threshold outline, heatmap and score under the cursor need the tile scores: ${info.scores_error}`;
  $("meta").textContent = `${info.class ?? ""} p=${info.bag_probability ?? "?"}  ${info.width}×${info.height}px  ${info.mpp ? info.mpp + " µm/px" : "no µm/px"}`;
  $("threshold").value = view && view.threshold !== undefined && view.threshold !== null ? view.threshold : info.threshold;
  const opacity = parseFloat($("opacity").value);
  const src = (kind, ext) => ({ width: info.width, height: info.height, tileSize: info.tile_size, tileOverlap: info.overlap,
    minLevel: 0, maxLevel: info.max_level, getTileUrl: (l, x, y) => `${base(s)}/${kind}_files/${l}/${x}_${y}.${ext}` });
  viewer.addOnceHandler("open", () => {
    if (state.cur !== s) return;  // another slide was asked for meanwhile; its own handler follows
    if (view && view.z) { viewer.viewport.zoomTo(view.z, null, true); viewer.viewport.panTo(new OpenSeadragon.Point(view.x, view.y), true); }
    loadRegions(s);
    refreshAbove();
  });
  viewer.open([{ tileSource: src("slide", "jpeg") }, { tileSource: src("heatmap", "png"), opacity: state.heatOn ? opacity : 0 }]);
}

async function loadRegions(s) {
  const gj = await getJson(base(s) + "/regions");
  if (state.cur !== s) return;
  state.regions = gj;
  $("exportthr").textContent = gj.source ? `t = ${gj.threshold} in ${gj.source}` : "– (no GeoJSON exported)";
  draw();
}

let aboveToken = 0;
async function refreshAbove() {
  if (!state.cur || !state.info) return;
  const thr = $("threshold").value;
  $("thrval").textContent = thr;
  if (!state.info.scores) { draw(); writeUrl(); return; }  // no tile scores: #abovenote says why
  const token = ++aboveToken;
  const gj = await getJson(`${base(state.cur)}/above?threshold=${thr}`);
  if (token !== aboveToken) return;
  state.above = gj;
  draw();
  writeUrl();
}

function pathD(item, geometry) {
  const polys = geometry.type === "Polygon" ? [geometry.coordinates] : geometry.coordinates;
  return polys.map((poly) => poly.map((ring) => "M " + ring.map(([x, y]) => {
    const p = item.imageToViewerElementCoordinates(new OpenSeadragon.Point(x, y));
    return `${p.x.toFixed(1)},${p.y.toFixed(1)}`;
  }).join(" L ") + " Z").join(" ")).join(" ");
}

function drawGroup(g, gj, on, style) {
  g.replaceChildren();
  const item = viewer.world.getItemAt(0);
  let n = 0;
  if (gj && item && on) {
    for (const f of gj.features) {
      const path = document.createElementNS(NS, "path");
      path.setAttribute("d", pathD(item, f.geometry));
      path.setAttribute("fill-rule", "evenodd");
      style(path, f.properties || {});
      g.appendChild(path); n++;
    }
  }
  g.dataset.count = String(n);
}

function draw() {
  const r = viewer.container.getBoundingClientRect();
  svg.setAttribute("width", r.width); svg.setAttribute("height", r.height);
  const thr = parseFloat($("threshold").value);
  let kept = 0;
  drawGroup(gRegions, state.regions, state.regionsOn, (path, p) => {
    const below = p.score_max !== null && p.score_max !== undefined && p.score_max < thr;
    path.setAttribute("class", below ? "exported below" : "exported");
    path.setAttribute("stroke", p.color ? `rgb(${p.color.join(",")})` : "#c80000");
    path.dataset.scoreMax = p.score_max;
    const title = document.createElementNS(NS, "title");
    const area = p.area_um2 ? `, ${(p.area_um2 / 1e6).toFixed(3)} mm²` : "";
    title.textContent = `${p.name ?? "region"}: max ${p.score_max?.toFixed(3)}, mean ${p.score_mean?.toFixed(3)}${area}`;
    path.appendChild(title);
    if (!below) kept++;
  });
  gRegions.dataset.kept = String(kept);
  drawGroup(gAbove, state.above, state.aboveOn, (path) => path.setAttribute("class", "above"));
  if (state.above) gAbove.dataset.threshold = String(state.above.threshold);
}

function updateScaleBar() {
  const item = viewer.world.getItemAt(0);
  if (!item || !state.info || !state.info.mpp) { $("scalebar").style.display = "none"; return; }
  $("scalebar").style.display = "block";
  const a = item.viewerElementToImageCoordinates(new OpenSeadragon.Point(0, 0));
  const b = item.viewerElementToImageCoordinates(new OpenSeadragon.Point(100, 0));
  const umPer100 = (b.x - a.x) * state.info.mpp;
  const nice = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000];
  const um = nice.find((v) => v >= umPer100 / 2) || nice[nice.length - 1];
  $("scalebar-bar").style.width = (100 * um / umPer100).toFixed(0) + "px";
  $("scalebar-label").textContent = um >= 1000 ? `${um / 1000} mm` : `${um} µm`;
}

viewer.addHandler("animation", () => { draw(); updateScaleBar(); });
viewer.addHandler("animation-finish", writeUrl);
viewer.addHandler("resize", draw);

let scoreTimer = null;
new OpenSeadragon.MouseTracker({ element: viewer.container, moveHandler: (e) => {
  const item = viewer.world.getItemAt(0);
  if (!item || !state.cur || !state.info || !state.info.scores) return;
  const p = item.viewerElementToImageCoordinates(e.position);
  const s = state.cur;
  clearTimeout(scoreTimer);
  scoreTimer = setTimeout(async () => {
    const r = await getJson(`${base(s)}/score?x=${p.x}&y=${p.y}`);
    if (state.cur !== s) return;
    $("score").textContent = "score: " + (r.score === null ? "–" : r.score.toFixed(3));
    $("score").dataset.task = s.task;
  }, 40);
} });

function setOpacity() { const h = heatLayer(); if (h) h.setOpacity(state.heatOn ? parseFloat($("opacity").value) : 0); }
$("opacity").addEventListener("input", () => { setOpacity(); writeUrl(); });
$("threshold").addEventListener("input", () => { draw(); refreshAbove(); });
// switching task keeps the slide and the view where that slide was exported for the new task too
$("task").addEventListener("change", () => {
  const prev = state.cur;
  const same = prev && state.slides.find((x) => x.task === $("task").value && x.slide_id === prev.slide_id);
  const s = same || sortedSlides().find((x) => x.task === $("task").value);
  if (!s) return;
  const c = viewer.viewport.getCenter();
  const keep = same && !prev.error && isFinite(c.x);
  loadSlide(s, keep ? { x: c.x, y: c.y, z: viewer.viewport.getZoom() } : undefined);
});

function step(id, d) { const el = $(id); el.value = Math.min(1, Math.max(0, parseFloat(el.value) + d)).toFixed(2); el.dispatchEvent(new Event("input")); }
const KEYS = {
  h: () => { state.heatOn = !state.heatOn; setOpacity(); },
  "[": () => step("opacity", -0.1), "]": () => step("opacity", 0.1),
  ",": () => step("threshold", -0.05), ".": () => step("threshold", 0.05),
  "<": () => step("threshold", -0.05), ">": () => step("threshold", 0.05),
  r: () => { state.regionsOn = !state.regionsOn; draw(); },
  t: () => { state.aboveOn = !state.aboveOn; draw(); },
  n: () => nextSlide(1), p: () => nextSlide(-1),
};
function nextSlide(d) {
  const list = sortedSlides().filter((s) => s.task === $("task").value);
  if (!list.length) return;
  const i = list.indexOf(state.cur);
  loadSlide(list[(i + d + list.length) % list.length]);
}
// capture phase: ours run before OpenSeadragon's canvas keys (which would rotate on r), and keep
// OpenSeadragon's zoom/pan keys (- = 0, arrows, w a s d) for it
window.addEventListener("keydown", (e) => {
  const tag = e.target.tagName;
  if (tag === "SELECT" || (tag === "INPUT" && e.target.type !== "range") || e.ctrlKey || e.altKey || e.metaKey) return;
  const act = KEYS[e.key];
  if (!act) return;
  e.preventDefault(); e.stopPropagation();
  act();
}, true);

// nulls last in either order; ties by slide id then task, so the order is always the same
function sortedSlides() {
  const field = SORT_FIELDS[state.sort.by], sign = state.sort.desc ? -1 : 1;
  const cmp = (a, b) => typeof a === "number" && typeof b === "number" ? a - b
    : String(a).localeCompare(String(b), undefined, { numeric: true });
  const tie = (a, b) => cmp(a.slide_id, b.slide_id) || cmp(a.task, b.task);
  return [...state.slides].sort((a, b) => {
    const x = a[field], y = b[field];
    const nx = x === null || x === undefined, ny = y === null || y === undefined;
    if (nx || ny) return nx === ny ? tie(a, b) : nx ? 1 : -1;
    return sign * cmp(x, y) || tie(a, b);
  });
}

function renderList() {
  const body = $("slides").tBodies[0]; body.replaceChildren();
  for (const s of sortedSlides()) {
    const tr = document.createElement("tr");
    tr.dataset.key = s.task + "/" + s.slide_id;
    const p = s.bag_probability !== null && s.bag_probability !== undefined ? Number(s.bag_probability).toFixed(2) : "";
    const cells = [s.error ? `\u26a0 ${s.slide_id}` : s.slide_id, s.task, p, s.predicted_class ?? "", s.n_regions ?? ""];
    for (const text of cells) { const td = document.createElement("td"); td.textContent = text; tr.appendChild(td); }
    if (s.error) { tr.classList.add("missing"); tr.title = s.error; }
    tr.onclick = () => loadSlide(s);
    body.appendChild(tr);
  }
  document.querySelectorAll("#slides th").forEach((th) => {
    if (th.dataset.sort === state.sort.by) th.setAttribute("aria-sort", state.sort.desc ? "descending" : "ascending");
    else th.removeAttribute("aria-sort");
  });
  markActive();
}

// a click sorts by that column (ascending), a second click on it reverses the order
document.querySelectorAll("#slides th").forEach((th) => th.addEventListener("click", () => {
  const by = th.dataset.sort;
  state.sort = { by, desc: state.sort.by === by ? !state.sort.desc : false };
  renderList();
  writeUrl();
}));

(async () => {
  state.slides = await getJson("/api/slides");
  const tasks = [...new Set(state.slides.map((s) => s.task))];
  for (const t of tasks) { const o = document.createElement("option"); o.value = o.textContent = t; $("task").appendChild(o); }
  const q = new URLSearchParams(location.search);
  if (q.get("task") && tasks.includes(q.get("task"))) $("task").value = q.get("task");
  if (q.get("opacity")) $("opacity").value = q.get("opacity");
  if (SORT_FIELDS[q.get("sort")]) state.sort = { by: q.get("sort"), desc: q.get("order") === "desc" };
  renderList();
  const want = state.slides.find((s) => s.task === $("task").value && s.slide_id === q.get("slide"))
    || sortedSlides().find((s) => s.task === $("task").value);
  if (want) loadSlide(want, { threshold: q.get("threshold") ?? undefined,
    x: parseFloat(q.get("x")), y: parseFloat(q.get("y")), z: parseFloat(q.get("z")) || null });
})();
