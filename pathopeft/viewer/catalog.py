"""Find heatmap export folders and index their slides by id (never by path from the client)."""

from __future__ import annotations

import gzip
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)


@dataclass
class SlideEntry:
    """One exported slide of one task: its score contract and tile scores."""

    key: str  # "<task>/<slide_id>", the only handle the browser ever sends
    slide_id: str
    task: str
    folder: Path
    meta: dict
    slide_path: Path
    _scores: pd.DataFrame | None = field(default=None, repr=False)
    _regions: dict | None = field(default=None, repr=False)

    @property
    def geojson_path(self) -> Path | None:
        """The exported ``<slide_id>.geojson`` (or ``.geojson.gz``), or None when it was not exported."""
        for name in (f"{self.slide_id}.geojson", f"{self.slide_id}.geojson.gz"):
            if (self.folder / name).is_file():
                return self.folder / name
        return None

    def exported_regions(self) -> dict:
        """The export's region annotations as drawn in QuPath, in full-frame level-0 px.

        Regions are the exporter's (smoothing, ``min_region_tiles``, cut at the export threshold),
        so the viewer shows the same outlines a pathologist would import, not a recomputation.
        The file's coordinates are relative to ``openslide.bounds-x/y`` (QuPath's frame); the
        JSON's ``bounds`` are added back because the DeepZoom layers show the full frame.
        """
        if self._regions is None:
            path = self.geojson_path
            feats: list[dict] = []
            if path is not None:
                opener = gzip.open if path.suffix == ".gz" else open
                bx, by = (float(v) for v in (self.meta.get("bounds") or (0, 0)))
                try:
                    with opener(path, "rt", encoding="utf-8") as fh:
                        text = fh.read()
                    feats = [_region(f, bx, by) for f in _annotation_features(text)]
                except (OSError, KeyError, TypeError, ValueError) as err:  # JSONDecodeError: a ValueError
                    raise ValueError(f"{path}: not a readable GeoJSON file ({err!r})") from err
            self._regions = {
                "type": "FeatureCollection",
                "source": path.name if path is not None else None,
                "threshold": self.meta.get("threshold"),
                "features": feats,
            }
        return self._regions

    @property
    def scores(self) -> pd.DataFrame:
        """Tile scores from ``<slide_id>.csv`` (x, y, width, height, score), loaded lazily."""
        if self._scores is None:
            path = self.folder / f"{self.slide_id}.csv"
            df = pd.read_csv(path)
            missing = {"x", "y", "width", "height", "score"} - set(df.columns)
            if missing:
                raise ValueError(f"{path}: missing columns {sorted(missing)}")
            self._scores = df
        return self._scores

    def score_grid(self) -> tuple[np.ndarray, int, int, int]:
        """Scores on the regular tile grid: (grid[ny, nx] with NaN = no tile, origin x, origin y, size)."""
        df = self.scores
        ts = int(self.meta.get("tile_size") or int(df["width"].iloc[0]))
        ox = int(df["x"].min()) % ts
        oy = int(df["y"].min()) % ts
        gx = ((df["x"].to_numpy() - ox) // ts).astype(int)
        gy = ((df["y"].to_numpy() - oy) // ts).astype(int)
        w, h = self.meta.get("level0_size") or [int(gx.max() + 1) * ts, int(gy.max() + 1) * ts]
        nx = max(int(gx.max()) + 1, -(-int(w) // ts))
        ny = max(int(gy.max()) + 1, -(-int(h) // ts))
        grid = np.full((ny, nx), np.nan, dtype=np.float32)
        grid[gy, gx] = df["score"].to_numpy(dtype=np.float32)
        return grid, ox, oy, ts


_COLLECTION_HEAD = re.compile(r'\s*\{\s*"type"\s*:\s*"FeatureCollection"\s*,\s*"features"\s*:\s*\[')
_BETWEEN = re.compile(r"\s*,?\s*")


def _annotation_features(text: str) -> Iterator[dict]:
    """The ``objectType == "annotation"`` features of a GeoJSON FeatureCollection text.

    The exporter writes one feature per scored tile before the few regions (76k tiles: 22 MiB of
    text, ~170 MiB as Python objects; benchmarks/RESULTS.md); features are decoded one at a time
    and tiles dropped at once, so only the text and the regions are held. Another layout falls
    back to ``json.loads``.
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
        if isinstance(f, dict) and (f.get("properties") or {}).get("objectType") == "annotation":
            yield f


def _each_feature(text: str, i: int) -> Iterator[dict]:
    decoder = json.JSONDecoder()
    while True:
        i = _BETWEEN.match(text, i).end()
        if text.startswith("]", i):
            return
        feature, i = decoder.raw_decode(text, i)
        yield feature


def _region(feature: dict, dx: float, dy: float) -> dict:
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


class Catalog:
    """All slides under one export folder or a parent of several (one per task)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"heatmap folder not found: {self.root}")
        folders = (
            [self.root]
            if (self.root / "manifest.csv").is_file()
            else sorted(p.parent for p in self.root.glob("*/manifest.csv"))
        )
        if not folders:
            raise FileNotFoundError(f"{self.root}: no manifest.csv here or in a child folder")
        self.entries: dict[str, SlideEntry] = {}
        for folder in folders:
            self._load_folder(folder)

    def _load_folder(self, folder: Path) -> None:
        manifest = pd.read_csv(folder / "manifest.csv", dtype=str, keep_default_na=False)
        for col in ("slide_id", "status"):
            if col not in manifest.columns:
                raise ValueError(f"{folder / 'manifest.csv'}: missing column {col!r}")
        for row in manifest.to_dict("records"):
            if row["status"] != "ok":
                continue
            sid = row["slide_id"]
            meta_path = folder / f"{sid}.json"
            try:
                meta = json.loads(meta_path.read_text())
            except (OSError, json.JSONDecodeError) as err:
                log.warning("skipping slide %s: cannot read %s (%s)", sid, meta_path, err)
                continue
            task = str(meta.get("task") or row.get("task") or folder.name)
            key = f"{task}/{sid}"
            self.entries[key] = SlideEntry(
                key=key,
                slide_id=sid,
                task=task,
                folder=folder,
                meta=meta,
                slide_path=Path(meta.get("slide_path") or row.get("slide_path", "")),
            )

    def get(self, task: str, slide_id: str) -> SlideEntry | None:
        """The entry for exactly this (task, id) pair, or None (never a filesystem lookup)."""
        return self.entries.get(f"{task}/{slide_id}")

    def listing(self) -> list[dict]:
        """What the slide list page shows."""
        out = []
        for e in self.entries.values():
            m = e.meta
            out.append(
                {
                    "slide_id": e.slide_id,
                    "task": e.task,
                    "class": m.get("class"),
                    "bag_probability": m.get("bag_probability"),
                    "predicted_class": m.get("predicted_class"),
                    "threshold": m.get("threshold"),
                    "n_regions": m.get("n_regions"),
                }
            )
        return out
