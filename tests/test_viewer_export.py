"""The viewer over a real ``pathopeft heatmap`` export (not the hand-written fixture).

Guards the contract between the two: the regions the viewer draws are the exporter's own region
annotations (gzipped GeoJSON, slide with bounds) moved back to the full frame the DeepZoom layers
show, and the per-tile outline at the export threshold comes from the same CSV scores.
"""

from __future__ import annotations

import gzip
import json
import shutil
import sys
from pathlib import Path

import pytest
import shapely
from shapely import affinity
from shapely.geometry import shape

sys.path.insert(0, str(Path(__file__).parent))
from _heatmap_cohort import build_cohort

from pathopeft.config import load_config
from pathopeft.config.heatmap import HeatmapConfig
from pathopeft.heatmaps import processor
from pathopeft.heatmaps.processor import run_heatmaps
from pathopeft.viewer import create_app

BOUNDS = (100, 60)


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    root = tmp_path_factory.mktemp("viewer_export")
    cohort = build_cohort(root)
    feats = root / "one"
    feats.mkdir()
    shutil.copy(cohort.features / "t0.h5", feats)  # the held-out tumour slide
    real = processor.read_geometry

    def with_bounds(path, max_px, mpp=None):  # as for a slide with openslide.bounds-x/y
        geo = real(path, max_px, mpp)
        geo.bounds = BOUNDS
        return geo

    out = root / "heatmaps"
    cfg = load_config(HeatmapConfig, None, ["formats=[csv, geojson]", "geojson_gzip=true"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(processor, "read_geometry", with_bounds)
        result = run_heatmaps(cohort.checkpoint, cohort.slides / "t0.tiff", feats, out, cfg)
    assert result.n_ok == 1
    return out


def test_viewer_draws_the_exporters_regions_in_the_full_frame(export):
    data = json.loads(gzip.decompress((export / "t0.geojson.gz").read_bytes()))
    written = [f for f in data["features"] if f["properties"]["objectType"] == "annotation"]
    assert written, "the tumour slide should have exported regions"
    task = json.loads((export / "t0.json").read_text())["task"]
    c = create_app(export).test_client()
    got = c.get(f"/api/{task}/t0/regions").get_json()
    assert got["source"] == "t0.geojson.gz" and len(got["features"]) == len(written)
    for g, w in zip(got["features"], written):
        moved = affinity.translate(shape(w["geometry"]), *BOUNDS)
        assert shape(g["geometry"]).equals(moved)
        assert g["properties"]["score_max"] == w["properties"]["measurements"]["score_max"]
    # the slider's outline at the export threshold covers the exported regions (same scores, and
    # before min_region_tiles drops anything)
    thr = got["threshold"]
    above = shapely.union_all(
        [shape(f["geometry"]) for f in c.get(f"/api/{task}/t0/above?threshold={thr}").get_json()["features"]]
    )
    regions = shapely.union_all([shape(f["geometry"]) for f in got["features"]])
    assert regions.difference(above).area < 1e-6 * regions.area


def test_without_the_csv_the_exporters_gzipped_geojson_tiles_give_the_same_scores(export, tmp_path):
    """``formats`` without csv: the viewer reads the tile scores from the real exporter's GeoJSON."""
    task = json.loads((export / "t0.json").read_text())["task"]
    urls = [f"/api/{task}/t0/above?threshold=0.5"] + [
        f"/api/{task}/t0/score?x={x}&y={y}" for x, y in ((150, 100), (700, 500), (1200, 900), (2000, 1500))
    ]
    want = [create_app(export).test_client().get(u).get_json() for u in urls]
    copy = tmp_path / "no_csv"
    shutil.copytree(export, copy)
    (copy / "t0.csv").unlink()
    c = create_app(copy).test_client()
    assert c.get(f"/api/{task}/t0/info").get_json()["scores"] == "t0.geojson.gz"
    got = [c.get(u).get_json() for u in urls]
    for g, w in zip(got[1:], want[1:]):  # None where no tile lies under the point (pytest ≥ 9.2's
        # approx refuses None with a relative tolerance, so compare those separately)
        assert (g["score"] is None) == (w["score"] is None), (g, w)
        if w["score"] is not None:
            assert g["score"] == pytest.approx(w["score"], rel=1e-5)
    assert any(w["score"] is not None for w in want[1:])
    area = lambda g: shapely.union_all([shape(f["geometry"]) for f in g["features"]])  # noqa: E731
    assert area(got[0]).symmetric_difference(area(want[0])).area < 1e-6 * max(area(want[0]).area, 1)
