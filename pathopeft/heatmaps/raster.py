"""The score raster: tile scores on a coarse level-0-aligned grid, overlaps averaged, optional smoothing.

Every picture (PNG, pyramidal TIFF, regions) is drawn from this one small array, never from a
level-0-sized one. Its cell is the largest side that divides the tile size and every tile offset
(the tile stride for a regular grid, so a 100k-px slide with 448-px tiles is a 224 × 224 raster);
a tile covers ``k × k`` cells and a cell covered by several tiles holds their mean (summed with an
integral image, O(raster) whatever the overlap). Smoothing is a normalised Gaussian convolution
(sum and coverage blurred alike), so no-data cells do not pull scores down.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import shapely

__all__ = ["ScoreGrid", "build_grid", "region_geometries"]

_MIN_CELLS_PER_TILE = 16  # irregular offsets: cells no finer than tile/16 (offsets then rounded)


@dataclass
class ScoreGrid:
    """Shown scores on cells of ``cell`` level-0 px; cell (0, 0) starts at level-0 ``origin``."""

    values: np.ndarray  # (rows, cols) float32, mean shown score, 0 where no data
    valid: np.ndarray  # (rows, cols) bool, covered by at least one tile
    origin: tuple[int, int]  # level-0 x, y of cell (0, 0)'s top-left corner
    cell: int  # level-0 px per cell side
    width: int  # slide level-0 size (the raster may stop short of it or, with edge tiles, pass it)
    height: int

    def cell_index(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Row, column of level-0 points, and -1 where outside the raster."""
        col = np.floor_divide(np.asarray(x) - self.origin[0], self.cell)
        row = np.floor_divide(np.asarray(y) - self.origin[1], self.cell)
        rows, cols = self.values.shape
        bad = (col < 0) | (col >= cols) | (row < 0) | (row >= rows)
        return np.where(bad, -1, row), np.where(bad, -1, col)


def _cell_size(coords: np.ndarray, tile_size: int) -> int:
    offsets = np.unique(coords - coords.min(axis=0))
    g = int(np.gcd.reduce(np.append(offsets, int(tile_size)).astype(np.int64)))
    return max(g, max(1, int(tile_size) // _MIN_CELLS_PER_TILE))


def build_grid(
    coords: np.ndarray,
    tile_size: int,
    scores: np.ndarray,
    width: int,
    height: int,
    *,
    smooth_sigma_px: float = 0.0,
) -> ScoreGrid:
    """Average ``scores`` of tiles at level-0 ``coords`` (top-left, side ``tile_size``) onto a grid."""
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    scores = np.asarray(scores, dtype=np.float64)
    if len(coords) != len(scores):
        raise ValueError(f"{len(coords)} tile coordinates but {len(scores)} scores")
    if not len(coords):
        raise ValueError("a heatmap needs at least one tile")
    cell = _cell_size(coords, tile_size)
    origin = (int(coords[:, 0].min() % cell), int(coords[:, 1].min() % cell))
    col = (coords[:, 0] - origin[0]) // cell
    row = (coords[:, 1] - origin[1]) // cell
    k = max(1, math.ceil(tile_size / cell))
    rows, cols = int(row.max()) + k, int(col.max()) + k
    total = _box_sum(row, col, scores, rows, cols, k)
    count = _box_sum(row, col, np.ones_like(scores), rows, cols, k)
    valid = count > 0.5
    if smooth_sigma_px > 0:
        from scipy.ndimage import gaussian_filter

        sigma = smooth_sigma_px / cell
        total = gaussian_filter(total, sigma, mode="constant")
        count_s = gaussian_filter(count, sigma, mode="constant")
        values = np.where(valid, total / np.maximum(count_s, 1e-12), 0.0)
    else:
        values = np.where(valid, total / np.maximum(count, 1.0), 0.0)
    return ScoreGrid(
        values=np.clip(values, 0.0, 1.0).astype(np.float32),
        valid=valid,
        origin=origin,
        cell=int(cell),
        width=int(width),
        height=int(height),
    )


def _box_sum(row: np.ndarray, col: np.ndarray, w: np.ndarray, rows: int, cols: int, k: int) -> np.ndarray:
    """out[r, c] = Σ w of tiles whose k×k footprint (top-left row, col) covers cell (r, c)."""
    points = np.zeros((rows + 1, cols + 1), dtype=np.float64)
    np.add.at(points, (row + 1, col + 1), w)
    integral = points.cumsum(0).cumsum(1)
    r = np.arange(rows)[:, None] + 1
    c = np.arange(cols)[None, :] + 1
    r0, c0 = np.maximum(r - k, 0), np.maximum(c - k, 0)
    return integral[r, c] - integral[r0, c] - integral[r, c0] + integral[r0, c0]


def region_geometries(
    grid: ScoreGrid, threshold: float, *, min_cells: int = 1
) -> list[tuple[shapely.Geometry, float, float, int]]:
    """Connected regions (4-connected cells) with shown score ≥ threshold: (geometry, mean, max, cells).

    Geometries are exact unions of cell squares (holes kept), in level-0 px of the full frame,
    clipped to the slide. Integer vertices: valid at any snapping grid.
    """
    from scipy.ndimage import label

    mask = grid.valid & (grid.values >= threshold)
    labels, n = label(mask)
    if n == 0:
        return []
    frame = shapely.box(0, 0, grid.width, grid.height)
    out = []
    ox, oy, s = grid.origin[0], grid.origin[1], grid.cell
    for index in range(1, n + 1):
        rr, cc = np.nonzero(labels == index)
        if len(rr) < min_cells:
            continue
        boxes = []
        for r in np.unique(rr):
            run = np.sort(cc[rr == r])
            breaks = np.flatnonzero(np.diff(run) > 1)
            starts = np.concatenate([[run[0]], run[breaks + 1]])
            ends = np.concatenate([run[breaks], [run[-1]]]) + 1
            y0 = oy + int(r) * s
            boxes.extend(shapely.box(ox + a * s, y0, ox + b * s, y0 + s) for a, b in zip(starts, ends))
        geom = shapely.intersection(shapely.union_all(boxes), frame)
        geom = shapely.make_valid(geom) if not geom.is_valid else geom
        if geom.is_empty:
            continue
        vals = grid.values[rr, cc]
        out.append((geom, float(vals.mean()), float(vals.max()), len(rr)))
    return out
