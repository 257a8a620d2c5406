"""Heatmap building blocks without a model: score raster, shown scale, GeoJSON, TIFF, FROC."""

from __future__ import annotations

import json
import math
import uuid

import matplotlib
import numpy as np
import openslide
import pytest
import shapely
from shapely.geometry import shape

from pathopeft.config import ConfigError, load_config
from pathopeft.config.heatmap import HeatmapConfig
from pathopeft.heatmaps.froc import SlideFroc, evaluation_mask, froc_score, nms_detections, write_detections
from pathopeft.heatmaps.geojson import build_feature_collection, write_geojson
from pathopeft.heatmaps.pyramid import level_dimensions, write_pyramid
from pathopeft.heatmaps.raster import build_grid, region_geometries
from pathopeft.heatmaps.scoring import display_scores, normalize


def test_overlapping_tiles_are_averaged_on_the_stride_grid():
    # two 100-px tiles at stride 50: the shared 50-px strip holds their mean
    grid = build_grid(np.array([[0, 0], [50, 0]]), 100, np.array([0.2, 0.8]), 200, 100)
    assert grid.cell == 50 and grid.values.shape == (2, 3)
    np.testing.assert_allclose(grid.values[0], [0.2, 0.5, 0.8], atol=1e-6)
    assert grid.valid.all()


def test_smoothing_keeps_isolated_scores_and_ignores_no_data():
    coords = np.array([[0, 0], [400, 0]])
    grid = build_grid(coords, 100, np.array([0.6, 0.6]), 500, 100, smooth_sigma_px=150)
    assert grid.valid.sum() == 2  # no-data cells stay no-data
    np.testing.assert_allclose(grid.values[grid.valid], 0.6, atol=1e-5)  # normalised convolution


def test_regions_keep_holes_and_are_valid():
    # a 3x3 ring of hot tiles around a cold one: one polygon with one hole
    xs, ys = np.meshgrid(np.arange(3) * 10 + 5, np.arange(3) * 10 + 5)
    coords = np.stack([xs.ravel(), ys.ravel()], 1)
    scores = np.ones(9)
    scores[4] = 0.0
    grid = build_grid(coords, 10, scores, 40, 40)
    (geom, mean, peak, cells), *rest = region_geometries(grid, 0.5)
    assert not rest and cells == 8 and mean == pytest.approx(1.0) and peak == pytest.approx(1.0)
    assert geom.geom_type == "Polygon" and len(geom.interiors) == 1
    assert geom.area == pytest.approx(800) and geom.is_valid


def test_gate_keeps_a_negative_slide_cold_while_minmax_paints_it_hot():
    attention = np.array([0.1, 0.2, 0.7])
    assert normalize(attention, "minmax").max() == 1.0  # relative: always a hot tile
    shown = display_scores(attention, "minmax", "bag_probability", bag_probability=0.1)
    assert shown.max() == pytest.approx(0.1) and (shown < 0.5).all()
    hot = display_scores(attention, "minmax", "bag_probability", bag_probability=0.95)
    assert hot.max() == pytest.approx(0.95)
    np.testing.assert_allclose(normalize(attention, "rank"), [0, 0.5, 1])
    np.testing.assert_allclose(normalize(np.array([0.3, 0.3]), "minmax"), [0.5, 0.5])


def test_config_rejects_unknown_keys_and_colormaps(tmp_path):
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(HeatmapConfig, None, ["tresh=0.4"])
    with pytest.raises(ConfigError, match="colormap"):
        load_config(HeatmapConfig, None, ["colormap=nope"])
    cfg = load_config(HeatmapConfig, "configs/heatmap_default.yaml", ["formats=[csv, csv]"])
    assert cfg.formats == ["csv"] and cfg.gate == "bag_probability"


def _check_polygon_rings(geometry: dict) -> None:
    polys = [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]
    for rings in polys:
        for ring in rings:
            assert len(ring) >= 4 and ring[0] == ring[-1]


def test_geojson_qupath_rules_and_bounds_offset(tmp_path):
    coords = np.array([[100, 200], [164, 200], [100, 264]])
    geoms = region_geometries(build_grid(coords, 64, np.array([0.9, 0.8, 0.1]), 1000, 1000), 0.5)
    measurements = {"score": np.array([0.9, 0.8, 0.1]), "attention": np.array([np.nan, 0.5, 0.2])}
    fc = build_feature_collection("s", coords, 64, measurements, geoms, class_name="tumor", bounds=(30, 40))
    path = write_geojson(tmp_path / "s.geojson", fc, gzip_it=False)
    back = json.loads(path.read_text())
    tiles = [f for f in back["features"] if f["properties"]["objectType"] == "tile"]
    regions = [f for f in back["features"] if f["properties"]["objectType"] == "annotation"]
    assert len(tiles) == 3 and len(regions) == 1
    assert tiles[0]["geometry"]["coordinates"][0][0] == [70, 160]  # minus bounds
    assert "attention" not in tiles[0]["properties"]["measurements"]  # NaN dropped, never written
    for f in back["features"]:
        uuid.UUID(f["id"])
        assert f["properties"]["isLocked"] is True
        assert all(
            isinstance(v, float) and math.isfinite(v) for v in f["properties"]["measurements"].values()
        )
        _check_polygon_rings(f["geometry"])
        g = shape(f["geometry"])
        assert g.is_valid and shapely.set_precision(g, 0.01).is_valid
    cls = regions[0]["properties"]["classification"]
    assert cls["name"] == "tumor" and len(cls["color"]) == 3
    assert shape(regions[0]["geometry"]).area == pytest.approx(2 * 64 * 64)
    gz = write_geojson(tmp_path / "s.geojson", fc, gzip_it=True)
    assert gz.name == "s.geojson.gz"


def test_pyramid_opens_in_openslide_with_levels_and_mpp(tmp_path):
    coords = np.array([[0, 0], [256, 0], [0, 256]])
    grid = build_grid(coords, 256, np.array([0.0, 0.5, 1.0]), 1500, 900)
    dims = write_pyramid(
        tmp_path / "h.tiff", grid, colormap="viridis", mpp=0.25, tile=256, compression="deflate"
    )
    assert dims == level_dimensions(1500, 900, 256) == [(1500, 900), (750, 450), (375, 225), (188, 113)]
    slide = openslide.OpenSlide(str(tmp_path / "h.tiff"))
    assert slide.level_dimensions == tuple(dims)
    assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.25)
    region = np.asarray(slide.read_region((0, 0), 0, (1500, 900)).convert("RGB"))
    expect = (np.asarray(matplotlib.colormaps["viridis"](0.5)[:3]) * 255 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(region[10, 300], expect)  # exact with deflate
    np.testing.assert_array_equal(region[800, 1400], [255, 255, 255])  # no data: white glass
    low = np.asarray(slide.read_region((0, 0), 3, dims[3]).convert("RGB"))
    np.testing.assert_array_equal(low[5, 40], expect)


def test_nms_keeps_local_maxima():
    coords = np.array([[0, 0], [10, 0], [200, 0]])
    probs, xy = nms_detections(coords, 10, np.array([0.9, 0.8, 0.5]), radius_px=50)
    np.testing.assert_allclose(probs, [0.9, 0.5])
    assert xy.tolist() == [[5, 5], [205, 5]]


def test_froc_equals_a_hand_computed_case(tmp_path):
    """Slide A: lesions L1, L2 (2 mm squares) and an isolated tumour cell (20 µm); slide B normal.

    Detections, A: L1 at 0.9 and 0.6 (the second is neither TP nor FP), L2 at 0.4, the ITC at 0.95
    (excluded: neither), background at 0.8; B: background at 0.7 and 0.3.
    FP = {0.8, 0.7, 0.3}, TP = {L1: 0.9, L2: 0.4}, 2 lesions, 2 slides. Thresholds (MONAI and the
    official script skip the lowest, 0.3): 0.4 → (FP/slide 1.0, sens 1.0); 0.7 → (1.0, 0.5);
    0.8 → (0.5, 0.5); 0.9 → (0, 0.5); plus (0, 0). Sensitivity at 1/4, 1/2 FPs = 0.5; at 1 FP the
    curve's last point (1.0, 1.0); at 2, 4, 8 beyond it, 1.0. FROC = (0.5 + 0.5 + 4 · 1.0) / 6 = 5/6.
    """
    mpp = 0.5
    l1 = shapely.box(1000, 1000, 5000, 5000)
    l2 = shapely.box(10000, 1000, 14000, 5000)
    itc = shapely.box(8000, 9000, 8040, 9040)
    mask_a, itc_a = evaluation_mask(shapely.union_all([l1, l2, itc]), (16000, 12000), mpp)
    assert mask_a.shape == (375, 500) and int(mask_a.max()) == 3 and len(itc_a) == 1
    det_a = np.array(
        [[0.9, 3000, 3000], [0.6, 2000, 2000], [0.4, 12000, 3000], [0.95, 8020, 9020], [0.8, 8000, 2000]]
    )
    mask_b, itc_b = evaluation_mask(shapely.Polygon(), (16000, 12000), mpp)
    det_b = np.array([[0.7, 500, 500], [0.3, 9000, 9000]])
    slides = [
        SlideFroc("A", det_a[:, 0], det_a[:, 1:].astype(int), mask_a, itc_a),
        SlideFroc("B", det_b[:, 0], det_b[:, 1:].astype(int), mask_b, itc_b),
    ]
    report = froc_score(slides)
    assert report["froc"] == pytest.approx(5 / 6)
    assert report["n_lesions"] == 2 and report["sensitivity_at"]["0.25"] == pytest.approx(0.5)
    write_detections(tmp_path / "A.csv", det_a[:, 0], det_a[:, 1:].astype(int))
    lines = (tmp_path / "A.csv").read_text().splitlines()
    assert lines[0] == "0.900000,3000,3000" and len(lines) == 5


def test_froc_grows_lesions_by_the_official_distance():
    # two lesions 40 µm apart merge (grown by 75/2 µm each side); 200 µm apart they stay two
    mpp = 0.5
    near = shapely.union_all([shapely.box(0, 0, 2000, 2000), shapely.box(2080, 0, 4080, 2000)])
    far = shapely.union_all([shapely.box(0, 0, 2000, 2000), shapely.box(2400, 0, 4400, 2000)])
    assert evaluation_mask(near, (8000, 4000), mpp)[0].max() == 1
    assert evaluation_mask(far, (8000, 4000), mpp)[0].max() == 2


def test_ome_tiff_holds_the_float_scores_in_a_subifd_pyramid(tmp_path):
    import tifffile

    from pathopeft.heatmaps.ome import write_ome_scores

    grid = build_grid(np.array([[0, 0], [256, 0]]), 256, np.array([0.25, 0.75]), 1000, 600)
    write_ome_scores(tmp_path / "h.ome.tiff", grid, mpp=0.5, tile=256)
    with tifffile.TiffFile(tmp_path / "h.ome.tiff") as tif:
        assert tif.is_ome and len(tif.pages) == 1  # reduced levels are SubIFDs, not main pages
        levels = tif.series[0].levels
        assert [lv.shape for lv in levels] == [(600, 1000), (300, 500), (150, 250)]
        full = levels[0].asarray()
        assert full[10, 10] == pytest.approx(0.25) and full[10, 300] == pytest.approx(0.75)
        assert np.isnan(full[500, 900])  # no data
        assert 'PhysicalSizeX="0.5"' in tif.ome_metadata


def test_threaded_tile_encoding_writes_the_same_pixels(tmp_path):
    rng = np.random.default_rng(1)
    xs, ys = np.meshgrid(np.arange(0, 2000, 100), np.arange(0, 1500, 100))
    coords = np.stack([xs.ravel(), ys.ravel()], 1)
    grid = build_grid(coords, 100, rng.random(len(coords)), 2100, 1600)
    for workers in (1, 3):
        write_pyramid(tmp_path / f"w{workers}.tiff", grid, colormap="jet", mpp=0.5, tile=256, workers=workers)
    a, b = (openslide.OpenSlide(str(tmp_path / f"w{n}.tiff")) for n in (1, 3))
    assert a.level_dimensions == b.level_dimensions
    for level in range(a.level_count):
        size = a.level_dimensions[level]
        np.testing.assert_array_equal(
            np.asarray(a.read_region((0, 0), level, size)), np.asarray(b.read_region((0, 0), level, size))
        )
