"""Low-resolution views of a slide with bounded memory (tissue masks, thumbnails).

Reading "the whole slide" is only ever done at a coarse pyramid level. When the pyramid has no
level coarse enough (a single-level 100k-px slide, or a 2-level one), the finest level that is
not coarser than the target is read in horizontal strips, each strip area-averaged by an integer
factor before the next is read: peak memory is one strip (``STRIP_BYTES``) plus the output.
"""

from __future__ import annotations

import math

import numpy as np

from pathopeft.wsi.slide import Slide

__all__ = ["STRIP_BYTES", "LowRes", "level_is_large", "read_downsampled"]

STRIP_BYTES = 64 * 1024 * 1024  # RGB bytes read per strip before averaging


class LowRes:
    """An RGB image of the whole slide and its scale."""

    def __init__(self, image: np.ndarray, level: int, downsample: float) -> None:
        self.image = image  # (h, w, 3) uint8
        self.level = level  # pyramid level it was read from
        self.downsample = downsample  # level-0 px per image px


def level_is_large(slide: Slide, level: int) -> bool:
    """Whether decoding all of ``level`` is expensive (more than one strip, ``STRIP_BYTES``).

    Such a read is worth sharing: on a single-level slide the tissue mask and the thumbnail
    would otherwise each decode level 0 (issue 13 item 15).
    """
    width, height = slide.level_dimensions[level]
    return width * height * 3 > STRIP_BYTES


def read_downsampled(slide: Slide, downsample: float, *, coarser_tolerance: float = 1.5) -> LowRes:
    """The slide at about ``downsample`` (level-0 px per output px), never decoding more than needed.

    Picks the coarsest level whose downsample is at most ``downsample * coarser_tolerance`` (a
    slightly coarser level is fine and much cheaper than a finer one); if that level is still
    finer than ``downsample`` by a factor ≥ 2, it is read in strips and area-averaged by that
    integer factor.
    """
    target = max(float(downsample), 1.0)
    level = slide.best_level_for_downsample(target * coarser_tolerance)
    level_ds = slide.level_downsamples[level]
    factor = max(1, math.floor(target / level_ds + 1e-9))
    width, height = slide.level_dimensions[level]
    if factor == 1 and width * height * 3 <= STRIP_BYTES:
        return LowRes(slide.read_level(level), level, level_ds)
    out_w, out_h = math.ceil(width / factor), math.ceil(height / factor)
    out = np.empty((out_h, out_w, 3), np.uint8)
    rows = max(factor, (STRIP_BYTES // max(width * 3, 1)) // factor * factor)
    whole = abs(level_ds - round(level_ds)) < 1e-9
    for y in range(0, height, rows):
        strip_h = min(rows, height - y)
        if whole:  # level row y is level-0 row y * ds exactly
            strip = slide.read_region((0, round(y * level_ds)), level, (width, strip_h))
        else:  # no level-0 row maps exactly onto level row y: read level rows directly
            strip = slide.read_level_pixels(level, 0, y, (width, strip_h))
        out[y // factor : y // factor + math.ceil(strip_h / factor)] = _block_mean(strip, factor)
    return LowRes(out, level, level_ds * factor)


def _block_mean(img: np.ndarray, f: int) -> np.ndarray:
    """Average ``f × f`` blocks (edge blocks are padded by replicating the last row/column)."""
    if f == 1:
        return img
    h, w = img.shape[:2]
    ph, pw = math.ceil(h / f) * f, math.ceil(w / f) * f
    if (ph, pw) != (h, w):
        img = np.pad(img, ((0, ph - h), (0, pw - w), (0, 0)), mode="edge")
    blocks = img.reshape(ph // f, f, pw // f, f, 3).astype(np.uint32).sum(axis=(1, 3))
    return ((blocks + (f * f) // 2) // (f * f)).astype(np.uint8)
