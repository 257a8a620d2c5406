"""Viewer tile latency (slide JPEG and heatmap PNG tiles), cold vs warm cache, and server peak RSS.

    python benchmarks/bench_viewer.py [--size 100000] [--workdir DIR] [--tiles 200]

The baseline in the same run is the warm-cache latency (a cache hit): cold/warm ratios are printed.
A Flask test client pans a random walk over the top DeepZoom level, then revisits the same tiles.
Then the first ``/regions`` call (reading the exported GeoJSON: one feature per scored tile + the
regions) is timed and its peak Python allocation measured against a plain ``json.load`` + filter.
Last, the tile scores of an export without a CSV (read from the GeoJSON's tile features) are timed
against reading the same scores from the CSV (``--scores-only``: just this, no slide is made).
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import os
import resource
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pathopeft.viewer import create_app
from pathopeft.viewer.catalog import Catalog
from pathopeft.wsi.synth import make_synthetic_slide


def export(root: Path, size: int, with_slide: bool = True) -> None:
    slide = root / f"big{size}.tiff"
    if with_slide and not slide.exists():
        make_synthetic_slide(slide, width=size, height=size, mpp=0.5, seed=1, n_tissue=6, quality=70)
    out = root / "task"
    out.mkdir(exist_ok=True)
    ts = 256
    rng = np.random.default_rng(0)
    with open(out / "big.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["x", "y", "width", "height", "score"])
        for y in range(0, size, ts * 2):  # a checkerboard of scored tiles (half the grid), like tissue
            for x in range(0, size, ts):
                w.writerow([x, y, ts, ts, f"{rng.random():.4f}"])
    meta = {
        "slide_id": "big",
        "slide_path": str(slide.resolve()),
        "task": "task",
        "threshold": 0.5,
        "colormap": "jet",
        "tile_size": ts,
        "mpp": 0.5,
        "level0_size": [size, size],
    }
    (out / "big.json").write_text(json.dumps(meta))
    write_geojson_like_the_exporter(out / "big.geojson", size, ts)
    (out / "manifest.csv").write_text(f"slide_id,status,slide_path\nbig,ok,{slide.resolve()}\n")


def write_geojson_like_the_exporter(path: Path, size: int, ts: int) -> None:
    """The exporter's layout (build_feature_collection's features, compact JSON), written in chunks."""
    import shapely

    from pathopeft.heatmaps.geojson import build_feature_collection  # imports torch: child process only

    xs, ys = np.meshgrid(np.arange(0, size, ts), np.arange(0, size, ts * 2))
    coords = np.stack([xs.ravel(), ys.ravel()], 1)
    scores = np.random.default_rng(0).random(len(coords))
    regions = [
        (shapely.box(x, x, x + 20 * ts, x + 10 * ts), 0.6, 0.9, 200) for x in range(0, size // 2, size // 8)
    ]
    with open(path, "w") as fh:
        fh.write('{"type":"FeatureCollection","features":[')
        first = True
        for start in range(0, len(coords), 5000):
            part = slice(start, start + 5000)
            feats = build_feature_collection(
                "big",
                coords[part],
                ts,
                {"score": scores[part], "attention": scores[part]},
                [],
                class_name="tumor",
            )["features"]
            for f in feats:
                fh.write(("" if first else ",") + json.dumps(f, separators=(",", ":")))
                first = False
        for f in build_feature_collection("big", coords[:0], ts, {}, regions, class_name="tumor", mpp=0.5)[
            "features"
        ]:
            fh.write("," + json.dumps(f, separators=(",", ":")))
        fh.write("]}")


def bench_regions(root: Path) -> None:
    """First ``/regions`` read of a big GeoJSON: the viewer's streamed decode vs ``json.load`` + filter."""
    path = root / "task" / "big.geojson"

    def plain() -> list:
        with open(path) as fh:
            data = json.load(fh)
        return [f for f in data["features"] if f["properties"]["objectType"] == "annotation"]

    def viewer() -> list:
        return Catalog(root).get("task", "big").exported_regions()["features"]

    res = {}
    for name, fn in (("json.load + filter", plain), ("viewer", viewer)):
        t = time.perf_counter()
        n = len(fn())
        dt = time.perf_counter() - t
        tracemalloc.start()
        fn()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        res[name] = (dt, peak)
        print(
            f"regions from {path.stat().st_size / 2**20:.1f} MiB GeoJSON, {name:18s}: {n} regions, "
            f"{dt:.2f} s, peak Python allocation {peak / 2**20:.0f} MiB"
        )
    (t0, m0), (t1, m1) = res["json.load + filter"], res["viewer"]
    print(f"viewer vs json.load: time {t1 / t0:.2f}x, peak allocation {m1 / m0:.2f}x")


def bench_scores(root: Path) -> None:
    """Tile scores without a CSV (from the GeoJSON's tile features) vs the same scores from the CSV."""
    src, nocsv = root / "task", root / "nocsv" / "task"
    nocsv.mkdir(parents=True, exist_ok=True)
    for name in ("big.json", "manifest.csv", "big.geojson"):
        if not (nocsv / name).exists():
            os.link(src / name, nocsv / name)
    res = {}
    for name, folder in (("csv", src.parent), ("geojson", nocsv.parent)):
        t = time.perf_counter()
        df = Catalog(folder).get("task", "big").scores
        dt = time.perf_counter() - t
        tracemalloc.start()
        _ = Catalog(folder).get("task", "big").scores
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        res[name] = (dt, peak, df.sort_values(["y", "x"]).reset_index(drop=True))
        print(
            f"tile scores from {name:7s}: {len(df)} tiles, {dt:.2f} s, "
            f"peak Python allocation {peak / 2**20:.0f} MiB"
        )
    (t0, m0, a), (t1, m1, b) = res["csv"], res["geojson"]
    same = a[["x", "y", "width", "height"]].equals(b[["x", "y", "width", "height"]])
    err = float(np.abs(a["score"].to_numpy() - b["score"].to_numpy()).max())
    print(
        f"geojson vs csv: time {t1 / t0:.2f}x, peak allocation {m1 / m0:.2f}x; "
        f"same tiles: {same}, max |score difference| {err:.1e} (the CSV rounds to 4 decimals)"
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=100_000)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--tiles", type=int, default=200)
    p.add_argument("--cache-mb", type=float, default=256.0)
    p.add_argument("--scores-only", action="store_true", help="only the CSV vs GeoJSON tile-score read")
    a = p.parse_args()
    root = a.workdir or Path(tempfile.mkdtemp(prefix="bench_viewer_"))
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # in a child process, so that making the slide and the GeoJSON does not count in the server's RSS
    child = multiprocessing.get_context("spawn").Process(
        target=export, args=(root, a.size, not a.scores_only)
    )
    child.start()
    child.join()
    if child.exitcode != 0:
        raise SystemExit(f"making the benchmark export under {root} failed (exit code {child.exitcode})")
    print(f"slide + scores ready in {time.perf_counter() - t0:.1f} s ({a.size}x{a.size})")
    if a.scores_only:
        bench_scores(root)
        return
    app = create_app(root, cache_mb=a.cache_mb)
    c = app.test_client()
    info = c.get("/api/task/big/info").get_json()
    top = info["max_level"]
    cols, rows = -(-info["width"] // 256), -(-info["height"] // 256)
    rng = np.random.default_rng(0)
    cx, cy, walk = cols // 2, rows // 2, []
    for _ in range(a.tiles):  # a pan: a random walk of the view centre
        cx = int(np.clip(cx + rng.integers(-1, 2), 0, cols - 1))
        cy = int(np.clip(cy + rng.integers(-1, 2), 0, rows - 1))
        walk.append((cx, cy))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for kind, ext in (("slide", "jpeg"), ("heatmap", "png")):
        res = {}
        for phase in ("cold", "warm"):
            lat = []
            for x, y in walk:
                t = time.perf_counter()
                r = c.get(f"/api/task/big/{kind}_files/{top}/{x}_{y}.{ext}")
                lat.append(time.perf_counter() - t)
                assert r.status_code == 200
            res[phase] = np.array(lat) * 1e3
        cold, warm = res["cold"], res["warm"]
        print(
            f"{kind:8s} tiles (level {top}, n={len(walk)}, revisits in walk count as hits): "
            f"cold median {np.median(cold):.2f} ms p95 {np.percentile(cold, 95):.2f} ms | "
            f"warm median {np.median(warm):.3f} ms p95 {np.percentile(warm, 95):.3f} ms | "
            f"cold/warm median {np.median(cold) / np.median(warm):.0f}x"
        )
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"peak RSS of the (in-process) server: {rss / 1024:.0f} MiB (before panning {rss0 / 1024:.0f} MiB)")
    cache = app.config["cache"]
    print(f"tile cache after the pans: {len(cache)} tiles, {cache.nbytes / 2**20:.1f} of {a.cache_mb:g} MiB")
    bench_regions(root)
    bench_scores(root)


if __name__ == "__main__":
    main()
