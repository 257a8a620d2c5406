"""The pyramidal RGB heatmap TIFF, streamed tile by tile from the small score raster.

Layout (what OpenSlide's generic-tiff reader and QuPath both open): level 0 with the slide's
level-0 size, reduced levels of exact ceil-halvings in the *main* IFD chain marked
``subfiletype=1`` (OpenSlide ignores SubIFD pyramids), tiled, RGB uint8, µm/px as X/YResolution in
centimetres (tifffile would write inches when no unit is given).

Memory: one output tile at a time. A tile is a nearest-neighbour lookup into the colour raster
(``ScoreGrid`` cells), so it is a few cells repeated; tiles with the same cells and run lengths
(all of the glass, most of the tissue interior) are encoded once and their bytes reused.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import imagecodecs
import matplotlib
import numpy as np
import tifffile

from pathopeft.files import atomic_path
from pathopeft.heatmaps.raster import ScoreGrid

__all__ = ["colorize", "level_dimensions", "write_pyramid"]

_CACHE_MAX = 4096
_BATCH = 64  # tiles prepared at a time (64 RGB 512-px tiles = 48 MiB raw at most)


def colorize(grid: ScoreGrid, colormap: str, nodata: tuple[int, int, int]) -> np.ndarray:
    """(rows, cols, 3) uint8 colours of the raster's cells; no-data cells get ``nodata``."""
    cmap = matplotlib.colormaps[colormap]
    rgb = (cmap(grid.values)[..., :3] * 255 + 0.5).astype(np.uint8)
    rgb[~grid.valid] = nodata
    return rgb


def level_dimensions(width: int, height: int, tile: int) -> list[tuple[int, int]]:
    """Level sizes: ceil-halvings of level 0 until the level fits in one tile."""
    n = max(1, math.ceil(math.log2(max(width, height) / tile)) + 1) if max(width, height) > tile else 1
    return [(math.ceil(width / 2**k), math.ceil(height / 2**k)) for k in range(n)]


def _runs(index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct consecutive values of a monotone index vector and their run lengths."""
    change = np.flatnonzero(np.diff(index)) + 1
    starts = np.concatenate([[0], change])
    lengths = np.diff(np.concatenate([starts, [len(index)]]))
    return index[starts], lengths


class _LevelTiles:
    """Encoded tiles of one level, row-major, each built from the padded colour raster."""

    def __init__(
        self,
        rgb: np.ndarray,
        grid: ScoreGrid,
        size: tuple[int, int],
        downsample: int,
        tile: int,
        encode: object,
        cache: dict[bytes, bytes],
        nodata: tuple[int, int, int],
    ) -> None:
        rows, cols = rgb.shape[:2]
        self.padded = np.empty((rows + 1, cols + 1, 3), np.uint8)  # last row/column: no data
        self.padded[:] = nodata
        self.padded[:rows, :cols] = rgb
        self.nodata_row, self.nodata_col = rows, cols
        self.grid, self.size, self.ds, self.tile = grid, size, downsample, tile
        self.encode, self.cache = encode, cache

    def _index(
        self, start: int, limit: int, origin: int, n_cells: int, nodata: int, extent: int
    ) -> np.ndarray:
        px = start + np.arange(self.tile)
        level0 = (px * self.ds + self.ds // 2).astype(np.int64)  # pixel centre on level 0
        idx = np.floor_divide(level0 - origin, self.grid.cell)
        bad = (px >= limit) | (idx < 0) | (idx >= n_cells) | (level0 >= extent)
        return np.where(bad, nodata, idx)

    def _specs(self) -> Iterator[tuple[bytes, np.ndarray, np.ndarray, np.ndarray]]:
        """(cache key, cell block, row run lengths, column run lengths) of each tile, row-major."""
        w, h = self.size
        rows, cols = self.grid.values.shape
        for ty in range(math.ceil(h / self.tile)):
            ri = self._index(ty * self.tile, h, self.grid.origin[1], rows, self.nodata_row, self.grid.height)
            r_vals, r_len = _runs(ri)
            for tx in range(math.ceil(w / self.tile)):
                ci = self._index(
                    tx * self.tile, w, self.grid.origin[0], cols, self.nodata_col, self.grid.width
                )
                c_vals, c_len = _runs(ci)
                block = self.padded[np.ix_(r_vals, c_vals)]
                yield r_len.tobytes() + b"|" + c_len.tobytes() + b"|" + block.tobytes(), block, r_len, c_len

    def _render(self, spec: tuple[bytes, np.ndarray, np.ndarray, np.ndarray]) -> bytes:
        _, block, r_len, c_len = spec
        img = np.repeat(np.repeat(block, r_len, axis=0), c_len, axis=1)
        return self.encode(np.ascontiguousarray(img))  # type: ignore[operator,no-any-return]

    def iter_encoded(self, pool: ThreadPoolExecutor | None) -> Iterator[bytes]:
        """Encoded tiles in order; uncached ones are encoded ``_BATCH`` at a time on ``pool``
        (the codecs release the GIL), so at most a batch of raw tiles is in memory."""
        specs = self._specs()
        while True:
            batch = list(itertools.islice(specs, _BATCH))
            if not batch:
                return
            todo = [s for s in batch if s[0] not in self.cache]
            done = dict(zip((s[0] for s in todo), (pool.map if pool else map)(self._render, todo)))
            for spec in batch:
                key = spec[0]
                data = self.cache.get(key) or done[key]
                if len(self.cache) < _CACHE_MAX:
                    self.cache[key] = data
                yield data


def write_pyramid(
    path: str | Path,
    grid: ScoreGrid,
    *,
    colormap: str,
    mpp: float | None,
    tile: int = 512,
    compression: str = "jpeg",
    quality: int = 90,
    nodata: tuple[int, int, int] = (255, 255, 255),
    workers: int = 0,
) -> list[tuple[int, int]]:
    """Write the heatmap TIFF atomically; returns the level sizes written.

    ``workers`` encoding threads (0 = one per CPU, at most 8; 1 = encode in this thread)."""
    rgb = colorize(grid, colormap, nodata)
    dims = level_dimensions(grid.width, grid.height, tile)
    if compression == "jpeg":
        codec, tag = (lambda a: bytes(imagecodecs.jpeg8_encode(a, level=quality))), "jpeg"
    elif compression == "deflate":
        codec, tag = (lambda a: bytes(imagecodecs.zlib_encode(a, level=6))), "zlib"
    elif compression == "none":
        codec, tag = (lambda a: a.tobytes()), None
    else:
        raise ValueError(f"unknown TIFF compression {compression!r}")
    bigtiff = grid.width * grid.height * 3 * 4 / 3 > 2**32 - 2**25  # uncompressed size bounds offsets
    n = workers or min(8, os.cpu_count() or 1)
    pool = ThreadPoolExecutor(n) if n > 1 else None
    try:
        _write_levels(path, grid, rgb, dims, tile, codec, tag, quality, mpp, nodata, bigtiff, pool)
    finally:
        if pool is not None:
            pool.shutdown()
    return dims


def _write_levels(
    path: str | Path,
    grid: ScoreGrid,
    rgb: np.ndarray,
    dims: list[tuple[int, int]],
    tile: int,
    codec: object,
    tag: str | None,
    quality: int,
    mpp: float | None,
    nodata: tuple[int, int, int],
    bigtiff: bool,
    pool: ThreadPoolExecutor | None,
) -> None:
    cache: dict[bytes, bytes] = {}
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tw:
        for k, (w, h) in enumerate(dims):
            tiles = _LevelTiles(rgb, grid, (w, h), 2**k, tile, codec, cache, nodata)
            res = 1e4 / (mpp * 2**k) if mpp else None
            tw.write(
                tiles.iter_encoded(pool),
                shape=(h, w, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                photometric="rgb",
                compression=tag,
                compressionargs={"level": quality} if tag == "jpeg" else None,
                resolution=(res, res) if res else None,
                resolutionunit="CENTIMETER" if res else None,
                subfiletype=1 if k else 0,
                metadata=None,
                description="pathopeft heatmap" if k == 0 else None,
            )
