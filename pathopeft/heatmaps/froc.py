"""CAMELYON16 lesion-level FROC: detections from tile scores, evaluation masks, MONAI's scoring.

Detections are the tiles whose shown score is the highest within ``nms_radius_um`` (greedy
non-maximum suppression, highest first), at the tile centre, written as the official per-slide
CSV (``prob,x,y``, no header, integer level-0 px).

The ground truth follows the official ``Evaluation_FROC.py`` (via MONAI's copies of its steps):
the tumour polygons are rasterised at ``eval_level`` (level-0 / 2**level), grown by a Euclidean
distance ``grow_um / 2`` (the official threshold ``75 / (resolution · 2**level · 2)``), holes
filled, labelled with 8-connectivity; lesions whose major axis is < ``itc_um`` (275 µm after
growing) are isolated tumour cells, excluded (hits on them are neither TP nor FP). One TP per
lesion (its highest detection), further hits on a lesion neither TP nor FP
(``monai.metrics.compute_fp_tp_probs``); the curve and the mean sensitivity at 1/4 … 8 FPs per
slide are ``monai.metrics.compute_froc_curve_data`` / ``compute_froc_score``.

Quirks of the official script we do *not* inherit: it treats every ``Test_*`` slide as normal
(here a slide is normal iff its annotation has no tumour), assumes 0.243 µm/px (here each slide's
own µm/px; ``froc.mpp`` only fills in for slides without one), and expects masks of 255 where ASAP
writes 1 (here masks are rasterised from the polygons, so there is no pixel convention to get
wrong).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import shapely

from pathopeft.files import atomic_write_text

__all__ = [
    "SlideFroc",
    "evaluation_mask",
    "froc_score",
    "nms_detections",
    "write_detections",
]


@dataclass
class SlideFroc:
    """What the FROC needs from one slide: detections and its labelled evaluation mask."""

    slide_id: str
    probs: np.ndarray  # (K,)
    xy: np.ndarray  # (K, 2) int level-0 px
    mask: np.ndarray  # (h, w) int labels at eval_level, 0 = background
    itc_labels: list[int]


def nms_detections(
    coords: np.ndarray,
    tile_size: int,
    scores: np.ndarray,
    radius_px: float,
    *,
    min_score: float = 0.0,
    max_detections: int = 1000,
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy NMS over tile centres: (probs (K,), level-0 integer centres (K, 2)), highest first."""
    from scipy.spatial import cKDTree

    centres = np.asarray(coords, dtype=np.float64).reshape(-1, 2) + tile_size / 2.0
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-scores, kind="stable")
    order = order[scores[order] >= min_score]
    suppressed = np.zeros(len(scores), dtype=bool)
    tree = cKDTree(centres) if radius_px > 0 and len(centres) else None
    keep: list[int] = []
    for i in order:
        if suppressed[i]:
            continue
        keep.append(int(i))
        if len(keep) >= max_detections:
            break
        if tree is not None:
            suppressed[tree.query_ball_point(centres[i], radius_px)] = True
        suppressed[i] = True
    idx = np.asarray(keep, dtype=np.int64)
    return scores[idx], np.floor(centres[idx]).astype(np.int64).reshape(-1, 2)


def write_detections(path: str | Path, probs: np.ndarray, xy: np.ndarray) -> None:
    """The official per-slide detection CSV: ``prob,x,y`` lines, no header, integer pixels."""
    lines = [f"{float(p):.6f},{int(x)},{int(y)}" for p, (x, y) in zip(probs, xy)]
    atomic_write_text(path, "\n".join(lines) + ("\n" if lines else ""))


def evaluation_mask(
    tumour: shapely.Geometry,
    size: tuple[int, int],
    mpp: float,
    *,
    level: int = 5,
    grow_um: float = 75.0,
    itc_um: float = 275.0,
) -> tuple[np.ndarray, list[int]]:
    """Labelled evaluation mask at ``level`` and the ITC labels to exclude (see the module doc)."""
    from monai.apps.pathology.utils import compute_isolated_tumor_cells, compute_multi_instance_mask

    ds = 2**level
    w, h = math.ceil(size[0] / ds), math.ceil(size[1] / ds)
    binary = np.zeros((h, w), np.uint8)
    polys = [] if tumour is None or tumour.is_empty else list(shapely.get_parts(tumour))
    for poly in polys:
        if poly.geom_type != "Polygon":
            continue
        shell = np.round(np.asarray(poly.exterior.coords)[:, :2] / ds * 16).astype(np.int32)
        cv2.fillPoly(binary, [shell], 1, lineType=cv2.LINE_8, shift=4)
        for hole in poly.interiors:
            ring = np.round(np.asarray(hole.coords)[:, :2] / ds * 16).astype(np.int32)
            cv2.fillPoly(binary, [ring], 0, lineType=cv2.LINE_8, shift=4)
    if not binary.any():
        return np.zeros((h, w), np.int64), []
    spacing = mpp * ds  # µm per mask pixel
    labels = compute_multi_instance_mask(mask=binary, threshold=grow_um / (spacing * 2))
    with warnings.catch_warnings():  # MONAI calls regionprops' deprecated major_axis_length (same value)
        warnings.simplefilter("ignore", FutureWarning)
        itc = compute_isolated_tumor_cells(tumor_mask=labels, threshold=itc_um / spacing)
    return np.asarray(labels, dtype=np.int64), [int(i) for i in itc]


def froc_score(
    slides: Sequence[SlideFroc],
    *,
    level: int = 5,
    eval_thresholds: Sequence[float] = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0),
) -> dict[str, object]:
    """FROC over slides: mean sensitivity at ``eval_thresholds`` FPs per slide, and the curve."""
    from monai.metrics import compute_fp_tp_probs, compute_froc_curve_data, compute_froc_score

    if not slides:
        raise ValueError("FROC needs at least one slide")
    fps: list[float] = []
    tps: list[float] = []
    targets = 0
    for s in slides:
        if len(s.probs):
            xy = np.asarray(s.xy, dtype=np.int64)
            h, w = s.mask.shape
            # a detection off the mask (a tile centre past the slide edge) is on background: FP
            x = np.clip(xy[:, 0], 0, w * 2**level - 1)
            y = np.clip(xy[:, 1], 0, h * 2**level - 1)
            fp, tp, n = compute_fp_tp_probs(
                np.asarray(s.probs, dtype=np.float64), y, x, s.mask, s.itc_labels, resolution_level=level
            )
        else:
            n_labels = int(s.mask.max())
            fp, tp = np.zeros(0), np.zeros(n_labels)
            n = n_labels - len([i for i in s.itc_labels if 1 <= i <= n_labels])
        fps.extend(np.asarray(fp, dtype=np.float64).tolist())
        # tp has one entry per label; ITC entries stay 0 and must not count as hits
        tp = np.asarray(tp, dtype=np.float64)
        keep = [i for i in range(len(tp)) if (i + 1) not in set(s.itc_labels)]
        tps.extend(tp[keep].tolist())
        targets += int(n)
    if targets == 0:
        raise ValueError("FROC needs at least one annotated lesion (after excluding isolated tumour cells)")
    fps_per_image, sensitivity = compute_froc_curve_data(
        np.asarray(fps), np.asarray(tps), num_targets=targets, num_images=len(slides)
    )
    thresholds = tuple(float(t) for t in eval_thresholds)
    score = float(compute_froc_score(fps_per_image, sensitivity, thresholds))
    at = np.interp(thresholds, np.asarray(fps_per_image)[::-1], np.asarray(sensitivity)[::-1])
    return {
        "froc": score,
        "sensitivity_at": {f"{t:g}": float(v) for t, v in zip(thresholds, at)},
        "n_slides": len(slides),
        "n_lesions": targets,
        "curve": {
            "fps_per_slide": np.asarray(fps_per_image).tolist(),
            "sensitivity": np.asarray(sensitivity).tolist(),
        },
    }
