"""Tumour annotations → tile labels: ASAP XML (with exclusions), GeoJSON (holes, QuPath), hardening."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pathopeft.wsi.annotations import (
    AnnotationError,
    find_annotation,
    read_annotations,
    tile_labels,
    tile_tumor_fractions,
)

T = 256
# a 4×4 grid of 256-px tiles; tile (col, row) has index row * 4 + col
GRID = np.array([[x * T, y * T] for y in range(4) for x in range(4)])


def _grid(values) -> np.ndarray:
    return np.asarray(values).reshape(4, 4)


def _asap(groups: list[tuple[str, str, list[tuple[float, float]]]]) -> str:
    body = []
    for i, (group, kind, points) in enumerate(groups):
        # write the coordinates in reverse to check that the Order attribute is honoured
        coords = "".join(
            f'<Coordinate Order="{j}" X="{x}" Y="{y}" />' for j, (x, y) in reversed(list(enumerate(points)))
        )
        body.append(
            f'<Annotation Name="Annotation {i}" Type="{kind}" PartOfGroup="{group}" Color="#F4FA58">'
            f"<Coordinates>{coords}</Coordinates></Annotation>"
        )
    groups_xml = "".join(
        f'<Group Name="{g}" PartOfGroup="None" Color="#64FE2E" />' for g in ("_0", "_1", "_2")
    )
    return (
        '<?xml version="1.0"?><ASAP_Annotations><Annotations>'
        + "".join(body)
        + f"</Annotations><AnnotationGroups>{groups_xml}</AnnotationGroups></ASAP_Annotations>"
    )


def _rect(x0, y0, x1, y1):
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def test_asap_xml_tumour_groups_minus_exclusion(tmp_path):
    path = tmp_path / "tumor_001.xml"
    path.write_text(
        _asap(
            [
                ("_0", "Polygon", _rect(0, 0, 512, 512)),  # tiles (0,0) (1,0) (0,1) (1,1)
                ("_1", "Spline", _rect(512, 0, 640, 256)),  # half of tile (2,0)
                ("_2", "Polygon", _rect(256, 256, 512, 512)),  # exclusion: tile (1,1) back to normal
                ("_0", "Dot", [(900.0, 900.0)]),  # a point has no area
                ("Tumor", "Rectangle", _rect(768, 768, 1024, 960)),  # 75% of tile (3,3)
            ]
        )
    )
    regions = read_annotations(path)
    assert [r.kind for r in regions] == ["tumor", "tumor", "exclusion", "tumor"]
    fractions = tile_tumor_fractions(regions, GRID, T)
    expected = np.zeros(16)
    expected[[0, 1, 4]] = 1.0
    expected[2] = 0.5
    expected[15] = 0.75
    np.testing.assert_allclose(fractions, expected, atol=1e-6)
    assert _grid(tile_labels(regions, GRID, T)).tolist() == [
        [1, 1, 1, 0],
        [1, 0, 0, 0],
        [0, 0, 0, 0],
        [0, 0, 0, 1],
    ]
    assert tile_labels(regions, GRID, T, threshold=0.8).sum() == 3  # the half and 3/4 tiles drop out
    assert tile_labels(regions, GRID, T, threshold=0.0).sum() == 5  # 0 means "any overlap"


def test_exclusion_is_applied_after_every_tumour_polygon(tmp_path):
    """An exclusion listed before a tumour polygon that covers it still cuts it out (drawn last)."""
    path = tmp_path / "s.xml"
    path.write_text(
        _asap([("_2", "Polygon", _rect(0, 0, 256, 256)), ("_0", "Polygon", _rect(0, 0, 512, 256))])
    )
    fractions = tile_tumor_fractions(read_annotations(path), GRID, T)
    assert fractions[:4].tolist() == [0.0, 1.0, 0.0, 0.0]


def test_geojson_polygon_with_hole_multipolygon_and_exclusion(tmp_path):
    outer = [[0, 0], [1024, 0], [1024, 1024], [0, 1024], [0, 0]]
    hole = [[256, 256], [768, 256], [768, 768], [256, 768], [256, 256]]
    collection = {
        "type": "FeatureCollection",
        "features": [
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [outer, hole]},
                "properties": {"objectType": "annotation", "classification": {"name": "Tumor"}},
            },
            {  # a tumour island inside the hole: MultiPolygon part
                "type": "Feature",
                "geometry": {
                    "type": "MultiPolygon",
                    "coordinates": [[[[512, 512], [768, 512], [768, 640], [512, 640], [512, 512]]]],
                },
                "properties": {"classification": {"name": "Tumor"}},
            },
            {  # exclusion of the top-left tile
                "type": "Feature",
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [[[0, 0], [256, 0], [256, 256], [0, 256], [0, 0]]],
                },
                "properties": {"classification": {"name": "Exclusion"}},
            },
            {  # QuPath detections are not regions
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [hole]},
                "properties": {"objectType": "detection"},
            },
        ],
    }
    path = tmp_path / "slide.geojson"
    path.write_text(json.dumps(collection))
    fractions = _grid(tile_tumor_fractions(read_annotations(path), GRID, T))
    expected = np.ones((4, 4))
    expected[1:3, 1:3] = 0.0
    expected[2, 2] = 0.5  # the island covers the upper half of tile (2,2)
    expected[0, 0] = 0.0
    np.testing.assert_allclose(fractions, expected, atol=1e-6)


def test_qupath_feature_list_and_self_intersecting_polygon(tmp_path):
    bowtie = [[0, 0], [512, 512], [512, 0], [0, 512], [0, 0]]  # two triangles crossing at (256, 256)
    path = tmp_path / "slide.json"
    path.write_text(
        json.dumps([{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [bowtie]}}])
    )
    fractions = _grid(tile_tumor_fractions(read_annotations(path), GRID, T))
    np.testing.assert_allclose(fractions[:2, :2], [[0.5, 0.5], [0.5, 0.5]], atol=1e-6)
    assert fractions[2:].sum() == 0 and fractions[:, 2:].sum() == 0


def test_tiles_outside_any_annotation_and_empty_files(tmp_path):
    path = tmp_path / "empty.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    assert tile_labels(read_annotations(path), GRID, T).sum() == 0
    far = np.array([[10**6, 10**6]])
    assert tile_tumor_fractions(read_annotations(path), far, T).tolist() == [0.0]


def test_entity_expansion_attack_is_rejected(tmp_path):
    bomb = (
        '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
        '<!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">'
        '<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>'
        '<ASAP_Annotations><Annotations><Annotation Name="&lol3;" Type="Polygon" PartOfGroup="_0">'
        "<Coordinates/></Annotation></Annotations></ASAP_Annotations>"
    )
    path = tmp_path / "bomb.xml"
    path.write_text(bomb)
    with pytest.raises(AnnotationError, match=r"bomb\.xml.*Entit"):
        read_annotations(path)
    xxe = tmp_path / "xxe.xml"
    xxe.write_text(
        '<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
        '<ASAP_Annotations><Annotations><Annotation Name="&x;"/></Annotations></ASAP_Annotations>'
    )
    with pytest.raises(AnnotationError, match="xxe.xml"):
        read_annotations(xxe)


def test_bad_files_name_the_file(tmp_path):
    broken = tmp_path / "broken.xml"
    broken.write_text("<ASAP_Annotations><Annotations>")
    with pytest.raises(AnnotationError, match="broken.xml"):
        read_annotations(broken)
    bad_coord = tmp_path / "coord.xml"
    bad_coord.write_text(_asap([("_0", "Polygon", [("a", 0), (1, 1), (2, 0)])]))
    with pytest.raises(AnnotationError, match="coord.xml.*bad coordinate"):
        read_annotations(bad_coord)
    with pytest.raises(AnnotationError, match="unknown annotation format"):
        read_annotations(tmp_path / "x.txt")
    notjson = tmp_path / "x.geojson"
    notjson.write_text("{")
    with pytest.raises(AnnotationError, match=r"x\.geojson"):
        read_annotations(notjson)


def test_find_annotation_by_slide_id(tmp_path):
    (tmp_path / "tumor_002.xml").write_text(_asap([]))
    (tmp_path / "tumor_003.geojson").write_text("{}")
    assert find_annotation(tmp_path, "tumor_002").name == "tumor_002.xml"
    assert find_annotation(tmp_path, "tumor_003").name == "tumor_003.geojson"
    assert find_annotation(tmp_path, "normal_001") is None


def test_many_tiles_against_a_detailed_outline():
    """10^5 tiles, a 2,000-vertex outline with a hole: exact areas (total = polygon area)."""
    t = np.linspace(0, 2 * np.pi, 2000, endpoint=False)
    r = 60000 * (1 + 0.1 * np.sin(7 * t))
    outer = np.stack([80000 + r * np.cos(t), 80000 + r * np.sin(t)], 1)
    inner = np.stack([80000 + 20000 * np.cos(t), 80000 + 20000 * np.sin(t)], 1)
    from pathopeft.wsi.annotations import Region, tumor_geometry

    regions = [Region(outer, [inner])]
    coords = np.stack(np.meshgrid(np.arange(316) * 512, np.arange(316) * 512), -1).reshape(-1, 2)
    fractions = tile_tumor_fractions(regions, coords, 512)
    assert len(fractions) > 99_000
    assert fractions.sum() * 512 * 512 == pytest.approx(tumor_geometry(regions).area, rel=1e-6)
