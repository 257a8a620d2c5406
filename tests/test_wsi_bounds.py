"""OpenSlide bounds: QuPath's GeoJSON frame starts at ``openslide.bounds-x/y`` (issue 13 item 5).

MRXS and some SVS files have bounds; none of the shared slides does, so a slide with bounds is
simulated by giving a real TIFF reader OpenSlide's bounds properties. The tile stage records the
offset (coords and bag attrs) and every GeoJSON read for tile labels adds it back.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pathopeft.config.train import DataConfig
from pathopeft.config.wsi import GridConfig, TissueConfig
from pathopeft.mil.data import SlideItem, compute_tile_labels
from pathopeft.wsi import TileGrid, detect_tissue, open_slide, read_coords, write_coords
from pathopeft.wsi.annotations import read_annotations, read_geojson, tile_labels
from pathopeft.wsi.synth import make_synthetic_slide

BOUNDS = (1000, 600)


def _square_geojson(path: Path, x: float, y: float, side: float) -> Path:
    ring = [[x, y], [x + side, y], [x + side, y + side], [x, y + side], [x, y]]
    feature = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
               "properties": {"objectType": "annotation", "classification": {"name": "Tumor"}}}  # fmt: skip
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
    return path


def test_read_geojson_adds_the_offset(tmp_path: Path) -> None:
    path = _square_geojson(tmp_path / "a.geojson", 10, 20, 5)
    (region,) = read_geojson(path, offset=BOUNDS)
    assert region.bounds() == (1010.0, 620.0, 1015.0, 625.0)
    assert read_annotations(path, bounds_offset=BOUNDS)[0].bounds() == region.bounds()
    assert read_annotations(path)[0].bounds() == (10.0, 20.0, 15.0, 25.0)  # no bounds: unchanged


def test_bounds_reach_the_tile_labels(tmp_path: Path) -> None:
    path = tmp_path / "s.tiff"
    make_synthetic_slide(path, width=2048, height=2048, seed=2, tile=256, lesions=False)
    slide = open_slide(path)
    slide._props.update({"openslide.bounds-x": str(BOUNDS[0]), "openslide.bounds-y": str(BOUNDS[1])})
    assert slide.bounds_offset == BOUNDS
    grid = TileGrid.from_tissue(slide, detect_tissue(slide, TissueConfig()), GridConfig(target_mpp=0.5))
    assert grid.bounds_offset == BOUNDS and len(grid) > 4
    bag = tmp_path / "features" / "s.h5"
    bag.parent.mkdir()
    write_coords(bag, grid)
    assert read_coords(bag).bounds_offset == BOUNDS

    # QuPath draws the tumour exactly over tile k, in its bounds-cropped frame.
    k = len(grid) // 2
    x, y = (int(v) for v in grid.coords[k])
    side = grid.tile_size_level0
    ann = tmp_path / "ann"
    ann.mkdir()
    _square_geojson(ann / "s.geojson", x - BOUNDS[0], y - BOUNDS[1], side)
    item = SlideItem("s", 1, "train", bag, len(grid))
    labels = compute_tile_labels([item], DataConfig(annotations=str(ann)), None)["s"]
    assert labels.tolist() == [1 if i == k else 0 for i in range(len(grid))]
    # Without the offset the polygon lands on another tile (the bug this guards).
    shifted = tile_labels(read_geojson(ann / "s.geojson"), grid.coords, side)
    assert shifted[k] == 0 and np.asarray(labels).sum() == 1
