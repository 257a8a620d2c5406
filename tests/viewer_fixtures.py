"""Write a heatmap export folder per notes/HEATMAP_CONTRACT.md around a small synthetic slide."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from pathopeft.files import atomic_write_json
from pathopeft.wsi.synth import make_synthetic_slide

TS = 256


def make_export(root: Path, task: str = "tumor", slide_id: str = "s1", seed: int = 0) -> Path:
    out = root / task
    out.mkdir(parents=True, exist_ok=True)
    info = make_synthetic_slide(
        root / f"{slide_id}.tiff", width=2048, height=1536, seed=seed, slide_id=slide_id
    )
    rng = np.random.default_rng(seed)
    rows = []
    for y in range(0, info.height, TS):
        for x in range(0, info.width, TS):
            # a smooth score peaked at the slide centre, so thresholds give nested regions
            d = np.hypot(x + TS / 2 - info.width / 2, y + TS / 2 - info.height / 2) / (info.width / 2)
            rows.append((x, y, TS, TS, float(np.clip(1 - d + rng.normal(0, 0.01), 0, 1))))
    with open(out / f"{slide_id}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["x", "y", "width", "height", "score", "attention"])
        for r in rows:
            w.writerow([*r, r[4]])
    atomic_write_json(
        out / f"{slide_id}.json",
        {
            "slide_id": slide_id,
            "slide_path": str(info.path.resolve()),
            "task": task,
            "class": "tumor",
            "classes": ["normal", "tumor"],
            "model": "comel",
            "checkpoint": "x.ckpt",
            "checkpoint_sha256": "0" * 64,
            "score": "attention",
            "raw_score": "attention weight",
            "scale": "minmax of attention",
            "bag_probability": 0.9,
            "predicted_class": "tumor",
            "normalize": "minmax",
            "threshold": 0.5,
            "colormap": "jet",
            "tile_size": TS,
            "mpp": 0.5,
            "level0_size": [info.width, info.height],
            "bounds": [0, 0],
            "n_tiles": len(rows),
            "n_regions": 1,
            "created": "2026-01-01T00:00:00Z",
            "pathopeft_version": "0.1.0",
        },
    )
    (out / f"{slide_id}.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    with open(out / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "slide_id",
                "status",
                "error",
                "task",
                "class",
                "bag_probability",
                "predicted_class",
                "n_tiles",
                "n_regions",
                "slide_path",
                "files",
            ]
        )
        w.writerow(
            [
                slide_id,
                "ok",
                "",
                task,
                "tumor",
                0.9,
                "tumor",
                len(rows),
                1,
                str(info.path.resolve()),
                f"{slide_id}.json;{slide_id}.csv;{slide_id}.geojson",
            ]
        )
    return out
