"""The tile grid: where to cut tiles of ``tile_px`` pixels at ``target_mpp`` µm/px, and which to keep.

Geometry (DESIGN: "tile size on level 0 is patch_size · downsample"):

* ``downsample = target_mpp / slide_mpp`` — level-0 pixels per output pixel;
* ``tile_size_level0 = tile_px · downsample`` — the tile's extent on level 0 (float);
* read level = the coarsest pyramid level not coarser than the target
  (:meth:`Slide.best_level_for_downsample`), so tiles are only ever downsampled when resized;
* ``read_size = round(tile_size_level0 / level_downsample)`` — the square read at that level and
  resized to ``tile_px``.

Positions: a regular grid from the slide's top-left with stride ``(tile_px − overlap_px) ·
downsample``. When the read level's downsample is a whole number, positions are whole level
pixels (so both readers return identical pixels, see ``tiff_backend``). Tiles crossing the
right/bottom edge are dropped unless ``keep_partial`` (then the outside is read as white).

A slide scanned coarser than the target (mpp 1.0, target 0.5) is read at level 0 with
``read_size < tile_px`` and upsampled, with a logged warning (``allow_upsample: false`` makes
it an error instead): refusing would silently drop such cohorts, and the warning says what
happens.

Tissue fraction: the exact area of the tile's rectangle covered by the (piecewise-constant)
mask, computed for all tiles at once from per-tile-row band sums and a cumulative sum along x —
no per-tile Python loop, memory ``O(tile rows × mask width)``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

from pathopeft.config.wsi import GridConfig
from pathopeft.wsi.slide import Slide, SlideError
from pathopeft.wsi.tissue import TissueMask

__all__ = ["TileGrid", "build_grid", "tile_tissue_fraction"]

log = logging.getLogger(__name__)


@dataclass
class TileGrid:
    """Tiles of one slide: level-0 top-left coordinates plus everything needed to read them."""

    coords: np.ndarray = field(repr=False)  # (N, 2) int64 level-0 x, y of the top-left corner
    tissue_fraction: np.ndarray = field(repr=False)  # (N,) float32, by the tissue mask
    tile_px: int  # output tile size (pixels at target_mpp)
    level: int  # pyramid level to read from
    level_downsample: float  # that level's downsample
    read_size: int  # square size read at `level`, resized to tile_px
    tile_size_level0: float  # tile extent on level 0 (= tile_px * downsample)
    downsample: float  # level-0 px per output px (= target_mpp / slide_mpp)
    slide_mpp: float
    target_mpp: float
    slide_id: str = ""
    overlap_px: int = 0
    slide_dimensions: tuple[int, int] = field(default=(0, 0))
    # openslide.bounds-x/y: QuPath's frame starts there (GeoJSON annotations are offset by it).
    bounds_offset: tuple[int, int] = field(default=(0, 0))

    def __len__(self) -> int:
        return int(self.coords.shape[0])

    def __repr__(self) -> str:
        return (
            f"TileGrid({self.slide_id!r}, n={len(self)}, tile_px={self.tile_px}, "
            f"target_mpp={self.target_mpp:g}, "
            f"level={self.level}, read_size={self.read_size}, tile_size_level0={self.tile_size_level0:g})"
        )

    @classmethod
    def from_tissue(cls, slide: Slide, mask: TissueMask, cfg: GridConfig | None = None) -> TileGrid:
        return build_grid(slide, mask, cfg)


def build_grid(slide: Slide, mask: TissueMask, cfg: GridConfig | None = None) -> TileGrid:
    """Tile grid of ``slide`` at ``cfg.target_mpp``, keeping tiles with enough tissue in ``mask``."""
    cfg = cfg or GridConfig()
    slide_mpp = slide.mpp
    downsample = cfg.target_mpp / slide_mpp
    if downsample < 1 - 1e-6:
        if not cfg.allow_upsample:
            raise SlideError(
                f"{slide.path}: scanned at {slide_mpp:g} µm/px, "
                f"coarser than grid.target_mpp={cfg.target_mpp:g} "
                "(set grid.allow_upsample: true to upsample)"
            )
        if 1 / downsample > cfg.max_upsample:
            raise SlideError(
                f"{slide.path}: {slide_mpp:g} µm/px is {1 / downsample:.0f}x coarser than "
                f"grid.target_mpp={cfg.target_mpp:g} (more than grid.max_upsample={cfg.max_upsample:g}); "
                "the µm/px metadata is probably wrong: pass --mpp or a CSV 'mpp' column"
            )
        log.warning(
            "%s: scanned at %g µm/px, coarser than the target %g µm/px: tiles are upsampled %.2fx",
            slide.slide_id,
            slide_mpp,
            cfg.target_mpp,
            1 / downsample,
        )
    level = slide.best_level_for_downsample(downsample)
    level_ds = slide.level_downsamples[level]
    tile0 = cfg.tile_px * downsample
    stride0 = (cfg.tile_px - cfg.overlap_px) * downsample
    read_size = max(1, round(tile0 / level_ds))
    width, height = slide.dimensions
    level_w, level_h = slide.level_dimensions[level]

    xs = _positions(width, level_w, tile0, stride0, level_ds, read_size, cfg.keep_partial)
    ys = _positions(height, level_h, tile0, stride0, level_ds, read_size, cfg.keep_partial)
    coords = np.stack(np.meshgrid(xs, ys), axis=-1).reshape(-1, 2).astype(np.int64)
    fraction = tile_tissue_fraction(mask, xs, ys, tile0).reshape(-1)
    keep = (
        fraction >= cfg.min_tissue_fraction if cfg.min_tissue_fraction > 0 else np.ones_like(fraction, bool)
    )
    return TileGrid(
        coords=coords[keep],
        tissue_fraction=fraction[keep].astype(np.float32),
        tile_px=cfg.tile_px,
        level=level,
        level_downsample=float(level_ds),
        read_size=int(read_size),
        tile_size_level0=float(tile0),
        downsample=float(downsample),
        slide_mpp=float(slide_mpp),
        target_mpp=float(cfg.target_mpp),
        slide_id=slide.slide_id,
        overlap_px=cfg.overlap_px,
        slide_dimensions=(int(width), int(height)),
        bounds_offset=slide.bounds_offset,
    )


def _positions(
    extent0: int,
    extent_level: int,
    tile0: float,
    stride0: float,
    level_ds: float,
    read_size: int,
    partial: bool,
) -> np.ndarray:
    """Level-0 start positions along one axis (int64), whole level pixels when ``level_ds`` is whole."""
    n = max(0, math.floor((extent0 - 1) / stride0) + 1) if extent0 > 0 else 0
    if abs(level_ds - round(level_ds)) < 1e-9:
        ds = round(level_ds)
        level_pos = np.round(np.arange(n) * (stride0 / ds)).astype(np.int64)
        pos = level_pos * ds
        inside = (level_pos + read_size <= extent_level) & (pos + tile0 <= extent0 + 1e-6)
    else:
        pos = np.round(np.arange(n) * stride0).astype(np.int64)
        level_pos = np.floor(pos / level_ds + 1e-9).astype(np.int64)
        inside = (level_pos + read_size <= extent_level) & (pos + tile0 <= extent0 + 1e-6)
    return pos if partial else pos[inside]


def tile_tissue_fraction(mask: TissueMask, xs: np.ndarray, ys: np.ndarray, tile0: float) -> np.ndarray:
    """(len(ys), len(xs)) fraction of each level-0 square ``[x, x+tile0) × [y, y+tile0)`` that is tissue.

    The mask is treated as piecewise constant (pixel ``j`` covers ``[j·d, (j+1)·d)`` on level 0);
    the covered area is exact, including partial mask pixels at the tile's edges. Parts of a tile
    outside the mask count as non-tissue.
    """
    m = mask.mask
    if len(xs) == 0 or len(ys) == 0 or m.size == 0:
        return np.zeros((len(ys), len(xs)), np.float32)
    d = mask.downsample
    h, w = m.shape
    side = tile0 / d  # tile side in mask pixels
    y0 = np.clip(ys / d, 0, h)
    y1 = np.clip((ys + tile0) / d, 0, h)
    bands = np.zeros((len(ys), w + 1), np.float64)  # cumulative along x of each tile row's band
    for k, (a, b) in enumerate(zip(y0, y1)):  # one iteration per tile row, not per tile
        if b <= a:
            continue
        ia, ib = math.floor(a), math.ceil(b)
        weights = np.ones(ib - ia, np.float32)
        weights[0] -= a - ia
        weights[-1] -= ib - b
        bands[k, 1:] = np.cumsum(weights @ m[ia:ib].astype(np.float32))
    x0 = np.clip(xs / d, 0, w)
    x1 = np.clip((xs + tile0) / d, 0, w)
    area = _interp_rows(bands, x1) - _interp_rows(bands, x0)
    return (area / (side * side)).astype(np.float32)


def _interp_rows(cum: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Linear interpolation of each row of ``cum`` (sampled at 0..w) at positions ``x`` → (rows, len(x))."""
    w = cum.shape[1] - 1
    i = np.minimum(np.floor(x).astype(np.int64), max(w - 1, 0))
    f = (x - i)[None, :]
    return cum[:, i] * (1 - f) + cum[:, np.minimum(i + 1, w)] * f
