"""Write a heatmap export folder per notes/HEATMAP_CONTRACT.md around a small synthetic slide.

The GeoJSON is the exporter's own (``build_grid`` → ``region_geometries`` → ``build_feature_collection``
with ``min_cells=2``), so one isolated high tile (SPIKE) is a tile above the threshold that is *not* an
exported region: the viewer must draw the export's regions, not recompute them from the CSV.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from pathopeft.files import atomic_write_json
from pathopeft.heatmaps.geojson import build_feature_collection, write_geojson
from pathopeft.heatmaps.raster import build_grid, region_geometries
from pathopeft.wsi.synth import make_synthetic_slide

TS = 256
THRESHOLD = 0.5
MIN_CELLS = 2
SPIKE = (1792, 0)  # top-right tile: alone above the threshold, so below min_cells
BOUNDS = (16, 8)  # written to the JSON and subtracted in the GeoJSON, as for a slide with bounds
MANIFEST = ["slide_id", "status", "error", "task", "class", "bag_probability", "predicted_class"]
MANIFEST += ["n_tiles", "n_regions", "slide_path", "files"]


def tile_scores(width: int, height: int, seed: int, invert: bool) -> tuple[np.ndarray, np.ndarray]:
    """A smooth score peaked at the slide centre (nested regions per threshold) plus SPIKE."""
    rng = np.random.default_rng(seed)
    coords, scores = [], []
    for y in range(0, height, TS):
        for x in range(0, width, TS):
            d = np.hypot(x + TS / 2 - width / 2, y + TS / 2 - height / 2) / (width / 2)
            s = float(np.clip(1 - d + rng.normal(0, 0.01), 0, 1))
            if (x, y) == SPIKE:
                s = 0.95
            coords.append((x, y))
            scores.append(1 - s if invert else s)
    return np.array(coords, dtype=np.int64), np.array(scores)


def make_export(
    root: Path,
    task: str = "tumor",
    slide_id: str = "s1",
    seed: int = 0,
    invert: bool = False,
    bag_probability: float = 0.9,
    predicted_class: str = "tumor",
) -> Path:
    """Add one slide to the export folder ``root/task`` (the slide file is shared across tasks)."""
    out = root / task
    out.mkdir(parents=True, exist_ok=True)
    slide = root / f"{slide_id}.tiff"
    width, height = 2048, 1536
    if not slide.exists():
        make_synthetic_slide(slide, width=width, height=height, seed=seed, slide_id=slide_id)
    coords, scores = tile_scores(width, height, seed, invert)
    with open(out / f"{slide_id}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["x", "y", "width", "height", "score", "attention"])
        for (x, y), s in zip(coords.tolist(), scores.tolist()):
            w.writerow([x, y, TS, TS, s, s])
    grid = build_grid(coords, TS, scores, width, height)
    regions = region_geometries(grid, THRESHOLD, min_cells=MIN_CELLS)
    collection = build_feature_collection(
        slide_id,
        coords,
        TS,
        {"score": scores},
        regions,
        class_name="tumor",
        bounds=BOUNDS,
        size=(width, height),
        mpp=0.5,
    )
    write_geojson(out / f"{slide_id}.geojson", collection)
    files = f"{slide_id}.json;{slide_id}.csv;{slide_id}.geojson"
    atomic_write_json(
        out / f"{slide_id}.json",
        {
            "slide_id": slide_id,
            "slide_path": str(slide.resolve()),
            "task": task,
            "class": "tumor",
            "classes": ["normal", "tumor"],
            "model": "comel",
            "checkpoint": "x.ckpt",
            "checkpoint_sha256": "0" * 64,
            "score": "attention",
            "raw_score": "attention weight",
            "scale": "minmax of attention",
            "bag_probability": bag_probability,
            "predicted_class": predicted_class,
            "normalize": "minmax",
            "threshold": THRESHOLD,
            "colormap": "jet",
            "tile_size": TS,
            "mpp": 0.5,
            "level0_size": [width, height],
            "bounds": list(BOUNDS),
            "n_tiles": len(coords),
            "n_regions": len(regions),
            "created": "2026-01-01T00:00:00Z",
            "pathopeft_version": "0.1.0",
            "files": files.split(";"),
        },
    )
    manifest = out / "manifest.csv"
    rows = []
    if manifest.exists():
        with open(manifest, newline="") as f:
            rows = [r for r in csv.DictReader(f) if r["slide_id"] != slide_id]
    row = [
        slide_id,
        "ok",
        "",
        task,
        "tumor",
        bag_probability,
        predicted_class,
        len(coords),
        len(regions),
        str(slide.resolve()),
        files,
    ]
    rows.append(dict(zip(MANIFEST, map(str, row))))
    with open(manifest, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=MANIFEST)
        w.writeheader()
        w.writerows(rows)
    return out


def exported_regions_full_frame(out: Path, slide_id: str = "s1") -> list[dict]:
    """The annotation features of the written GeoJSON, moved back to full-frame px."""
    data = json.loads((out / f"{slide_id}.geojson").read_text())
    feats = [f for f in data["features"] if f["properties"]["objectType"] == "annotation"]
    for f in feats:
        assert f["geometry"]["type"] == "Polygon"
        f["geometry"]["coordinates"] = [
            [[x + BOUNDS[0], y + BOUNDS[1]] for x, y in ring] for ring in f["geometry"]["coordinates"]
        ]
    return feats
