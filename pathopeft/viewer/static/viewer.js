"use strict";
// pathopeft viewer: slide + heatmap as two aligned DeepZoom layers, regions as an SVG overlay.
const $ = (id) => document.getElementById(id);
const state = { slides: [], cur: null, info: null, regionsOn: true, heatOn: true };
const viewer = OpenSeadragon({ id: "osd", prefixUrl: "/static/openseadragon/images/", showNavigator: true,
  crossOriginPolicy: false, maxZoomPixelRatio: 4 });
window.pathopeftViewer = viewer;
const NS = "http://www.w3.org/2000/svg";
const svg = document.createElementNS(NS, "svg");
svg.setAttribute("class", "regions");
svg.setAttribute("id", "regions");
viewer.canvas.appendChild(svg);

function base(s) { return `/api/${encodeURIComponent(s.task)}/${encodeURIComponent(s.slide_id)}`; }
function heatLayer() { return viewer.world.getItemCount() > 1 ? viewer.world.getItemAt(1) : null; }

function writeUrl() {
  if (!state.cur) return;
  const p = new URLSearchParams({ task: state.cur.task, slide: state.cur.slide_id,
    opacity: $("opacity").value, threshold: $("threshold").value });
  const c = viewer.viewport.getCenter(), z = viewer.viewport.getZoom();
  if (isFinite(c.x)) { p.set("x", c.x.toFixed(5)); p.set("y", c.y.toFixed(5)); p.set("z", z.toFixed(4)); }
  history.replaceState(null, "", "?" + p.toString());
}

async function loadSlide(s, view) {
  state.cur = s;
  const info = await (await fetch(base(s) + "/info")).json();
  state.info = info;
  document.querySelectorAll("#slides li").forEach((li) => li.classList.toggle("active", li.dataset.key === s.task + "/" + s.slide_id));
  $("meta").textContent = `${info.class ?? ""} p=${info.bag_probability ?? "?"}  ${info.width}×${info.height}px  ${info.mpp ? info.mpp + " µm/px" : "no µm/px"}`;
  if (view && view.threshold !== undefined) $("threshold").value = view.threshold;
  else $("threshold").value = info.threshold;
  const opacity = parseFloat($("opacity").value);
  const src = (kind, ext) => ({ width: info.width, height: info.height, tileSize: info.tile_size, tileOverlap: info.overlap,
    minLevel: 0, maxLevel: info.max_level, getTileUrl: (l, x, y) => `${base(s)}/${kind}_files/${l}/${x}_${y}.${ext}` });
  viewer.open([{ tileSource: src("slide", "jpeg") }, { tileSource: src("heatmap", "png"), opacity: state.heatOn ? opacity : 0 }]);
  viewer.addOnceHandler("open", () => {
    if (view && view.z) { viewer.viewport.zoomTo(view.z, null, true); viewer.viewport.panTo(new OpenSeadragon.Point(view.x, view.y), true); }
    refreshRegions();
  });
}

let regionsToken = 0;
async function refreshRegions() {
  if (!state.cur) return;
  const thr = $("threshold").value;
  $("thrval").textContent = thr;
  const token = ++regionsToken;
  const gj = await (await fetch(`${base(state.cur)}/regions?threshold=${thr}`)).json();
  if (token !== regionsToken) return;
  state.regions = gj;
  drawRegions();
  writeUrl();
}

function drawRegions() {
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  const item = viewer.world.getItemAt(0);
  if (!state.regions || !item || !state.regionsOn) { svg.dataset.count = "0"; return; }
  const r = viewer.container.getBoundingClientRect();
  svg.setAttribute("width", r.width); svg.setAttribute("height", r.height);
  let n = 0;
  for (const f of state.regions.features) {
    const polys = f.geometry.type === "Polygon" ? [f.geometry.coordinates] : f.geometry.coordinates;
    for (const poly of polys) {
      const d = poly.map((ring) => ring.map(([x, y]) => {
        const p = item.imageToViewerElementCoordinates(new OpenSeadragon.Point(x, y));
        return `${p.x.toFixed(1)},${p.y.toFixed(1)}`;
      }).join(" L ")).map((s) => "M " + s + " Z").join(" ");
      const path = document.createElementNS(NS, "path");
      path.setAttribute("d", d); path.setAttribute("fill", "none"); path.setAttribute("stroke", "#0f0");
      path.setAttribute("stroke-width", "2"); path.setAttribute("fill-rule", "evenodd");
      svg.appendChild(path); n++;
    }
  }
  svg.dataset.count = String(n);
  svg.dataset.threshold = String(state.regions.threshold);
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

viewer.addHandler("animation", () => { drawRegions(); updateScaleBar(); });
viewer.addHandler("animation-finish", writeUrl);
viewer.addHandler("resize", drawRegions);

let scoreTimer = null;
new OpenSeadragon.MouseTracker({ element: viewer.container, moveHandler: (e) => {
  const item = viewer.world.getItemAt(0);
  if (!item || !state.cur) return;
  const p = item.viewerElementToImageCoordinates(e.position);
  clearTimeout(scoreTimer);
  scoreTimer = setTimeout(async () => {
    const r = await (await fetch(`${base(state.cur)}/score?x=${p.x}&y=${p.y}`)).json();
    $("score").textContent = "score: " + (r.score === null ? "–" : r.score.toFixed(3));
  }, 40);
} });

$("opacity").addEventListener("input", () => { const h = heatLayer(); if (h && state.heatOn) h.setOpacity(parseFloat($("opacity").value)); writeUrl(); });
$("threshold").addEventListener("input", refreshRegions);
$("task").addEventListener("change", () => { const s = state.slides.find((x) => x.task === $("task").value); renderList(); if (s) loadSlide(s); });

function step(id, d) { const el = $(id); el.value = Math.min(1, Math.max(0, parseFloat(el.value) + d)).toFixed(2); el.dispatchEvent(new Event("input")); }
document.addEventListener("keydown", (e) => {
  if (e.target.tagName === "SELECT") return;
  const list = state.slides.filter((s) => s.task === $("task").value);
  const i = list.indexOf(state.cur);
  if (e.key === "h") { state.heatOn = !state.heatOn; const h = heatLayer(); if (h) h.setOpacity(state.heatOn ? parseFloat($("opacity").value) : 0); }
  else if (e.key === "r") { state.regionsOn = !state.regionsOn; drawRegions(); }
  else if (e.key === "[") step("threshold", -0.05);
  else if (e.key === "]") step("threshold", 0.05);
  else if (e.key === "-") step("opacity", -0.1);
  else if (e.key === "=") step("opacity", 0.1);
  else if (e.key === "n" && list.length) loadSlide(list[(i + 1) % list.length]);
  else if (e.key === "p" && list.length) loadSlide(list[(i - 1 + list.length) % list.length]);
});

function renderList() {
  const ul = $("slides"); ul.innerHTML = "";
  for (const s of state.slides.filter((x) => x.task === $("task").value)) {
    const li = document.createElement("li");
    li.dataset.key = s.task + "/" + s.slide_id;
    li.textContent = `${s.slide_id}  ${s.bag_probability !== null && s.bag_probability !== undefined ? Number(s.bag_probability).toFixed(2) : ""}`;
    li.onclick = () => loadSlide(s);
    ul.appendChild(li);
  }
}

(async () => {
  state.slides = await (await fetch("/api/slides")).json();
  const tasks = [...new Set(state.slides.map((s) => s.task))];
  for (const t of tasks) { const o = document.createElement("option"); o.value = o.textContent = t; $("task").appendChild(o); }
  const q = new URLSearchParams(location.search);
  if (q.get("task") && tasks.includes(q.get("task"))) $("task").value = q.get("task");
  if (q.get("opacity")) $("opacity").value = q.get("opacity");
  renderList();
  const want = state.slides.find((s) => s.task === $("task").value && s.slide_id === q.get("slide"))
    || state.slides.find((s) => s.task === $("task").value);
  if (want) loadSlide(want, { threshold: q.get("threshold") ?? undefined,
    x: parseFloat(q.get("x")), y: parseFloat(q.get("y")), z: parseFloat(q.get("z")) || null });
})();
