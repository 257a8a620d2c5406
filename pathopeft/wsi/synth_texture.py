"""Texture banks and tissue shapes for synthetic slides (see :mod:`pathopeft.wsi.synth`).

A slide is painted from a small bank of pre-rendered texture tiles per pyramid level: interior
tiles reuse the bank's JPEG bytes, so a 100k × 100k slide costs little more than its boundary
tiles. Banks depend only on (modality, tile size, texture scale, level), never on the slide seed,
and are cached per process: tests that write many small slides render them once.
"""

from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass

import cv2
import numpy as np

__all__ = ["LESION_KINDS", "PALETTES", "Palette", "blob_polygon", "texture_bank"]


@dataclass(frozen=True)
class Palette:
    """Colours of one modality (RGB) and nucleus statistics (radius in px at 0.5 µm/px)."""

    background: tuple[int, int, int]
    stroma: tuple[int, int, int]
    nucleus: tuple[int, int, int]
    lesion_stroma: tuple[int, int, int]
    lesion_nucleus: tuple[int, int, int]
    nuclei_per_kpx: float = 2.0  # nuclei per 1000 px² at 0.5 µm/px
    lesion_density: float = 3.0  # lesion nuclei density relative to normal
    radius: float = 3.5
    lesion_radius: float = 5.5


PALETTES: dict[str, Palette] = {
    # H&E: eosin-pink stroma, haematoxylin-purple nuclei; lesion = denser, larger, darker nuclei.
    "brightfield": Palette(
        background=(255, 255, 255),
        stroma=(236, 168, 206),
        nucleus=(110, 62, 150),
        lesion_stroma=(200, 130, 190),
        lesion_nucleus=(62, 30, 110),
    ),
    # Fluorescence (DAPI + a cytoplasmic stain): bright on a dark background.
    "fluorescence": Palette(
        background=(8, 8, 12),
        stroma=(30, 95, 40),
        nucleus=(60, 80, 235),
        lesion_stroma=(45, 120, 50),
        lesion_nucleus=(90, 120, 255),
    ),
}
PALETTES["blank"] = PALETTES["brightfield"]

# Lesion looks, so two synthetic tasks can differ in what their lesions look like (``synth
# --lesion``): "dense" = crowded, larger, darker nuclei (the palette's lesion colours, the
# default); "vesicular" = sparse, very large, pale nuclei on paler stroma (a different texture at
# the same tissue colour family, which a model trained on "dense" lesions has not seen).
LESION_KINDS = ("dense", "vesicular")


@functools.lru_cache(maxsize=64)
def texture_bank(
    modality: str, tile: int, scale: float, count: int, lesion: bool, kind: str = "dense"
) -> tuple[np.ndarray, ...]:
    """``count`` RGB tiles of tissue texture at ``scale`` (pixels per 0.5-µm pixel at this level).

    ``kind`` (one of :data:`LESION_KINDS`) picks the lesion look; it is ignored for normal tissue.

    Rendered at up to 2× supersampling and area-downsampled, so coarse levels keep the average
    colour (what tissue detection sees) of the full-resolution texture.
    """
    if kind not in LESION_KINDS:
        raise ValueError(f"lesion kind {kind!r} is not one of {LESION_KINDS}")
    palette = PALETTES[modality]
    if lesion and kind == "vesicular":
        palette = _vesicular(palette)
    # "dense" keeps the key it always had, so existing synthetic slides stay byte-identical.
    suffix = "" if kind == "dense" or not lesion else f"|{kind}"
    key = f"{modality}|{tile}|{scale:.6f}|{lesion}{suffix}".encode()
    rng = np.random.default_rng(zlib.crc32(key))  # not hash(): str hashing is salted per process
    factor = 2 if scale < 1 else 1
    size = tile * factor
    px_scale = scale * factor
    tiles = []
    for _ in range(count):
        img = _render(rng, palette, size, px_scale, lesion)
        if factor > 1:
            img = cv2.resize(img, (tile, tile), interpolation=cv2.INTER_AREA)
        tiles.append(img)
    return tuple(tiles)


def _vesicular(pal: Palette) -> Palette:
    """The "vesicular" lesion look of a palette: pale stroma, few very large pale nuclei."""

    def mix(a: tuple[int, int, int], b: tuple[int, int, int], t: float) -> tuple[int, int, int]:
        return (
            round(a[0] * (1 - t) + b[0] * t),
            round(a[1] * (1 - t) + b[1] * t),
            round(a[2] * (1 - t) + b[2] * t),
        )

    return Palette(
        background=pal.background,
        stroma=pal.stroma,
        nucleus=pal.nucleus,
        lesion_stroma=mix(pal.stroma, pal.background, 0.35),
        lesion_nucleus=mix(pal.nucleus, pal.stroma, 0.45),
        nuclei_per_kpx=pal.nuclei_per_kpx,
        lesion_density=0.6,
        radius=pal.radius,
        lesion_radius=9.0,
    )


def _render(rng: np.random.Generator, pal: Palette, size: int, scale: float, lesion: bool) -> np.ndarray:
    stroma = np.array(pal.lesion_stroma if lesion else pal.stroma, dtype=np.float32)
    nucleus = np.array(pal.lesion_nucleus if lesion else pal.nucleus, dtype=np.float32)
    # Low-frequency intensity variation (fibres, thickness) over a flat stroma colour.
    # (Coarse white noise upsampled with cubic interpolation: a cheap smooth random field.)
    coarse = max(4, round(size / max(2.0, 12.0 * scale)))
    noise = cv2.resize(
        rng.standard_normal((coarse, coarse)).astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC
    )
    noise *= 0.09 / max(float(noise.std()), 1e-6)
    img = stroma[None, None, :] * (1.0 + noise[..., None])  # float32 (H, W, 3)
    # Nuclei: filled ellipses, count from density (per area at 0.5 µm/px, so scale-invariant).
    density = pal.nuclei_per_kpx * (pal.lesion_density if lesion else 1.0) / 1000.0
    base_radius = pal.lesion_radius if lesion else pal.radius
    radius = base_radius * scale
    canvas = img
    if radius < 3.0:
        # Nuclei of a few pixels or less: blend their colour by the area they cover (overlaps
        # included), so coarse levels keep the colour tissue detection sees at full resolution.
        cover = 1.0 - np.exp(-density * np.pi * base_radius**2)
        canvas = img * (1 - cover) + nucleus[None, None, :] * cover
        return np.clip(canvas, 0, 255).astype(np.uint8)
    n = int(rng.poisson(density * (size / scale) ** 2))
    centres = (rng.uniform(0, size, (n, 2)) * 16).astype(int).tolist()
    axes = (np.clip(rng.normal(radius, radius * 0.2, (n, 2)), 0.5, None) * 16).astype(int).tolist()
    angles = rng.uniform(0, 180, n).tolist()
    colours = np.clip(nucleus[None, :] * rng.uniform(0.8, 1.15, (n, 1)), 0, 255).tolist()
    for centre, axis, angle, colour in zip(centres, axes, angles, colours):
        cv2.ellipse(canvas, centre, axis, angle, 0, 360, colour, -1, cv2.LINE_AA, 4)
    return np.clip(canvas, 0, 255).astype(np.uint8)


def blob_polygon(
    rng: np.random.Generator, cx: float, cy: float, rx: float, ry: float, wobble: float, n: int = 96
) -> np.ndarray:
    """A smooth star-shaped closed polygon (``(n, 2)`` float, not repeating the first vertex).

    Radius ``r(θ) = 1 + Σ a_k cos(kθ + φ_k)`` with ``Σ a_k ≤ wobble`` stays within
    ``[1 − wobble, 1 + wobble]`` of the ellipse ``(rx, ry)``, so containment of a smaller blob in a
    bigger one can be guaranteed from the radii alone (lesions inside tissue).
    """
    theta = np.linspace(0, 2 * np.pi, n, endpoint=False)
    amps = rng.uniform(0, 1, 4)
    amps *= wobble / max(amps.sum(), 1e-9)
    phases = rng.uniform(0, 2 * np.pi, 4)
    radial = 1 + sum(a * np.cos((k + 2) * theta + p) for k, (a, p) in enumerate(zip(amps, phases)))
    return np.stack([cx + rx * radial * np.cos(theta), cy + ry * radial * np.sin(theta)], axis=1)
