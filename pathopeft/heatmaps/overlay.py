"""The PNG overlay: the slide thumbnail with the heatmap blended over scored tissue only.

Cells no tile covers keep the thumbnail's own pixels (no-data is transparent, never black). The
thresholded regions are outlined, and a colour bar inset in the bottom-left corner names the
score and marks the threshold. The PNG has exactly the thumbnail's size, so it lies over the
slide by a single scale factor (level-0 width / PNG width).
"""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from pathopeft.files import atomic_write_bytes
from pathopeft.heatmaps.pyramid import colorize
from pathopeft.heatmaps.raster import ScoreGrid

__all__ = ["render_overlay", "thumbnail_lookup", "write_png"]


def thumbnail_lookup(grid: ScoreGrid, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Row and column raster indices of each thumbnail pixel centre (-1 outside the raster)."""
    tw, th = size
    x = (np.arange(tw) + 0.5) * grid.width / tw
    y = (np.arange(th) + 0.5) * grid.height / th
    rows, cols = grid.values.shape
    ci = np.floor_divide(x - grid.origin[0], grid.cell).astype(np.int64)
    ri = np.floor_divide(y - grid.origin[1], grid.cell).astype(np.int64)
    ci[(ci < 0) | (ci >= cols)] = -1
    ri[(ri < 0) | (ri >= rows)] = -1
    return ri, ci


def render_overlay(
    thumbnail: np.ndarray,
    grid: ScoreGrid,
    *,
    colormap: str,
    threshold: float,
    label: str,
    alpha: float = 0.5,
    outline_px: int = 2,
) -> np.ndarray:
    """(H, W, 3) uint8: ``thumbnail`` with the heatmap, region outlines and a colour bar."""
    out = np.ascontiguousarray(thumbnail[..., :3]).copy()
    th, tw = out.shape[:2]
    ri, ci = thumbnail_lookup(grid, (tw, th))
    inside = (ri[:, None] >= 0) & (ci[None, :] >= 0)
    r = np.clip(ri, 0, None)[:, None]
    c = np.clip(ci, 0, None)[None, :]
    covered = inside & grid.valid[r, c]
    color = colorize(grid, colormap, (0, 0, 0))[r, c]
    blend = out.astype(np.float32) * (1 - alpha) + color.astype(np.float32) * alpha
    out[covered] = (blend[covered] + 0.5).astype(np.uint8)
    if outline_px > 0:
        hot = (covered & (grid.values[r, c] >= threshold)).astype(np.uint8)
        contours, _ = cv2.findContours(hot, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, (0, 0, 0), outline_px)
    _colorbar(out, colormap, threshold, label)
    return out


def _colorbar(out: np.ndarray, colormap: str, threshold: float, label: str) -> None:
    import matplotlib

    th, tw = out.shape[:2]
    bar_w, bar_h = max(32, tw // 3), max(6, th // 40)
    pad = max(2, th // 100)
    scale = max(0.3, bar_h / 20)
    text_h = int(22 * scale) + pad
    x0, y1 = pad, th - pad - text_h
    y0 = y1 - bar_h
    if y0 < 0 or x0 + bar_w > tw:
        return  # too small a thumbnail for a legend
    ramp = matplotlib.colormaps[colormap](np.linspace(0, 1, bar_w))[:, :3] * 255
    panel = out[max(0, y0 - pad) : th, 0 : min(tw, x0 + bar_w + pad)]
    panel[:] = (panel.astype(np.float32) * 0.3 + 255 * 0.7).astype(np.uint8)  # light backing
    out[y0:y1, x0 : x0 + bar_w] = ramp[None, :, :].astype(np.uint8)
    tx = x0 + round(threshold * (bar_w - 1))
    out[y0:y1, max(tx - 1, 0) : tx + 1] = 0  # threshold tick
    font = cv2.FONT_HERSHEY_SIMPLEX
    cv2.putText(out, f"0  {label}  (thr {threshold:g})  1", (x0, th - pad - 2), font, scale, (0, 0, 0), 1)


def write_png(path: str | Path, image: np.ndarray) -> None:
    """Write an RGB PNG atomically."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", optimize=False)
    atomic_write_bytes(path, buf.getvalue())
