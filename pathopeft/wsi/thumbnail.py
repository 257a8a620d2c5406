"""QC thumbnail: the slide at ≤ ``max_px`` with tissue contours and the kept tiles drawn.

The image is read at the coarsest level that is fine enough, except when that would decode a
large level the tissue mask has just decoded (a single-level slide): then the mask's own view is
reused (:func:`_reusable_view`), so the slide is decoded once for both.

Green = tissue outline, blue = holes left open, yellow squares = kept tiles (a translucent fill,
plus outlines when tiles are big enough on the thumbnail to see them). A header line states the
slide id, tile count and resolution, or the empty-mask reason. Written atomically as PNG.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from pathopeft.files import atomic_write_bytes
from pathopeft.wsi.grid import TileGrid
from pathopeft.wsi.lowres import LowRes, level_is_large, read_downsampled
from pathopeft.wsi.slide import Slide
from pathopeft.wsi.tissue import TissueMask

__all__ = ["draw_overlay", "render_thumbnail"]

_TISSUE = (0, 170, 0)
_HOLE = (0, 90, 255)
_TILE = (255, 200, 0)


def render_thumbnail(
    slide: Slide, mask: TissueMask | None, grid: TileGrid | None, out_png: str | Path, max_px: int = 1024
) -> np.ndarray:
    """Write ``out_png`` and return the RGB image drawn (for notebooks)."""
    width, height = slide.dimensions
    scale_target = max(width, height) / max_px  # level-0 px per thumbnail px
    low = _reusable_view(slide, mask, scale_target) or read_downsampled(
        slide, scale_target, coarser_tolerance=1.0
    )
    image = low.image
    if max(image.shape[:2]) > max_px:
        f = max_px / max(image.shape[:2])
        size = (max(1, round(image.shape[1] * f)), max(1, round(image.shape[0] * f)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    scale = width / image.shape[1]  # level-0 px per thumbnail px
    drawn = draw_overlay(image, mask, grid, scale)
    ok, png = cv2.imencode(".png", cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR))
    if not ok:  # pragma: no cover - OpenCV failure
        raise RuntimeError(f"{out_png}: PNG encoding failed")
    atomic_write_bytes(out_png, png.tobytes())
    return drawn


def _reusable_view(slide: Slide, mask: TissueMask | None, scale_target: float) -> LowRes | None:
    """The tissue mask's own RGB view when a direct read would decode the same large level again.

    On a single-level slide both would decode all of level 0; the mask's view (about
    ``tissue.mask_mpp`` µm/px) is used instead, so the thumbnail is then at most that fine.
    """
    source = mask.source if mask is not None else None
    if source is None:
        return None
    level = slide.best_level_for_downsample(max(scale_target, 1.0))
    return source if level == source.level and level_is_large(slide, level) else None


def draw_overlay(
    image: np.ndarray, mask: TissueMask | None, grid: TileGrid | None, scale: float
) -> np.ndarray:
    """Draw tiles and contours on a copy of ``image`` whose pixels are ``scale`` level-0 px wide."""
    out = np.ascontiguousarray(image.copy())
    thickness = max(1, round(max(out.shape[:2]) / 700))
    if grid is not None and len(grid):
        side = grid.tile_size_level0 / scale
        x0 = grid.coords[:, 0] / scale
        y0 = grid.coords[:, 1] / scale
        corners = np.stack(
            [
                np.stack([x0, y0], 1),
                np.stack([x0 + side, y0], 1),
                np.stack([x0 + side, y0 + side], 1),
                np.stack([x0, y0 + side], 1),
            ],
            axis=1,
        )
        rects = list(np.round(corners * 16).astype(np.int32))  # 4 fractional bits
        layer = out.copy()
        cv2.fillPoly(layer, rects, _TILE, lineType=cv2.LINE_8, shift=4)
        out = cv2.addWeighted(layer, 0.3, out, 0.7, 0)
        if side >= 6:
            cv2.polylines(out, rects, True, _TILE, 1, cv2.LINE_8, 4)
    if mask is not None:
        for colour, contours in ((_TISSUE, mask.contours), (_HOLE, mask.holes)):
            pts = [np.round(c / scale * 16).astype(np.int32).reshape(-1, 1, 2) for c in contours if len(c)]
            if pts:
                cv2.polylines(out, pts, True, colour, thickness, cv2.LINE_AA, 4)
    _header(out, mask, grid)
    return out


def _header(out: np.ndarray, mask: TissueMask | None, grid: TileGrid | None) -> None:
    if grid is not None:
        text = f"{grid.slide_id}: {len(grid)} tiles, {grid.tile_px}px @ {grid.target_mpp:g} um/px"
    else:
        text = ""
    if mask is not None and mask.reason:
        text = f"{text}  {mask.reason}".strip()
    if not text:
        return
    text = text.replace("µ", "u").replace("²", "2").encode("ascii", "replace").decode()  # Hershey: ASCII
    font_scale = max(0.35, out.shape[1] / 2400)
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)
    cv2.rectangle(out, (0, 0), (min(out.shape[1], tw + 8), th + base + 6), (255, 255, 255), -1)
    cv2.putText(out, text, (4, th + 3), cv2.FONT_HERSHEY_SIMPLEX, font_scale, (0, 0, 0), 1, cv2.LINE_AA)
