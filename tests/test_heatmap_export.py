"""``pathopeft heatmap`` on synthetic slides with planted lesions and a model trained on them.

The model (tests/_heatmap_cohort.py) is an ABMIL trained on bag labels only, on colour-statistics
tile features of 6 slides; t0 (tumour) and t1 (normal) are held out. Its attention is what puts
the regions on the lesions: nothing here controls the scores.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import sys
import uuid
from pathlib import Path

import numpy as np
import openslide
import pytest
import shapely
from click.testing import CliRunner
from PIL import Image
from shapely.geometry import shape

sys.path.insert(0, str(Path(__file__).parent))
from _heatmap_cohort import HELD_OUT, TRAIN, build_cohort

from pathopeft.bags import FeatureBag, read_bag, write_bag
from pathopeft.cli import main
from pathopeft.config import load_config
from pathopeft.config.heatmap import HeatmapConfig
from pathopeft.heatmaps import processor
from pathopeft.heatmaps.processor import MANIFEST_COLUMNS, run_heatmaps
from pathopeft.heatmaps.scoring import display_scores

CONTRACT_KEYS = [
    "slide_id", "slide_path", "task", "class", "classes", "model", "checkpoint", "checkpoint_sha256",
    "score", "raw_score", "scale", "bag_probability", "predicted_class", "normalize", "threshold",
    "colormap", "tile_size", "mpp", "level0_size", "bounds", "n_tiles", "n_regions", "created",
    "pathopeft_version",
]  # fmt: skip
MAX_PX = 512


def _cfg(*sets: str) -> HeatmapConfig:
    return load_config(HeatmapConfig, None, [f"overlay.max_px={MAX_PX}", "tiff.tile=256", *sets])


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    c = build_cohort(tmp_path_factory.mktemp("heatmap_cohort"))
    ann = c.root / "annotations"
    ann.mkdir()
    for sid, info in c.infos.items():
        (ann / f"{sid}.geojson").write_text(json.dumps(info.geojson()))
    return c


@pytest.fixture(scope="module")
def exported(cohort):
    out = cohort.root / "heatmaps"
    result = run_heatmaps(cohort.checkpoint, cohort.slides, cohort.features, out, _cfg())
    return out, result


def _lesion(cohort, sid):
    return shapely.union_all([shapely.Polygon(p) for p in cohort.infos[sid].lesion_polygons])


def _regions(out: Path, sid: str):
    data = json.loads((out / f"{sid}.geojson").read_text())
    return [shape(f["geometry"]) for f in data["features"] if f["properties"]["objectType"] == "annotation"]


def test_regions_overlap_the_planted_lesions(cohort, exported):
    out, result = exported
    assert result.n_ok == len(TRAIN + HELD_OUT) and result.n_error == 0
    for sid in ("s0", "t0"):  # a training slide and the held-out tumour slide
        pred, truth = shapely.union_all(_regions(out, sid)), _lesion(cohort, sid)
        iou = pred.intersection(truth).area / pred.union(truth).area
        assert iou > 0.5, (sid, iou)


def test_negative_slides_draw_no_regions(cohort, exported):
    out, result = exported
    for row in result.rows:
        if cohort.infos[row["slide_id"]].lesion_polygons:
            continue
        assert row["predicted_class"] == "normal" and row["n_regions"] == 0
        scores = np.loadtxt(out / f"{row['slide_id']}.csv", delimiter=",", skiprows=1)[:, 4]
        assert scores.max() < 0.5
        # the rule matters: the same attention min-max without the gate paints hot tiles
        attention = np.loadtxt(out / f"{row['slide_id']}.csv", delimiter=",", skiprows=1)[:, 5]
        assert display_scores(attention, "minmax", "none", 0.0).max() == 1.0


def test_geojson_is_valid_for_qupath(cohort, exported):
    out, _ = exported
    for sid in ("t0", "t1"):
        w, h = cohort.infos[sid].width, cohort.infos[sid].height
        frame = shapely.box(0, 0, w, h)
        data = json.loads((out / f"{sid}.geojson").read_text())
        assert data["type"] == "FeatureCollection"
        n_tiles = 0
        for f in data["features"]:
            props = f["properties"]
            uuid.UUID(f["id"])
            assert props["isLocked"] is True and props["objectType"] in ("tile", "annotation")
            assert props["measurements"] and all(
                isinstance(v, float) and math.isfinite(v) for v in props["measurements"].values()
            )
            geom = shape(f["geometry"])
            assert geom.is_valid and shapely.set_precision(geom, 0.01).is_valid
            assert frame.buffer(1e-6).contains(geom)
            rings = (
                [f["geometry"]["coordinates"]]
                if f["geometry"]["type"] == "Polygon"
                else f["geometry"]["coordinates"]
            )
            assert all(len(r) >= 4 and r[0] == r[-1] for poly in rings for r in poly)
            if props["objectType"] == "annotation":
                assert (
                    props["classification"]["name"] == "tumor" and len(props["classification"]["color"]) == 3
                )
                assert {"score_mean", "score_max"} <= set(props["measurements"])
            else:
                n_tiles += 1
        assert n_tiles == read_bag(cohort.features / f"{sid}.h5").n_tiles


def test_png_tiff_csv_json_and_manifest_follow_the_contract(cohort, exported):
    out, result = exported
    sid = "t0"
    slide = openslide.OpenSlide(str(cohort.slides / f"{sid}.tiff"))
    thumb = slide.get_thumbnail((MAX_PX, MAX_PX))
    assert Image.open(out / f"{sid}.png").size == thumb.size
    heat = openslide.OpenSlide(str(out / f"{sid}.tiff"))
    assert heat.dimensions == slide.dimensions
    assert heat.level_count == 5 and heat.level_dimensions[1] == (2048, 2048)
    assert float(heat.properties["openslide.mpp-x"]) == pytest.approx(
        float(slide.properties["openslide.mpp-x"])
    )
    meta = json.loads((out / f"{sid}.json").read_text())
    assert list(meta)[: len(CONTRACT_KEYS)] == CONTRACT_KEYS
    assert (
        meta["level0_size"] == [4096, 4096] and meta["tile_size"] == 128 and meta["mpp"] == pytest.approx(0.5)
    )
    assert meta["score"] == "attention" and "bag probability" in meta["scale"] and meta["raw_score"]
    assert len(meta["checkpoint_sha256"]) == 64 and meta["predicted_class"] == "tumor"
    with open(out / f"{sid}.csv") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["x", "y", "width", "height", "score", "attention", "probability"]
    bag = read_bag(cohort.features / f"{sid}.h5")
    assert len(rows) - 1 == bag.n_tiles and [int(v) for v in rows[1][:4]] == [
        *bag.coords[0].tolist(),
        128,
        128,
    ]
    att = np.array([float(r[5]) for r in rows[1:]])
    assert att.sum() == pytest.approx(1.0, abs=1e-4)
    with open(out / "manifest.csv") as fh:
        manifest = list(csv.DictReader(fh))
    assert list(manifest[0]) == MANIFEST_COLUMNS and len(manifest) == len(result.rows)
    ok = {r["slide_id"]: r for r in manifest}
    assert ok[sid]["files"].split(";") == [f"{sid}.csv", f"{sid}.geojson", f"{sid}.png", f"{sid}.tiff"]
    assert Path(ok[sid]["slide_path"]).is_absolute()


def test_smoothing_in_um_keeps_scores_in_range_and_changes_the_map(cohort, tmp_path):
    feats = tmp_path / "f"
    feats.mkdir()
    shutil.copy(cohort.features / "t0.h5", feats)
    out = tmp_path / "o"
    cfg = _cfg("formats=[png]", "smooth_um=200")
    row = run_heatmaps(cohort.checkpoint, cohort.slides / "t0.tiff", feats, out, cfg).rows[0]
    assert row["status"] == "ok" and json.loads((out / "t0.json").read_text())["smooth_um"] == 200
    smoothed = np.asarray(Image.open(tmp_path / "o" / "t0.png"))
    run_heatmaps(cohort.checkpoint, cohort.slides / "t0.tiff", feats, tmp_path / "p", _cfg("formats=[png]"))
    assert (np.asarray(Image.open(tmp_path / "p" / "t0.png")) != smoothed).any()


def test_bounds_shift_geojson_but_not_csv(cohort, monkeypatch, tmp_path):
    real = processor.read_geometry

    def with_bounds(path, max_px, mpp=None):
        geo = real(path, max_px, mpp)
        geo.bounds = (100, 60)
        return geo

    monkeypatch.setattr(processor, "read_geometry", with_bounds)
    feats = tmp_path / "f"
    feats.mkdir()
    shutil.copy(cohort.features / "t0.h5", feats)
    out = tmp_path / "o"
    run_heatmaps(cohort.checkpoint, cohort.slides / "t0.tiff", feats, out, _cfg("formats=[csv, geojson]"))
    first = json.loads((out / "t0.geojson").read_text())["features"][0]["geometry"]["coordinates"][0][0]
    x, y = read_bag(feats / "t0.h5").coords[0].tolist()
    assert first == [x - 100, y - 60]
    assert json.loads((out / "t0.json").read_text())["bounds"] == [100, 60]
    assert np.loadtxt(out / "t0.csv", delimiter=",", skiprows=1)[0, :2].tolist() == [x, y]


def test_bad_inputs_are_error_rows_and_the_rest_completes(cohort, tmp_path):
    slides, feats = tmp_path / "slides", tmp_path / "features"
    slides.mkdir()
    feats.mkdir()
    shutil.copy(cohort.slides / "t0.tiff", slides / "good.tiff")
    shutil.copy(cohort.features / "t0.h5", feats / "good.h5")
    shutil.copy(cohort.slides / "t1.tiff", slides / "nobag.tiff")
    shutil.copy(cohort.features / "t1.h5", feats / "noslide.h5")
    shutil.copy(cohort.slides / "t1.tiff", slides / "wrongdim.tiff")
    bag = read_bag(cohort.features / "t1.h5")
    write_bag(
        feats / "wrongdim.h5", FeatureBag("wrongdim", np.zeros((bag.n_tiles, 5), np.float32), bag.coords, {})
    )
    shutil.copy(cohort.slides / "t1.tiff", slides / "otherbackbone.tiff")
    write_bag(
        feats / "otherbackbone.h5", FeatureBag("otherbackbone", bag.features, bag.coords, {"backbone": "uni"})
    )
    (slides / "broken.tiff").write_bytes(b"not a tiff at all")
    shutil.copy(cohort.features / "t1.h5", feats / "broken.h5")
    out = tmp_path / "out"
    result = run_heatmaps(cohort.checkpoint, slides, feats, out, _cfg("formats=[csv]", "backbone=colorstats"))
    rows = {r["slide_id"]: r for r in result.rows}
    assert rows["good"]["status"] == "ok"
    errors = {k: r["error"] for k, r in rows.items() if r["status"] == "error"}
    assert set(errors) == {"nobag", "noslide", "wrongdim", "otherbackbone", "broken"}
    assert "no feature bag" in errors["nobag"] and "nobag.tiff" in errors["nobag"]
    assert "no slide" in errors["noslide"] and "noslide.h5" in errors["noslide"]
    assert "5-dimensional" in errors["wrongdim"] and "8" in errors["wrongdim"]
    assert "'uni'" in errors["otherbackbone"]
    assert "broken.tiff" in errors["broken"]
    with open(out / "manifest.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 6
    # a task the checkpoint lacks: an error row per slide naming the tasks it has
    bad = run_heatmaps(cohort.checkpoint, slides, feats, tmp_path / "o2", _cfg("formats=[csv]", "task=nope"))
    assert all(
        r["status"] == "error" and "'nope'" in r["error"] and "camelyon16" in r["error"] for r in bad.rows
    )


def test_rerun_reuses_finished_slides(cohort, exported):
    out, result = exported
    before = json.loads((out / "t1.json").read_text())["created"]
    again = run_heatmaps(cohort.checkpoint, cohort.slides, cohort.features, out, _cfg())
    assert [r["slide_id"] for r in again.rows] == [r["slide_id"] for r in result.rows]
    assert json.loads((out / "t1.json").read_text())["created"] == before
    assert again.seconds < result.seconds  # nothing recomputed (not a timing test: no limit is set)


def test_cli_with_annotations_writes_froc(cohort, tmp_path):
    out = tmp_path / "cli"
    args = [
        "heatmap",
        str(cohort.checkpoint),
        "--slides",
        str(cohort.slides),
        "--features",
        str(cohort.features),
    ]
    args += ["--out", str(out), "--formats", "csv,geojson", "--annotations", str(cohort.root / "annotations")]
    args += ["--set", "geojson_gzip=true", "--set", "froc.nms_radius_um=300"]
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "FROC =" in res.output
    report = json.loads((out / "froc.json").read_text())
    assert report["n_slides"] == 8 and report["n_lesions"] == 4
    assert 0.0 <= report["froc"] <= 1.0 and report["sensitivity_at"]["8"] >= 0.75  # found >= 3 of 4 lesions
    det = (out / "froc" / "t0.csv").read_text().splitlines()
    p, x, y = det[0].split(",")
    assert 0 <= float(p) <= 1 and x.isdigit() and y.isdigit()
    import gzip

    with gzip.open(out / "t0.geojson.gz", "rt") as fh:
        features = json.load(fh)["features"]
    assert all(shape(f["geometry"]).is_valid for f in features)
    assert (
        sum(f["properties"]["objectType"] == "tile" for f in features)
        == read_bag(cohort.features / "t0.h5").n_tiles
    )
    bad = CliRunner().invoke(main, [*args[:8], "--set", "nope=1"])
    assert bad.exit_code == 2 and "nope: unknown key" in bad.output
