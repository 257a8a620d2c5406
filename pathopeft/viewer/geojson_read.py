"""Read an exported ``<slide_id>.geojson``: its region annotations and, without a CSV, its tile scores.

``pathopeft heatmap`` writes one ``objectType == "tile"`` feature per scored tile (its shown score
in ``measurements.score``) before the few ``"annotation"`` regions (pathopeft/heatmaps/geojson.py).
A 76k-tile file is 22 MiB of text but ~170 MiB as Python objects (benchmarks/RESULTS.md), so
features are decoded one at a time and what is not wanted is dropped at once.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

_COLLECTION_HEAD = re.compile(r'\s*\{\s*"type"\s*:\s*"FeatureCollection"\s*,\s*"features"\s*:\s*\[')
_BETWEEN = re.compile(r"\s*,?\s*")


def read_text(path: Path) -> str:
    """The file's text (``.gz`` decompressed)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        return fh.read()


def features_of(text: str, object_type: str) -> Iterator[dict]:
    """The features of a GeoJSON FeatureCollection text whose ``properties.objectType`` is ``object_type``.

    The exporter's compact layout is decoded feature by feature; another layout falls back to
    ``json.loads``.
    """
    head = _COLLECTION_HEAD.match(text)
    if head is None:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("type") != "FeatureCollection":
            raise ValueError("not a GeoJSON FeatureCollection")
        features: Iterator[dict] = iter(data.get("features") or [])
    else:
        features = _each_feature(text, head.end())
    for f in features:
        if isinstance(f, dict) and (f.get("properties") or {}).get("objectType") == object_type:
            yield f


def _each_feature(text: str, i: int) -> Iterator[dict]:
    decoder = json.JSONDecoder()
    while True:
        i = _BETWEEN.match(text, i).end()
        if text.startswith("]", i):
            return
        feature, i = decoder.raw_decode(text, i)
        yield feature


def region(feature: dict, dx: float, dy: float) -> dict:
    """What the page draws of one exported region: its outline moved by (dx, dy) and its scores."""
    props = feature.get("properties") or {}
    meas = props.get("measurements") or {}
    cls = props.get("classification") or {}
    return {
        "type": "Feature",
        "geometry": _shift(feature["geometry"], dx, dy),
        "properties": {
            "name": props.get("name"),
            "class": cls.get("name"),
            "color": cls.get("color"),
            "score_max": meas.get("score_max"),
            "score_mean": meas.get("score_mean"),
            "area_um2": meas.get("area_um2"),
        },
    }


def _shift(geometry: dict, dx: float, dy: float) -> dict:
    """A Polygon/MultiPolygon moved by (dx, dy)."""
    kind, coords = geometry["type"], geometry["coordinates"]
    if kind not in ("Polygon", "MultiPolygon"):
        raise ValueError(f"unsupported region geometry {kind!r} (the exporter writes polygons)")
    polys = [coords] if kind == "Polygon" else coords
    moved = [[[[x + dx, y + dy] for x, y, *_ in ring] for ring in poly] for poly in polys]
    return {"type": kind, "coordinates": moved[0] if kind == "Polygon" else moved}


def tile_scores(text: str, dx: float, dy: float, tile_size: int) -> pd.DataFrame:
    """The CSV's (x, y, width, height, score) rebuilt from the tile features, in full-frame px.

    The exporter clips tiles to the slide (a tile at x < 0 is written from 0) and shifts them by
    ``-bounds``; the unclipped origin is recovered (``x1 - tile_size`` for a tile clipped on the
    left) so the score grid is the CSV's. A tile without a finite score (dropped by the writer:
    QuPath rejects NaN) is not a scored tile.
    """
    rows: list[tuple[float, float, float]] = []
    for f in features_of(text, "tile"):
        score = ((f.get("properties") or {}).get("measurements") or {}).get("score")
        if score is None:
            continue
        ring = f["geometry"]["coordinates"][0]  # plain min/max: numpy per 5-point ring costs 2x the decode
        xs, ys = [p[0] for p in ring], [p[1] for p in ring]
        x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
        x = x1 - tile_size if x0 + dx <= 0 and x1 - x0 < tile_size else x0
        y = y1 - tile_size if y0 + dy <= 0 and y1 - y0 < tile_size else y0
        rows.append((x + dx, y + dy, float(score)))
    arr = np.asarray(rows, dtype=np.float64).reshape(-1, 3)
    return pd.DataFrame(
        {
            "x": np.rint(arr[:, 0]).astype(np.int64),
            "y": np.rint(arr[:, 1]).astype(np.int64),
            "width": tile_size,
            "height": tile_size,
            "score": arr[:, 2],
        }
    )
