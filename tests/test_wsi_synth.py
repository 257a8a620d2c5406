"""Synthetic slides: OpenSlide opens every level with the µm/px; labels, GeoJSON and pixels agree."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
from click.testing import CliRunner

from pathopeft.cli import main
from pathopeft.config.wsi import SynthConfig
from pathopeft.wsi.synth import make_synthetic_cohort, make_synthetic_slide, polygon_area


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cohort")
    result = CliRunner().invoke(main, ["synth", str(out), "--n", "4", "--seed", "7", "--size", "2048"])
    assert result.exit_code == 0, result.output
    return out


def test_openslide_opens_all_levels_with_mpp(cohort: Path) -> None:
    slides = sorted(cohort.glob("*.tiff"))
    assert [p.stem for p in slides] == ["synth_000", "synth_001", "synth_002", "synth_003"]
    for path in slides:
        osr = openslide.OpenSlide(str(path))
        assert osr.properties["openslide.vendor"] == "generic-tiff"
        assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(0.5)
        assert float(osr.properties["openslide.mpp-y"]) == pytest.approx(0.5)
        assert osr.level_dimensions == ((2048, 2048), (1024, 1024), (512, 512), (256, 256))
        assert osr.level_downsamples == (1.0, 2.0, 4.0, 8.0)
        with tifffile.TiffFile(path) as tif:  # reduced levels flagged, tiled JPEG
            assert [p.subfiletype for p in tif.pages] == [0, 1, 1, 1]
            assert all(p.is_tiled and p.compression == 7 for p in tif.pages)


def test_labels_and_geojson_are_consistent(cohort: Path) -> None:
    with open(cohort / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["slide_id"] for r in rows] == [f"synth_{i:03d}" for i in range(4)]
    assert sorted(r["label"] for r in rows) == ["normal", "normal", "tumor", "tumor"]  # lesion_fraction 0.5
    for row in rows:
        data = json.loads((cohort / "annotations" / f"{row['slide_id']}.geojson").read_text())
        assert data["type"] == "FeatureCollection"
        assert (len(data["features"]) > 0) == (row["label"] == "tumor")
        osr = openslide.OpenSlide(str(cohort / f"{row['slide_id']}.tiff"))
        for feature in data["features"]:
            assert feature["geometry"]["type"] == "Polygon"
            assert feature["properties"]["classification"]["name"] == "Tumor"
            assert len(feature["properties"]["classification"]["color"]) == 3
            ring = np.array(feature["geometry"]["coordinates"][0])
            assert (ring[0] == ring[-1]).all() and polygon_area(ring[:-1]) > 0
            # The lesion is visibly different where the GeoJSON says: darker than normal tissue.
            cx, cy = ring[:-1].mean(axis=0)
            inside = np.asarray(osr.read_region((int(cx) - 16, int(cy) - 16), 0, (32, 32)))[..., :3]
            assert inside.mean() < 180


def test_deterministic_given_seed(tmp_path: Path) -> None:
    a = make_synthetic_slide(tmp_path / "a.tiff", width=1024, height=768, seed=3, tile=128)
    b = make_synthetic_slide(tmp_path / "b.tiff", width=1024, height=768, seed=3, tile=128)
    c = make_synthetic_slide(tmp_path / "c.tiff", width=1024, height=768, seed=4, tile=128)
    assert (tmp_path / "a.tiff").read_bytes() == (tmp_path / "b.tiff").read_bytes()
    assert (tmp_path / "a.tiff").read_bytes() != (tmp_path / "c.tiff").read_bytes()
    assert a.tissue_area_px == b.tissue_area_px != c.tissue_area_px


def test_truth_geometry(tmp_path: Path) -> None:
    info = make_synthetic_slide(tmp_path / "t.tiff", width=3000, height=2000, seed=9, n_tissue=4, lesions=2)
    assert len(info.tissue_polygons) == 4 and len(info.lesion_polygons) == 2 and info.label == "tumor"
    tissue, lesion = info.mask(4.0), info.mask(4.0, lesion=True)
    assert (lesion <= tissue).all()  # lesions lie inside tissue
    assert tissue.sum() * 16 == pytest.approx(info.tissue_area_px, rel=0.02)
    # Pixels agree with the truth: glass is white, tissue is not.
    image = openslide.OpenSlide(str(info.path)).read_region((0, 0), 2, (750, 500))
    rgb = np.asarray(image)[..., :3].astype(int)
    sat = rgb.max(axis=2) - rgb.min(axis=2)
    t = tissue[:500, :750].astype(bool)
    assert (sat[~t] < 10).mean() > 0.98 and (sat[t] > 30).mean() > 0.95


def test_variants_blank_fluorescence_no_mpp(tmp_path: Path) -> None:
    blank = make_synthetic_slide(tmp_path / "blank.tiff", width=1024, height=1024, modality="blank")
    assert blank.tissue_polygons == [] and blank.label == "normal"
    assert (
        np.asarray(openslide.OpenSlide(str(blank.path)).read_region((0, 0), 0, (1024, 1024)))[..., :3] > 250
    ).all()
    fluo = make_synthetic_slide(tmp_path / "fluo.tiff", width=1024, height=1024, modality="fluorescence")
    corner = np.asarray(openslide.OpenSlide(str(fluo.path)).read_region((0, 0), 0, (16, 16)))[..., :3]
    assert corner.max() < 40  # dark background
    nompp = make_synthetic_slide(tmp_path / "nompp.tiff", width=512, height=512, mpp=None, tile=128)
    assert "openslide.mpp-x" not in openslide.OpenSlide(str(nompp.path)).properties
    fine = make_synthetic_slide(tmp_path / "fine.tiff", width=512, height=512, mpp=0.25, tile=128)
    assert float(openslide.OpenSlide(str(fine.path)).properties["openslide.mpp-x"]) == pytest.approx(0.25)


def test_cohort_api_and_cli_options(tmp_path: Path) -> None:
    infos = make_synthetic_cohort(
        tmp_path / "api", SynthConfig(n=3, width=512, height=512, tile=128, lesion_fraction=0)
    )
    assert [i.label for i in infos] == ["normal"] * 3
    result = CliRunner().invoke(
        main,
        [
            "synth",
            str(tmp_path / "cli"),
            "--n",
            "1",
            "--width",
            "640",
            "--height",
            "480",
            "--no-mpp",
            "--tile",
            "128",
        ],
    )
    assert result.exit_code == 0, result.output
    osr = openslide.OpenSlide(str(tmp_path / "cli" / "synth_000.tiff"))
    assert osr.dimensions == (640, 480) and "openslide.mpp-x" not in osr.properties
    bad = CliRunner().invoke(main, ["synth", str(tmp_path / "bad"), "--quality", "500"])
    assert bad.exit_code == 2 and "quality" in bad.output
