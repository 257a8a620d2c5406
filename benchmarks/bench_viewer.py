"""Viewer tile latency (slide JPEG and heatmap PNG tiles), cold vs warm cache, and server peak RSS.

    python benchmarks/bench_viewer.py [--size 100000] [--workdir DIR] [--tiles 200]

The baseline in the same run is the warm-cache latency (a cache hit): cold/warm ratios are printed.
A Flask test client pans a random walk over the top DeepZoom level, then revisits the same tiles.
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pathopeft.viewer import create_app
from pathopeft.wsi.synth import make_synthetic_slide


def export(root: Path, size: int) -> None:
    slide = root / f"big{size}.tiff"
    if not slide.exists():
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
    (out / "manifest.csv").write_text(f"slide_id,status,slide_path\nbig,ok,{slide.resolve()}\n")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=100_000)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--tiles", type=int, default=200)
    p.add_argument("--cache-mb", type=float, default=256.0)
    a = p.parse_args()
    root = a.workdir or Path(tempfile.mkdtemp(prefix="bench_viewer_"))
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    export(root, a.size)
    print(f"slide + scores ready in {time.perf_counter() - t0:.1f} s ({a.size}x{a.size})")
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


if __name__ == "__main__":
    main()
