"""Viewer server without a browser: tile formats and sizes, regions, ids-only access."""

from __future__ import annotations

import io

import pytest
from PIL import Image
from shapely.geometry import box, shape

from pathopeft.viewer import create_app
from pathopeft.viewer.tiles import TileCache
from tests.viewer_fixtures import SPIKE, TS, exported_regions_full_frame, make_export


@pytest.fixture(scope="module")
def export_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("heat")
    make_export(root, task="tumor")
    make_export(root, task="grade", seed=1, invert=True)
    return root


@pytest.fixture(scope="module")
def client(export_root):
    return create_app(export_root).test_client()


def test_slide_list_has_both_tasks(client):
    data = client.get("/api/slides").get_json()
    assert sorted((d["task"], d["slide_id"]) for d in data) == [("grade", "s1"), ("tumor", "s1")]


def test_tiles_are_valid_images_of_the_right_size(client):
    info = client.get("/api/tumor/s1/info").get_json()
    top = info["max_level"]
    r = client.get(f"/api/tumor/s1/slide_files/{top}/0_0.jpeg")
    assert r.status_code == 200 and r.mimetype == "image/jpeg"
    assert Image.open(io.BytesIO(r.data)).size == (256, 256)
    h = client.get(f"/api/tumor/s1/heatmap_files/{top}/0_0.png")
    img = Image.open(io.BytesIO(h.data))
    assert h.mimetype == "image/png" and img.mode == "RGBA" and img.size == (256, 256)
    # the last column of the top level is clipped to the slide width (2048 = 8 tiles exactly)
    last = Image.open(io.BytesIO(client.get(f"/api/tumor/s1/slide_files/{top}/7_5.jpeg").data))
    assert last.size == (256, 256)
    # a low level holds the whole slide in one tile
    small = Image.open(io.BytesIO(client.get(f"/api/tumor/s1/heatmap_files/{top - 3}/0_0.png").data))
    assert small.size == (256, 192)


def test_heatmap_colours_follow_scores(client):
    info = client.get("/api/tumor/s1/info").get_json()
    top = info["max_level"]
    centre = Image.open(io.BytesIO(client.get(f"/api/tumor/s1/heatmap_files/{top}/3_2.png").data))
    corner = Image.open(io.BytesIO(client.get(f"/api/tumor/s1/heatmap_files/{top}/0_0.png").data))
    # jet: high score is red, low score is blue
    r, _, b, a = centre.getpixel((250, 250))
    assert a == 255 and r > b
    r, _, b, a = corner.getpixel((5, 5))
    assert a == 255 and b > r


def test_regions_are_the_exported_geojson_not_the_csv(client, export_root):
    got = client.get("/api/tumor/s1/regions").get_json()
    want = exported_regions_full_frame(export_root / "tumor")
    assert got["source"] == "s1.geojson" and got["threshold"] == 0.5
    assert len(got["features"]) == len(want) == 1
    g, w = got["features"][0], want[0]
    # back in the full frame (the file is relative to the slide bounds), same outline
    assert shape(g["geometry"]).equals(shape(w["geometry"]))
    assert g["properties"]["score_max"] == w["properties"]["measurements"]["score_max"]
    assert g["properties"]["color"] == [200, 0, 0]
    # the isolated high tile is above the threshold but under min_region_tiles: not an exported
    # region, though a recomputation from the CSV (the slider's overlay) does outline it
    spike = box(SPIKE[0], SPIKE[1], SPIKE[0] + TS, SPIKE[1] + TS).centroid
    assert not any(shape(f["geometry"]).contains(spike) for f in got["features"])
    above = client.get("/api/tumor/s1/above?threshold=0.5").get_json()
    assert any(shape(f["geometry"]).contains(spike) for f in above["features"])
    # the threshold does not recompute exported regions
    assert client.get("/api/tumor/s1/regions?threshold=0.9").get_json() == got


def test_above_outline_shrinks_with_threshold(client):
    lo = client.get("/api/tumor/s1/above?threshold=0.2").get_json()
    hi = client.get("/api/tumor/s1/above?threshold=0.8").get_json()
    none = client.get("/api/tumor/s1/above?threshold=1.01").get_json()
    area = lambda g: sum(shape(f["geometry"]).area for f in g["features"])  # noqa: E731
    assert area(lo) > area(hi) > 0 and none["features"] == []
    assert client.get("/api/tumor/s1/above?threshold=abc").status_code == 400


def test_regions_without_geojson_gzipped_or_broken(tmp_path):
    import gzip
    import json

    out = make_export(tmp_path, task="tumor")
    gj = out / "s1.geojson"
    data = gj.read_bytes()
    gj.unlink()
    c = create_app(tmp_path).test_client()
    r = c.get("/api/tumor/s1/regions").get_json()
    assert r["source"] is None and r["features"] == []
    (out / "s1.geojson.gz").write_bytes(gzip.compress(data))
    r = create_app(tmp_path).test_client().get("/api/tumor/s1/regions").get_json()
    assert r["source"] == "s1.geojson.gz" and len(r["features"]) == 1
    (out / "s1.geojson.gz").unlink()
    # another writer's layout: indented (the streamed path) or keys in another order (json.loads)
    doc = json.loads(data)
    gj.write_bytes(data)
    want = create_app(tmp_path).test_client().get("/api/tumor/s1/regions").get_json()
    for text in (json.dumps(doc, indent=2), json.dumps({"features": doc["features"], "type": doc["type"]})):
        gj.write_text(text)
        got = create_app(tmp_path).test_client().get("/api/tumor/s1/regions").get_json()
        assert got["features"] == want["features"] and len(got["features"]) == 1
    point = {"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]}}
    point["properties"] = {"objectType": "annotation"}
    odd = json.dumps({"type": "FeatureCollection", "features": [point]})
    for broken in ("{not json", data[: len(data) // 2].decode(), '{"type": "Feature"}', odd):
        gj.write_text(broken)
        r = create_app(tmp_path).test_client().get("/api/tumor/s1/regions")
        assert r.status_code == 500 and "s1.geojson: not a readable GeoJSON" in r.get_json()["error"]


def test_listing_has_region_counts(client):
    data = {d["task"]: d for d in client.get("/api/slides").get_json()}
    assert data["tumor"]["n_regions"] == 1


def test_tile_cache_is_bounded_by_bytes():
    cache = TileCache(max_bytes=1000)
    for i in range(5):
        cache.get_or_make(("t", i), lambda: b"x" * 300)
        assert cache.nbytes <= 1000
    # 5 × 300 B does not fit in 1000 B: the least recently used went first
    assert len(cache) == 3 and ("t", 0) not in cache and ("t", 4) in cache
    cache.get_or_make(("t", 2), lambda: b"unused")  # a hit refreshes recency
    cache.get_or_make(("big", 0), lambda: b"y" * 600)  # evicts 3 and 4, keeps the recent 2
    assert ("t", 2) in cache and ("t", 3) not in cache and cache.nbytes == 900
    made = cache.get_or_make(("huge", 0), lambda: b"z" * 5000)  # over the budget: served, not kept
    assert len(made) == 5000 and ("huge", 0) not in cache and cache.nbytes <= 1000
    with pytest.raises(ValueError, match=">= 0 bytes"):
        TileCache(-1)


def test_app_cache_stays_within_cache_mb(export_root):
    app = create_app(export_root, cache_mb=0.01)  # ~10 kB: a handful of tiles
    c = app.test_client()
    top = c.get("/api/tumor/s1/info").get_json()["max_level"]
    for col in range(8):
        for row in range(6):
            assert c.get(f"/api/tumor/s1/slide_files/{top}/{col}_{row}.jpeg").status_code == 200
    cache = app.config["cache"]
    assert 0 < cache.nbytes <= cache.max_bytes == int(0.01 * 2**20)


def test_score_under_cursor(client):
    assert client.get("/api/tumor/s1/score?x=1024&y=768").get_json()["score"] > 0.8
    assert client.get("/api/tumor/s1/score?x=-5&y=5").get_json()["score"] is None


@pytest.mark.parametrize(
    "url",
    [
        "/api/tumor/nope/info",
        "/api/nope/s1/info",
        "/api/tumor/s1/slide_files/99/0_0.jpeg",
        "/api/tumor/s1/slide_files/0/5_5.jpeg",
        "/api/tumor/..%2f..%2fetc%2fpasswd/info",
        "/api/tumor/%2Fetc%2Fpasswd/slide_files/0/0_0.jpeg",
        "/static/../catalog.py",
        "/static/%2e%2e/catalog.py",
        "/static//etc/passwd",
    ],
)
def test_unknown_ids_and_traversal_are_404(client, url):
    assert client.get(url, follow_redirects=True).status_code == 404


def test_page_and_vendored_openseadragon_served(client):
    assert b"openseadragon.min.js" in client.get("/").data
    assert client.get("/static/openseadragon/openseadragon.min.js").status_code == 200


def test_cli_port_0_prints_url_and_serves(tmp_path):
    import json
    import subprocess
    import sys
    import urllib.request

    make_export(tmp_path, task="tumor")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pathopeft", "view", str(tmp_path), "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("pathopeft view: http://127.0.0.1:"), line
        url = line.split()[-1]
        with urllib.request.urlopen(url + "api/slides") as r:
            assert json.loads(r.read())[0]["slide_id"] == "s1"
    finally:
        proc.terminate()
        proc.wait()


def test_missing_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.csv"):
        create_app(tmp_path)


def test_cli_cache_mb_must_be_non_negative(tmp_path):
    from click.testing import CliRunner

    from pathopeft.cli import main

    r = CliRunner().invoke(main, ["view", str(tmp_path), "--cache-mb", "-1"])
    assert r.exit_code == 2 and "--cache-mb" in r.output
    assert "--cache-tiles" not in CliRunner().invoke(main, ["view", "--help"]).output
