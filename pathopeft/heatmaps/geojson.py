"""QuPath-importable GeoJSON: one locked ``tile`` object per scored tile + merged ``annotation`` regions.

What QuPath (0.4+) needs, from its reader: a FeatureCollection of Polygon/MultiPolygon Features;
``properties.objectType`` ("tile" objects are the ones measurement maps list; annotations never),
``properties.measurements`` a mapping of finite numbers (a NaN aborts the import), a UUID ``id``,
``classification`` with both a ``name`` and a ``color`` (a name alone aborts the import in ≥ 0.4),
closed rings with ≥ 4 points that stay valid on a 0.01-px grid (0.6 rejects the whole file on one
invalid polygon). Coordinates are level-0 px minus ``openslide.bounds-x/y``: QuPath shows slides
cropped to their bounds.
"""

from __future__ import annotations

import gzip
import json
import math
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import shapely

from pathopeft.files import atomic_path

__all__ = ["CLASS_COLORS", "build_feature_collection", "class_color", "write_geojson"]

CLASS_COLORS = {"tumor": (200, 0, 0), "tumour": (200, 0, 0), "normal": (0, 150, 0)}
_NAMESPACE = uuid.UUID("6f1c3a0e-8f1d-4f4e-9a8e-2f0c8a1b7c11")  # stable ids: same input, same file


def class_color(name: str) -> list[int]:
    """An [r, g, b] for a class name: known names get a fixed colour, others a stable hashed one."""
    known = CLASS_COLORS.get(name.lower())
    if known:
        return list(known)
    h = uuid.uuid5(_NAMESPACE, name).bytes
    return [64 + h[0] % 160, 64 + h[1] % 160, 64 + h[2] % 160]


def _finite(measurements: Mapping[str, float]) -> dict[str, float]:
    """Finite floats only (QuPath rejects NaN/inf): a non-finite value is dropped, not written."""
    return {k: float(v) for k, v in measurements.items() if v is not None and math.isfinite(float(v))}


def _ring(coords: Any, dx: float, dy: float) -> list[list[float]]:
    pts = [[_num(x - dx), _num(y - dy)] for x, y in np.asarray(coords)[:, :2]]
    if pts[0] != pts[-1]:
        pts.append(pts[0])
    return pts


def _num(v: float) -> float | int:
    r = round(float(v), 2)
    return int(r) if r.is_integer() else r


def _geometry(geom: shapely.Geometry, dx: float, dy: float) -> dict[str, Any]:
    polys = [geom] if geom.geom_type == "Polygon" else [g for g in shapely.get_parts(geom) if not g.is_empty]
    rings = [
        [_ring(p.exterior.coords, dx, dy), *[_ring(h.coords, dx, dy) for h in p.interiors]]
        for p in polys
        if p.geom_type == "Polygon"
    ]
    if len(rings) == 1:
        return {"type": "Polygon", "coordinates": rings[0]}
    return {"type": "MultiPolygon", "coordinates": rings}


def build_feature_collection(
    slide_id: str,
    coords: np.ndarray,
    tile_size: int,
    measurements: Mapping[str, np.ndarray],
    regions: Sequence[tuple[shapely.Geometry, float, float, int]],
    *,
    class_name: str,
    bounds: tuple[int, int] = (0, 0),
    size: tuple[int, int] | None = None,
    mpp: float | None = None,
) -> dict[str, Any]:
    """Tiles (``measurements``: name → (N,) values) and regions (geometry, mean, max, cells) as GeoJSON.

    Tiles crossing the slide edge (``size`` = level-0 w, h) are clipped to it.
    """
    dx, dy = bounds
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    w_max, h_max = size if size is not None else (None, None)
    columns = {k: np.asarray(v, dtype=np.float64) for k, v in measurements.items()}
    features: list[dict[str, Any]] = []
    for i, (x, y) in enumerate(coords.tolist()):
        x1, y1 = x + tile_size, y + tile_size
        if w_max is not None:
            x, y, x1, y1 = max(x, 0), max(y, 0), min(x1, w_max), min(y1, h_max)
        if x1 <= x or y1 <= y:
            continue
        ring = [[x - dx, y - dy], [x1 - dx, y - dy], [x1 - dx, y1 - dy], [x - dx, y1 - dy], [x - dx, y - dy]]
        features.append(
            {
                "type": "Feature",
                "id": str(uuid.uuid5(_NAMESPACE, f"{slide_id}/tile/{i}")),
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {
                    "objectType": "tile",
                    "isLocked": True,
                    "measurements": _finite({k: v[i] for k, v in columns.items()}),
                },
            }
        )
    color = class_color(class_name)
    for j, (geom, mean, peak, _cells) in enumerate(regions):
        area = float(geom.area)
        values = {"score_mean": mean, "score_max": peak, "area_px2": area}
        if mpp:
            values["area_um2"] = area * mpp * mpp
        features.append(
            {
                "type": "Feature",
                "id": str(uuid.uuid5(_NAMESPACE, f"{slide_id}/region/{j}")),
                "geometry": _geometry(geom, dx, dy),
                "properties": {
                    "objectType": "annotation",
                    "name": f"{class_name} region {j + 1}",
                    "isLocked": True,
                    "classification": {"name": class_name, "color": color},
                    "measurements": _finite(values),
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}


def write_geojson(path: str | Path, collection: Mapping[str, Any], *, gzip_it: bool = False) -> Path:
    """Write atomically, NaN-free (``allow_nan=False`` raises); ``gzip_it`` writes ``<path>.gz`` instead."""
    path = Path(path)
    if gzip_it:
        path = path.with_name(path.name + ".gz")
    data = json.dumps(collection, separators=(",", ":"), allow_nan=False).encode("utf-8")
    with atomic_path(path) as tmp:
        if gzip_it:
            with gzip.open(tmp, "wb", compresslevel=6) as fh:
                fh.write(data)
        else:
            tmp.write_bytes(data)
    return path
