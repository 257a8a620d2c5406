"""Tissue detection on a low-resolution view of the slide.

Steps (every parameter in :class:`~pathopeft.config.wsi.TissueConfig`):

1. read the slide at about ``mask_mpp`` µm/px (:func:`pathopeft.wsi.lowres.read_downsampled`:
   a coarse pyramid level, or strips of a finer one averaged down — never a full-resolution
   decode of a big slide into memory);
2. modality: brightfield (stained tissue on white glass) or fluorescence (bright tissue on a dark
   background); ``auto`` decides from the median brightness;
3. signal = HSV saturation (brightfield: glass is unsaturated whatever its brightness) or
   brightness V (fluorescence), median-blurred; in brightfield, pen ink (``pen_filter``: blue,
   green by default; black, red on request) is found by hue (:data:`PEN_HSV`), grown by
   ``pen_margin_um`` and set to 0, so marker strokes never count as tissue;
4. threshold: fixed, or Otsu's with a floor (``min_threshold``) so an image without tissue does not
   get its noise split in two;
5. morphological closing, hole filling (holes below ``min_hole_um2``), removal of regions below
   ``min_region_um2`` — all sizes in µm/µm², converted with the mask's own µm/px.

The result, :class:`TissueMask`, also carries the contours in level-0 coordinates and, when it is
empty, the reason in words (the ``tile`` manifest reports it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from pathopeft.config.wsi import TissueConfig
from pathopeft.wsi.lowres import LowRes, level_is_large, read_downsampled
from pathopeft.wsi.slide import Slide

__all__ = [
    "FLUORESCENCE_MEDIAN_BELOW",
    "MAX_MASK_PX",
    "PEN_HSV",
    "TissueMask",
    "detect_tissue",
    "pen_mask",
    "segment_tissue",
]

# Median brightness (0–255) below which ``modality: auto`` calls a slide fluorescence: glass in
# brightfield is near white (> 200) and even a slide covered in dense H&E tissue stays > 120.
FLUORESCENCE_MEDIAN_BELOW = 80

# Pen ink by OpenCV HSV (H 0-180, S and V 0-255): (H ranges, S min, V max). Set on real H&E at
# 0.5-8 µm/px (the shared CMU-1 region and MoNuSeg tiles): stained tissue has H ≥ ~125 (purple to
# pink) or ≤ 8 (red-pink), so blue (H 95-120, strongly saturated) removes ≤ 0.5% of tissue pixels
# there and green (H 40-94) none; red (saturated H ≤ 8 or ≥ 172) takes up to 3% of eosin-rich
# tissue and black (V < 60) dark debris and folds too, hence opt-in.
PEN_HSV: dict[str, tuple[tuple[tuple[int, int], ...], int, int]] = {
    "blue": (((95, 120),), 80, 255),
    "green": (((40, 94),), 50, 255),
    "red": (((0, 8), (172, 180)), 150, 255),
    "black": (((0, 180),), 0, 59),
}

# Longest side of a tissue mask: 16k px keeps 8 µm/px up to 13 cm slides and bounds memory
# (~270 MB for the mask and its intermediates) when the µm/px metadata is absurd.
MAX_MASK_PX = 16384


@dataclass
class TissueMask:
    """A binary tissue mask and what is known about it."""

    mask: np.ndarray  # (h, w) uint8, 1 = tissue
    downsample: float  # level-0 px per mask px
    mpp: float  # µm per mask px
    modality: str  # "brightfield" | "fluorescence"
    threshold: float  # the threshold actually applied (after Otsu)
    contours: list[np.ndarray] = field(default_factory=list)  # outer outlines, (K, 2) float level-0 px
    holes: list[np.ndarray] = field(default_factory=list)  # hole outlines kept open, level-0 px
    reason: str | None = None  # why the mask is empty (None when it is not)
    level: int = 0  # pyramid level the mask was computed from
    # The RGB view the mask was computed from, kept only when reading it decoded a large level
    # (a single-level slide): the thumbnail reuses it instead of decoding that level again.
    source: LowRes | None = field(default=None, repr=False)

    @property
    def area_um2(self) -> float:
        return float(self.mask.sum(dtype=np.int64)) * self.mpp * self.mpp

    @property
    def is_empty(self) -> bool:
        return not bool(self.mask.any())


def detect_tissue(slide: Slide, cfg: TissueConfig | None = None) -> TissueMask:
    """Tissue mask of ``slide`` at about ``cfg.mask_mpp`` µm/px (needs the slide's µm/px)."""
    cfg = cfg or TissueConfig()
    slide_mpp = slide.mpp  # MissingMppError: physical thresholds need a physical scale
    # Bound the mask's size whatever the metadata says (a bogus 352 µm/px would ask for level 0).
    downsample = max(cfg.mask_mpp / slide_mpp, max(slide.dimensions) / MAX_MASK_PX)
    low = read_downsampled(slide, downsample)
    result = segment_tissue(low.image, slide_mpp * low.downsample, cfg)
    result.downsample = low.downsample
    result.level = low.level
    result.source = low if level_is_large(slide, low.level) else None
    result.contours = [(c + 0.5) * low.downsample for c in result.contours]
    result.holes = [(c + 0.5) * low.downsample for c in result.holes]
    return result


def segment_tissue(image: np.ndarray, mpp: float, cfg: TissueConfig) -> TissueMask:
    """Segment an RGB image at ``mpp`` µm/px; contours come back in the image's own pixels."""
    modality = _modality(image, cfg.modality)
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    # Brightfield: saturation (white and grey glass are unsaturated). Fluorescence: brightness.
    signal = np.ascontiguousarray(hsv[..., 1] if modality == "brightfield" else hsv[..., 2])
    median = _odd(cfg.median_um / mpp)
    if median >= 3:
        signal = cv2.medianBlur(signal, median)
    pen_px = 0
    if modality == "brightfield" and cfg.pen_filter:
        pen = _pen_255(image, hsv, cfg.pen_filter, cfg.pen_margin_um / mpp)
        pen_px = int(cv2.countNonZero(pen))
        if pen_px:
            signal = cv2.subtract(signal, pen)  # saturates to 0 on ink
    threshold, reason = _threshold(signal, cfg, modality)
    mask = (signal > threshold).astype(np.uint8)
    closing = _odd(cfg.closing_um / mpp)
    if closing >= 3 and mask.any():
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (closing, closing))
        # Pad so closing does not glue tissue to the image border.
        pad = closing
        padded = cv2.copyMakeBorder(mask, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0)
        mask = cv2.morphologyEx(padded, cv2.MORPH_CLOSE, kernel)[pad:-pad, pad:-pad]
    px_area = mpp * mpp
    if mask.any():
        min_hole = (
            None
            if not cfg.fill_holes
            else (np.inf if cfg.min_hole_um2 is None else cfg.min_hole_um2 / px_area)
        )
        mask, largest = _clean(mask, cfg.min_region_um2 / px_area, min_hole)
        if not mask.any():
            reason = (
                f"no tissue: every region is smaller than tissue.min_region_um2={cfg.min_region_um2:g} µm² "
                f"(largest {largest * px_area:.0f} µm²)"
            )
    elif reason is None:
        reason = f"no tissue: no pixel above the {modality} threshold {threshold:g}"
    if reason and pen_px:
        reason += f" ({pen_px} px of pen ink removed first, tissue.pen_filter={cfg.pen_filter})"
    contours, holes = _contours(mask)
    return TissueMask(
        mask=mask,
        downsample=1.0,
        mpp=mpp,
        modality=modality,
        threshold=float(threshold),
        contours=contours,
        holes=holes,
        reason=None if mask.any() else reason,
    )


def _modality(image: np.ndarray, wanted: str) -> str:
    if wanted != "auto":
        return wanted
    gray = cv2.cvtColor(image[::4, ::4], cv2.COLOR_RGB2GRAY)  # a 1/16 sample is plenty for a median
    return "fluorescence" if float(np.median(gray)) < FLUORESCENCE_MEDIAN_BELOW else "brightfield"


def pen_mask(hsv: np.ndarray, pens: list[str], margin_px: int = 0) -> np.ndarray:
    """uint8 mask (1 = pen ink) of an HSV image for the named pen colours (:data:`PEN_HSV`).

    Opened with a 3 × 3 kernel first: a marker stroke is many pixels wide at any mask
    resolution, while the few tissue pixels that fall in a pen's hue range are isolated specks
    (on the real CMU-1 region the opening cuts the tissue lost from 1.8% to < 1%). Then dilated
    by ``margin_px`` so the stroke's edges, blended with glass or tissue, go too.
    """
    return _pen_hsv_255(hsv, pens, margin_px) // 255


# Above this many mask pixels the pen mask is found at half resolution (strokes are hundreds of
# µm wide, so nothing is lost; on a 6250² mask it saves ~0.2 s of the ~1 s segmentation).
PEN_HALF_RES_PX = 4096 * 4096


def _pen_255(image: np.ndarray, hsv: np.ndarray, pens: list[str], margin_px: float) -> np.ndarray:
    """Pen mask (0/255) of ``image``, computed at half resolution for large images."""
    h, w = image.shape[:2]
    if h * w <= PEN_HALF_RES_PX:
        return _pen_hsv_255(hsv, pens, round(margin_px))
    small = cv2.resize(image, (max(1, w // 2), max(1, h // 2)), interpolation=cv2.INTER_AREA)
    half = _pen_hsv_255(cv2.cvtColor(small, cv2.COLOR_RGB2HSV), pens, round(margin_px / 2))
    return cv2.resize(half, (w, h), interpolation=cv2.INTER_NEAREST)


def _pen_hsv_255(hsv: np.ndarray, pens: list[str], margin_px: int) -> np.ndarray:
    out: np.ndarray | None = None
    for pen in pens:
        hue_ranges, s_min, v_max = PEN_HSV[pen]
        for h_lo, h_hi in hue_ranges:
            hit = cv2.inRange(hsv, (h_lo, s_min, 0), (h_hi, 255, v_max))  # 0 / 255
            out = hit if out is None else cv2.bitwise_or(out, hit)
    if out is None:
        return np.zeros(hsv.shape[:2], np.uint8)
    if cv2.countNonZero(out):
        out = cv2.morphologyEx(out, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3)))
    if margin_px > 0 and cv2.countNonZero(out):
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * margin_px + 1, 2 * margin_px + 1))
        out = cv2.dilate(out, kernel)
    return out


def _threshold(signal: np.ndarray, cfg: TissueConfig, modality: str) -> tuple[float, str | None]:
    if cfg.threshold != "otsu":
        return float(cfg.threshold), None
    lo, hi = int(signal.min()), int(signal.max())
    otsu, _ = cv2.threshold(signal, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    threshold = max(float(otsu), float(cfg.min_threshold))
    reason = None
    if hi <= threshold:
        what = "saturation" if modality == "brightfield" else "brightness"
        reason = (
            f"no tissue: {what} is uniform (range {lo}–{hi}), nothing reaches the threshold "
            f"{threshold:g} (Otsu {otsu:g}, floor tissue.min_threshold={cfg.min_threshold})"
        )
    return threshold, reason


def _odd(size: float) -> int:
    n = round(size)
    return n if n % 2 == 1 else n + 1 if n > 0 else 0


def _clean(mask: np.ndarray, min_region: float, fill_below: float | None) -> tuple[np.ndarray, float]:
    """Drop regions smaller than ``min_region`` px and fill holes smaller than ``fill_below`` px.

    Works on the contour tree, not on connected-component labels: on a 6k × 6k mask (a 100k-px
    slide at 8 µm/px) labelling twice costs ~1 s, the contour tree ~0.05 s. Areas are pixel counts
    (:func:`_region_px`), not ``cv2.contourArea``: the polygon through the boundary pixels' centres
    misses half of every boundary pixel, so a small fragment measured ~20% small (issue 13 item 11).
    Contours are redrawn by depth (tissue, its holes, islands inside holes, ...). A hole's outline
    runs through the tissue pixels around it, so a hole kept open is filled with 0 and its outline
    redrawn with 1.
    Returns the new mask and the largest region area seen (px), for the empty-mask reason.
    """
    found, hierarchy = cv2.findContours(mask, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)
    if not found:
        return mask, 0.0
    parents = hierarchy[0][:, 3]
    depth = np.zeros(len(found), np.int64)
    for i in range(len(found)):  # per contour (tens to thousands), not per pixel
        j = parents[i]
        while j >= 0:
            depth[i] += 1
            j = parents[j]
    areas = np.array([_region_px(c, hole=bool(d % 2)) for c, d in zip(found, depth)], dtype=np.float64)
    outer_areas = areas[depth % 2 == 0]
    largest = float(outer_areas.max()) if len(outer_areas) else 0.0
    out = np.zeros_like(mask)
    dropped = np.zeros(len(found), bool)
    for i in np.argsort(depth, kind="stable"):
        if parents[i] >= 0 and dropped[parents[i]]:
            dropped[i] = True  # inside a dropped region or a filled hole: follows its parent
            continue
        if depth[i] % 2 == 0:  # tissue outline
            if areas[i] < min_region:
                dropped[i] = True
                continue
            cv2.drawContours(out, found, int(i), 1, thickness=cv2.FILLED)
        else:  # hole outline
            if fill_below is not None and areas[i] < fill_below:
                dropped[i] = True  # filled: anything inside it is tissue already
                continue
            cv2.drawContours(out, found, int(i), 0, thickness=cv2.FILLED)
            cv2.drawContours(out, found, int(i), 1, thickness=1)
    return out, largest


def _region_px(contour: np.ndarray, *, hole: bool) -> int:
    """Pixels of the region a contour bounds, counted on a crop of its bounding box.

    A tissue outline runs through the region's own boundary pixels: they count. A hole's outline
    runs through the tissue pixels around the hole: they do not (filled minus outline). Holes
    inside the region are included (as ``contourArea`` did); the cost is the bounding box's area.
    """
    x, y, w, h = cv2.boundingRect(contour)
    crop = np.zeros((h, w), np.uint8)
    shifted = [contour - np.array([[[x, y]]], dtype=contour.dtype)]
    cv2.drawContours(crop, shifted, 0, 1, thickness=cv2.FILLED)
    if hole:
        cv2.drawContours(crop, shifted, 0, 0, thickness=1)
    return int(cv2.countNonZero(crop))


def _contours(mask: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
    if not mask.any():
        return [], []
    found, hierarchy = cv2.findContours(mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    outer, holes = [], []
    for contour, info in zip(found, hierarchy[0]):
        points = contour.reshape(-1, 2).astype(np.float64)
        (holes if info[3] >= 0 else outer).append(points)
    return outer, holes
