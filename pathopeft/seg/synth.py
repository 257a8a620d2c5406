"""A synthetic "shapes" segmentation set: textured blobs on a textured background.

Used by the tests and the benchmark (no download), and handy to check an installation:
``make_shapes_dataset("shapes/", n=24)`` writes ``images/*.png`` and ``masks/*.png`` (0/255, or
class labels 0..k with ``num_classes`` > 2) in the layout ``segment train`` reads.

Foreground and background have the same mean colour and differ by texture (fine stripes in the
shapes, smooth noise around them), so a model must use spatial context, not a colour threshold.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from pathopeft.files import atomic_write_bytes

__all__ = ["make_shapes_dataset", "shapes_sample"]


def shapes_sample(
    rng: np.random.Generator, size: tuple[int, int] = (64, 64), num_classes: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """One RGB uint8 image and its class-index mask."""
    height, width = size
    mask = np.zeros((height, width), np.uint8)
    n_shapes = int(rng.integers(1, 4))
    for _ in range(n_shapes):
        label = int(rng.integers(1, num_classes))
        cx, cy = int(rng.integers(0, width)), int(rng.integers(0, height))
        radius = int(rng.integers(max(3, min(size) // 8), max(4, min(size) // 3)))
        if rng.random() < 0.5:
            cv2.circle(mask, (cx, cy), radius, label, -1)
        else:
            cv2.rectangle(mask, (cx - radius, cy - radius // 2), (cx + radius, cy + radius // 2), label, -1)
    base = np.array([200, 150, 190], np.float32) * rng.uniform(0.85, 1.15)
    smooth = cv2.GaussianBlur(rng.normal(0, 1, (height, width)).astype(np.float32), (0, 0), 3)
    smooth *= 25 / (smooth.std() + 1e-6)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    stripes = 30 * np.sin((np.cos(angle) * xx + np.sin(angle) * yy) * 2.2)
    image = np.repeat(base[None, None], height, 0).repeat(width, 1)
    texture = np.where(mask > 0, stripes, smooth)
    for label in range(2, num_classes):  # further classes: coarser stripes
        coarse = 30 * np.sign(np.sin((np.sin(angle) * xx - np.cos(angle) * yy) * 0.8))
        texture = np.where(mask == label, coarse, texture)
    image += texture[..., None]
    image += rng.normal(0, 4, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), mask


def make_shapes_dataset(
    out: str | Path,
    n: int = 24,
    *,
    size: tuple[int, int] = (64, 64),
    num_classes: int = 2,
    seed: int = 0,
) -> Path:
    """Write ``n`` image/mask pairs under ``out/images`` and ``out/masks``; return ``out``."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    for index in range(n):
        image, mask = shapes_sample(rng, size, num_classes)
        written = mask * 255 if num_classes == 2 else mask
        for folder, array in (("images", cv2.cvtColor(image, cv2.COLOR_RGB2BGR)), ("masks", written)):
            ok, encoded = cv2.imencode(".png", array)
            if not ok:
                raise RuntimeError("PNG encoding failed")
            atomic_write_bytes(out / folder / f"shape_{index:04d}.png", encoded.tobytes())
    return out
