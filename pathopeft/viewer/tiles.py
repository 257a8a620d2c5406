"""Slide tiles from openslide's DeepZoomGenerator and heatmap tiles on the same grid."""

from __future__ import annotations

import contextlib
import io
import threading
from collections.abc import Callable

import cachetools
import matplotlib
import numpy as np
import openslide
from openslide.deepzoom import DeepZoomGenerator
from PIL import Image
from shapely.geometry import box, mapping
from shapely.ops import unary_union

from pathopeft.viewer.catalog import NoTileScores, SlideEntry

TILE = 256
OVERLAP = 0


class TileCache:
    """A thread-safe LRU cache of encoded tiles bounded by their total bytes, not their count.

    Slide JPEGs and heatmap PNGs differ by 10× in size (an empty heatmap tile is a few hundred bytes,
    a dense slide tile tens of kB), so a count cap does not bound memory; ``cachetools.LRUCache`` with
    ``getsizeof=len`` does. A tile larger than the whole budget is served but not kept.
    """

    def __init__(self, max_bytes: int = 256 * 2**20) -> None:
        if max_bytes < 0:
            raise ValueError(f"tile cache size must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = max_bytes
        self._data: cachetools.LRUCache[tuple, bytes] = cachetools.LRUCache(maxsize=max_bytes, getsizeof=len)
        self._lock = threading.Lock()

    def get_or_make(self, key: tuple, make: Callable[[], bytes]) -> bytes:
        """The cached tile for ``key``, or ``make()``'s, cached (made outside the lock: tiles are slow)."""
        with self._lock:
            hit = self._data.get(key)
        if hit is not None:
            return hit
        value = make()
        with self._lock, contextlib.suppress(ValueError):  # ValueError: larger than the whole budget
            self._data[key] = value
        return value

    @property
    def nbytes(self) -> int:
        """Bytes of tiles held now (always <= ``max_bytes``)."""
        return int(self._data.currsize)

    def __contains__(self, key: tuple) -> bool:
        return key in self._data

    def __len__(self) -> int:
        return len(self._data)


class SlideTiler:
    """DeepZoom pyramid of one slide plus its heatmap rendered from the tile scores."""

    def __init__(self, entry: SlideEntry) -> None:
        if entry.slide_path is None:
            raise FileNotFoundError(entry.error or f"{entry.key}: no slide file")
        self.entry = entry
        self.slide = openslide.OpenSlide(str(entry.slide_path))
        self.dz = DeepZoomGenerator(self.slide, tile_size=TILE, overlap=OVERLAP, limit_bounds=False)
        # no tile scores at all (an export with neither csv nor geojson): the slide is still worth
        # showing; the heatmap is transparent and the page says what the outline needs
        self.no_scores: str | None = None
        try:
            self.grid, self.ox, self.oy, self.ts = entry.score_grid()
        except NoTileScores as err:
            self.no_scores = str(err)
            self.grid = np.full((0, 0), np.nan, dtype=np.float32)
            self.ox = self.oy = 0
            self.ts = int(entry.meta.get("tile_size") or TILE)
        self.cmap = matplotlib.colormaps[str(entry.meta.get("colormap") or "jet")]
        self._lock = threading.Lock()  # openslide handles are not documented as thread-safe

    def dzi(self) -> str:
        return self.dz.get_dzi("jpeg")

    def info(self) -> dict:
        m = self.entry.meta
        w, h = self.slide.dimensions
        mpp = m.get("mpp")
        if mpp is None:
            raw = self.slide.properties.get(openslide.PROPERTY_NAME_MPP_X)
            mpp = float(raw) if raw else None
        return {
            "slide_id": self.entry.slide_id,
            "task": self.entry.task,
            "width": w,
            "height": h,
            "mpp": mpp,
            "tile_size": TILE,
            "overlap": OVERLAP,
            "max_level": self.dz.level_count - 1,
            "threshold": m.get("threshold", 0.5),
            "class": m.get("class"),
            "bag_probability": m.get("bag_probability"),
            "score_tile": self.ts,
            "scores": self.entry.scores_source,  # "s1.csv", "s1.geojson(.gz)", or None
            "scores_error": self.no_scores,
            "colormap": self.cmap.name,
        }

    def slide_tile(self, level: int, col: int, row: int) -> bytes:
        with self._lock:
            img = self.dz.get_tile(level, (col, row))
        buf = io.BytesIO()
        img.convert("RGB").save(buf, "JPEG", quality=85)
        return buf.getvalue()

    def _level0_axis(self, level: int, start: int, n: int, axis: int) -> np.ndarray:
        """Level-0 pixel centres of ``n`` pixels of DeepZoom level ``level`` from ``start``."""
        full = self.slide.dimensions[axis]
        lvl = self.dz.level_dimensions[level][axis]
        return (np.arange(start, start + n) + 0.5) * (full / lvl)

    def heatmap_tile(self, level: int, col: int, row: int) -> bytes:
        """RGBA PNG of the shown score, transparent where no tile was scored."""
        tw, th = self.dz.get_tile_dimensions(level, (col, row))
        x0 = col * TILE - (OVERLAP if col else 0)
        y0 = row * TILE - (OVERLAP if row else 0)
        gx = np.floor((self._level0_axis(level, x0, tw, 0) - self.ox) / self.ts).astype(int)
        gy = np.floor((self._level0_axis(level, y0, th, 1) - self.oy) / self.ts).astype(int)
        ny, nx = self.grid.shape
        okx = (gx >= 0) & (gx < nx)
        oky = (gy >= 0) & (gy < ny)
        vals = np.full((th, tw), np.nan, dtype=np.float32)
        sub = self.grid[np.ix_(gy[oky], gx[okx])]
        vals[np.ix_(np.flatnonzero(oky), np.flatnonzero(okx))] = sub
        rgba = (self.cmap(np.nan_to_num(vals, nan=0.0)) * 255).astype(np.uint8)
        rgba[..., 3] = np.where(np.isnan(vals), 0, 255)
        buf = io.BytesIO()
        Image.fromarray(rgba, "RGBA").save(buf, "PNG")
        return buf.getvalue()

    def above(self, threshold: float) -> dict:
        """GeoJSON (level-0 full-frame px) of the union of scored tiles with score ≥ ``threshold``.

        This is the slider's "what if the cut were here" outline from the per-tile scores; the
        exported regions (``SlideEntry.exported_regions``) stay as the export wrote them.
        """
        if self.no_scores:
            raise NoTileScores(self.no_scores)
        df = self.entry.scores
        sel = df[df["score"] >= threshold]
        boxes = [
            box(x, y, x + w, y + h)
            for x, y, w, h in sel[["x", "y", "width", "height"]].itertuples(index=False)
        ]
        merged = unary_union(boxes) if boxes else None
        feats = []
        if merged is not None and not merged.is_empty:
            geoms = getattr(merged, "geoms", [merged])
            feats = [{"type": "Feature", "properties": {}, "geometry": mapping(g)} for g in geoms]
        return {"type": "FeatureCollection", "threshold": threshold, "features": feats}

    def score_at(self, x: float, y: float) -> float | None:
        gx = int((x - self.ox) // self.ts)
        gy = int((y - self.oy) // self.ts)
        ny, nx = self.grid.shape
        if 0 <= gx < nx and 0 <= gy < ny and not np.isnan(self.grid[gy, gx]):
            return float(self.grid[gy, gx])
        return None
