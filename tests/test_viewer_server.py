"""Viewer server without a browser: tile formats and sizes, regions, ids-only access."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from pathopeft.viewer import create_app
from tests.viewer_fixtures import make_export


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    root = tmp_path_factory.mktemp("heat")
    make_export(root, task="tumor")
    make_export(root, task="grade", seed=1)
    return create_app(root).test_client()


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


def test_regions_shrink_with_threshold(client):
    lo = client.get("/api/tumor/s1/regions?threshold=0.2").get_json()
    hi = client.get("/api/tumor/s1/regions?threshold=0.8").get_json()
    none = client.get("/api/tumor/s1/regions?threshold=1.01").get_json()
    from shapely.geometry import shape

    area = lambda g: sum(shape(f["geometry"]).area for f in g["features"])  # noqa: E731
    assert area(lo) > area(hi) > 0 and none["features"] == []


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
