"""Where the viewer finds slides (``--slides DIR`` by id, else the export's ``slide_path``) and
what it shows of an export without a CSV (tile scores from the GeoJSON, else a clear message)."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner
from PIL import Image

from pathopeft.cli import main
from pathopeft.heatmaps.geojson import build_feature_collection
from pathopeft.viewer import create_app
from pathopeft.viewer.geojson_read import tile_scores
from tests.viewer_fixtures import make_export


@pytest.fixture()
def moved(tmp_path):
    """An export whose slide s1 was moved (into a nested folder) after the export."""
    heat = tmp_path / "heat"
    make_export(heat, task="tumor")
    slides = tmp_path / "slides" / "site_a"
    slides.mkdir(parents=True)
    shutil.move(heat / "s1.tiff", slides / "s1.tiff")
    return heat, tmp_path / "slides"


def test_moved_slide_is_found_by_id_in_slides_dir(moved):
    heat, slides = moved
    c = create_app(heat, slides=slides).test_client()
    assert c.get("/api/slides").get_json()[0]["error"] is None
    top = c.get("/api/tumor/s1/info").get_json()["max_level"]
    r = c.get(f"/api/tumor/s1/slide_files/{top}/0_0.jpeg")
    assert r.status_code == 200 and Image.open(io.BytesIO(r.data)).size == (256, 256)


def test_slides_csv_maps_ids_that_are_not_file_names(moved, tmp_path):
    heat, slides = moved
    shutil.move(slides / "site_a" / "s1.tiff", slides / "site_a" / "scan_0001.tiff")
    table = tmp_path / "slides.csv"
    table.write_text("path,slide_id\nslides/site_a/scan_0001.tiff,s1\n")  # relative to the CSV
    c = create_app(heat, slides=table).test_client()
    assert c.get("/api/slides").get_json()[0]["error"] is None
    assert c.get("/api/tumor/s1/info").status_code == 200
    (slides / "site_a" / "scan_0001.tiff").unlink()
    (row,) = create_app(heat, slides=table).test_client().get("/api/slides").get_json()
    assert "scan_0001.tiff, which does not exist" in row["error"]


def test_moved_slide_without_slides_dir_is_listed_with_the_reason(moved):
    heat, _ = moved
    c = create_app(heat).test_client()
    (row,) = c.get("/api/slides").get_json()
    assert row["slide_id"] == "s1" and "slide file not found" in row["error"] and "--slides" in row["error"]
    r = c.get("/api/tumor/s1/info")
    assert r.status_code == 404 and r.get_json()["error"] == row["error"]
    assert c.get("/api/tumor/s1/slide_files/0/0_0.jpeg").status_code == 404


def test_slide_path_is_the_fallback_and_both_places_are_named(moved, tmp_path):
    heat, slides = moved
    make_export(heat, task="tumor", slide_id="s2", seed=2)  # still at its slide_path
    rows = {
        r["slide_id"]: r for r in create_app(heat, slides=slides).test_client().get("/api/slides").get_json()
    }
    assert rows["s2"]["error"] is None and rows["s1"]["error"] is None
    shutil.move(slides / "site_a" / "s1.tiff", slides / "other.tiff")  # a slide, not s1
    rows = {
        r["slide_id"]: r for r in create_app(heat, slides=slides).test_client().get("/api/slides").get_json()
    }
    assert rows["s2"]["error"] is None
    err = rows["s1"]["error"]
    assert f"no slide with id 's1' in {slides}" in err and "s1.tiff' does not exist" in err


@pytest.mark.parametrize(
    "url",
    [
        "/api/tumor/other/info",  # in --slides but not exported: the listing, not the folder, decides
        "/api/tumor/..%2fslides%2fsite_a%2fs1/info",
        "/api/tumor/%2Fetc%2Fpasswd/slide_files/0/0_0.jpeg",
        "/api/..%2f..%2fslides/s1/info",
    ],
)
def test_slides_dir_serves_only_listed_ids(moved, url):
    heat, slides = moved
    shutil.copy(slides / "site_a" / "s1.tiff", slides / "other.tiff")
    c = create_app(heat, slides=slides).test_client()
    assert c.get("/api/tumor/s1/info").status_code == 200
    assert c.get(url, follow_redirects=True).status_code == 404


def test_slides_dir_errors_name_the_folder(moved, tmp_path):
    heat, slides = moved
    with pytest.raises(FileNotFoundError, match="slide folder not found"):
        create_app(heat, slides=tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: no slides found"):  # a wrong folder, most likely
        create_app(heat, slides=tmp_path / "empty")
    shutil.copy(slides / "site_a" / "s1.tiff", slides / "s1.svs")
    with pytest.raises(ValueError, match="duplicate slide_id"):
        create_app(heat, slides=slides)


def test_cli_slides_and_heatmaps_options(moved):
    heat, slides = moved
    both = CliRunner().invoke(main, ["view", str(heat), "--heatmaps", str(heat)])
    assert both.exit_code == 2 and "not both" in both.output
    none = CliRunner().invoke(main, ["view"])
    assert none.exit_code == 2 and "--heatmaps DIR" in none.output
    help_text = CliRunner().invoke(main, ["view", "--help"]).output
    assert "--slides DIR" in help_text and "--heatmaps DIR" in help_text
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pathopeft",
            "view",
            "--slides",
            str(slides),
            "--heatmaps",
            str(heat),
            "--port",
            "0",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        import urllib.request

        url = proc.stdout.readline().split()[-1]
        with urllib.request.urlopen(url + "api/tumor/s1/info") as r:
            assert r.status == 200
    finally:
        proc.terminate()
        proc.wait()


def _views(c):
    """What the scores drive: the threshold outline, the score under the cursor, heatmap tiles."""
    top = c.get("/api/tumor/s1/info").get_json()["max_level"]
    return (
        c.get("/api/tumor/s1/above?threshold=0.5").get_json(),
        [
            c.get(f"/api/tumor/s1/score?x={x}&y={y}").get_json()["score"]
            for x, y in ((1024, 768), (20, 10), (2040, 1530))
        ],
        [c.get(f"/api/tumor/s1/heatmap_files/{lvl}/0_0.png").data for lvl in (top, top - 2)],
    )


def test_without_csv_the_tile_scores_come_from_the_geojson(tmp_path):
    out = make_export(tmp_path, task="tumor")
    with_csv = create_app(tmp_path).test_client()
    assert with_csv.get("/api/tumor/s1/info").get_json()["scores"] == "s1.csv"
    want = _views(with_csv)
    (out / "s1.csv").unlink()
    c = create_app(tmp_path).test_client()
    info = c.get("/api/tumor/s1/info").get_json()
    assert info["scores"] == "s1.geojson" and info["scores_error"] is None
    got = _views(c)
    assert got[0] == want[0] and got[0]["features"]  # the same outline, in the full frame (bounds added)
    assert got[1] == pytest.approx(want[1])
    assert got[2] == want[2]


def test_geojson_tiles_clipped_at_the_slide_edge_keep_their_grid_origin():
    coords = [[-100, 0], [156, 0]]  # the first crosses the left edge, the second the right one (w=400)
    fc = build_feature_collection(
        "s", coords, 256, {"score": [0.2, 0.7]}, [], class_name="t", bounds=(16, 8), size=(400, 300)
    )
    df = tile_scores(__import__("json").dumps(fc), 16, 8, 256)
    assert df[["x", "y", "width", "height"]].values.tolist() == [[-100, 0, 256, 256], [156, 0, 256, 256]]
    assert df["score"].tolist() == pytest.approx([0.2, 0.7])


def test_without_any_tile_scores_the_slide_shows_and_the_outline_says_why(tmp_path):
    out = make_export(tmp_path, task="tumor")
    (out / "s1.csv").unlink()
    (out / "s1.geojson").unlink()
    c = create_app(tmp_path).test_client()
    info = c.get("/api/tumor/s1/info").get_json()
    assert info["scores"] is None and "no s1.csv" in info["scores_error"] and "csv" in info["scores_error"]
    r = c.get("/api/tumor/s1/above?threshold=0.5")
    assert r.status_code == 409 and r.get_json()["error"] == info["scores_error"]
    top = info["max_level"]
    assert c.get(f"/api/tumor/s1/slide_files/{top}/0_0.jpeg").status_code == 200
    heat = Image.open(io.BytesIO(c.get(f"/api/tumor/s1/heatmap_files/{top}/3_2.png").data))
    assert heat.size == (256, 256) and heat.getextrema()[3] == (0, 0)  # fully transparent
    assert c.get("/api/tumor/s1/score?x=1024&y=768").get_json()["score"] is None
