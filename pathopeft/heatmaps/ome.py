"""Optional OME-TIFF of the shown float scores (for QuPath through Bio-Formats).

One float32 channel on the slide's level-0 geometry, NaN where no tile was scored; the reduced
levels are SubIFDs (the OME-TIFF pyramid convention Bio-Formats reads), µm/px in the OME
metadata. Streamed tile by tile from the score raster, like the RGB pyramid.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tifffile

from pathopeft.files import atomic_path
from pathopeft.heatmaps.pyramid import level_dimensions
from pathopeft.heatmaps.raster import ScoreGrid

__all__ = ["write_ome_scores"]


def _tiles(grid: ScoreGrid, size: tuple[int, int], ds: int, tile: int) -> Iterator[np.ndarray]:
    rows, cols = grid.values.shape
    padded = np.full((rows + 1, cols + 1), np.nan, np.float32)
    padded[:rows, :cols] = np.where(grid.valid, grid.values, np.nan)
    w, h = size

    def index(start: int, limit: int, origin: int, n: int, extent: int) -> np.ndarray:
        px = start + np.arange(tile)
        level0 = px * ds + ds // 2
        idx = np.floor_divide(level0 - origin, grid.cell)
        return np.where((px >= limit) | (idx < 0) | (idx >= n) | (level0 >= extent), n, idx)

    for ty in range(math.ceil(h / tile)):
        ri = index(ty * tile, h, grid.origin[1], rows, grid.height)
        for tx in range(math.ceil(w / tile)):
            ci = index(tx * tile, w, grid.origin[0], cols, grid.width)
            yield padded[np.ix_(ri, ci)]


def write_ome_scores(path: str | Path, grid: ScoreGrid, *, mpp: float | None, tile: int = 512) -> None:
    """Write ``<slide>.ome.tiff`` atomically (deflate-compressed float32, SubIFD pyramid)."""
    dims = level_dimensions(grid.width, grid.height, tile)
    metadata: dict[str, object] = {"axes": "YX", "Name": "pathopeft heatmap score"}
    if mpp:
        metadata.update(PhysicalSizeX=mpp, PhysicalSizeXUnit="µm", PhysicalSizeY=mpp, PhysicalSizeYUnit="µm")
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as tw:
        for k, (w, h) in enumerate(dims):
            tw.write(
                _tiles(grid, (w, h), 2**k, tile),
                shape=(h, w),
                dtype=np.float32,
                tile=(tile, tile),
                compression="zlib",
                subifds=len(dims) - 1 if k == 0 else None,
                subfiletype=1 if k else 0,
                metadata=metadata if k == 0 else None,
                resolution=(1e4 / (mpp * 2**k),) * 2 if mpp else None,
                resolutionunit="CENTIMETER" if mpp else None,
            )
