"""Synthetic whole-slide images: pyramidal, tiled, JPEG TIFFs that OpenSlide opens with all levels.

What a slide is: white glass (dark for ``fluorescence``), ``n_tissue`` smooth tissue pieces of
H&E-like colour and texture (pink stroma, purple nuclei), and optionally planted "lesions" of a
clearly different texture (denser, larger, darker nuclei) inside tissue. The true geometry is
returned (:class:`SyntheticSlideInfo`) so tests know the tissue area and lesion outlines.

How it stays fast and memory-bounded at 100k × 100k: tiles are streamed to tifffile level by
level; each tile is classified from a coarse raster of the shapes (background / tissue interior /
lesion interior / boundary) with NumPy; interior and background tiles reuse pre-encoded JPEG
bytes from a small texture bank, and only boundary tiles are composed and encoded. Coarser
levels are painted from banks rendered at that level's scale (texture is statistically, not
pixel-wise, consistent across levels; the shapes are exact at every level).

File layout: level 0 and reduced levels (``subfiletype=1``) in the main IFD chain, tiled,
JPEG (YCbCr 4:2:0), µm/px as X/YResolution in centimetres, which OpenSlide reports as
``openslide.mpp-x/y`` (vendor ``generic-tiff``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import cv2
import imagecodecs
import numpy as np
import tifffile

from pathopeft.config.wsi import SynthConfig
from pathopeft.files import atomic_path, atomic_write_json, atomic_write_text
from pathopeft.wsi.synth_texture import PALETTES, blob_polygon, texture_bank

__all__ = ["Modality", "SyntheticSlideInfo", "make_synthetic_cohort", "make_synthetic_slide", "polygon_area"]

Modality = Literal["brightfield", "fluorescence", "blank"]
_BANK = 8  # texture variants per level and kind
_SUB = 8  # classification raster: 8 raster pixels per tile side at level 0


@dataclass
class SyntheticSlideInfo:
    """Ground truth of a synthetic slide (all coordinates level-0 pixels)."""

    path: Path
    slide_id: str
    width: int
    height: int
    mpp: float | None  # None when written without µm/px metadata
    modality: str
    level_dimensions: list[tuple[int, int]]
    tissue_polygons: list[np.ndarray] = field(default_factory=list)  # each (K, 2) float64
    lesion_polygons: list[np.ndarray] = field(default_factory=list)
    lesion_kind: str = "dense"  # the lesion look (synth_texture.LESION_KINDS)

    @property
    def label(self) -> str:
        return "tumor" if self.lesion_polygons else "normal"

    @property
    def tissue_area_px(self) -> float:
        return float(sum(polygon_area(p) for p in self.tissue_polygons))

    @property
    def lesion_area_px(self) -> float:
        return float(sum(polygon_area(p) for p in self.lesion_polygons))

    def tissue_area_um2(self, mpp: float | None = None) -> float:
        scale = mpp if mpp is not None else self.mpp
        if scale is None:
            raise ValueError(f"{self.slide_id}: written without mpp; pass the mpp to use")
        return self.tissue_area_px * scale * scale

    def mask(self, downsample: float, *, lesion: bool = False) -> np.ndarray:
        """Rasterise tissue (or lesions) at ``downsample`` (level-0 px per mask px), uint8 0/1."""
        w, h = math.ceil(self.width / downsample), math.ceil(self.height / downsample)
        out = np.zeros((h, w), np.uint8)
        for poly in self.lesion_polygons if lesion else self.tissue_polygons:
            _fill(out, poly / downsample, 1)
        return out

    def geojson(self) -> dict[str, object]:
        """Lesion outlines as a GeoJSON FeatureCollection (QuPath-importable annotations)."""
        features = []
        for poly in self.lesion_polygons:
            ring = [[round(float(x), 2), round(float(y), 2)] for x, y in poly]
            ring.append(ring[0])
            features.append(
                {
                    "type": "Feature",
                    "geometry": {"type": "Polygon", "coordinates": [ring]},
                    "properties": {
                        "objectType": "annotation",
                        "classification": {"name": "Tumor", "color": [200, 0, 0]},
                    },
                }
            )
        return {"type": "FeatureCollection", "features": features}


def polygon_area(poly: np.ndarray) -> float:
    """Shoelace area of a simple polygon given as (K, 2) vertices."""
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _fill(canvas: np.ndarray, poly: np.ndarray, value: int) -> None:
    pts = np.round(poly * 16).astype(np.int32)  # 4 fractional bits: sub-pixel accurate edges
    cv2.fillPoly(canvas, [pts], value, lineType=cv2.LINE_8, shift=4)


def make_synthetic_slide(
    path: str | Path,
    *,
    width: int = 4096,
    height: int = 4096,
    mpp: float | None = 0.5,
    seed: int = 0,
    n_tissue: int = 3,
    lesions: bool | int = True,
    modality: Modality = "brightfield",
    tile: int = 256,
    levels: int | None = None,
    quality: int = 80,
    slide_id: str | None = None,
    lesion_kind: str = "dense",
) -> SyntheticSlideInfo:
    """Write one synthetic slide to ``path`` (atomically) and return its ground truth.

    ``lesions``: True = 1–2 lesions, an int = that many, False/0 = none. ``modality="blank"``
    writes glass only (no tissue). ``mpp=None`` writes no resolution metadata. Deterministic in
    ``seed``. ``levels=None`` halves until a level fits in one tile. ``lesion_kind`` is the lesion
    look (``dense`` or ``vesicular``, see :data:`pathopeft.wsi.synth_texture.LESION_KINDS`).
    """
    if tile % 16:
        raise ValueError(f"tile must be a multiple of 16 (TIFF), got {tile}")
    path = Path(path)
    rng = np.random.default_rng(seed)
    n_tissue = 0 if modality == "blank" else n_tissue
    n_lesions = (int(rng.integers(1, 3)) if lesions is True else int(lesions)) if n_tissue else 0
    tissue, lesion_polys = _shapes(rng, width, height, n_tissue, n_lesions)
    n_levels = levels or max(1, math.ceil(math.log2(max(width, height) / tile)) + 1)
    dims = [(math.ceil(width / 2**k), math.ceil(height / 2**k)) for k in range(n_levels)]
    info = SyntheticSlideInfo(
        path=path,
        slide_id=slide_id or path.stem,
        width=width,
        height=height,
        mpp=mpp,
        modality=modality,
        level_dimensions=dims,
        tissue_polygons=tissue,
        lesion_polygons=lesion_polys,
        lesion_kind=lesion_kind,
    )
    texture_scale = 0.5 / mpp if mpp else 1.0
    raster = _class_raster(info, tile)
    bigtiff = width * height * 3 > 2**32 - 2**25
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tw:
        for k, (w, h) in enumerate(dims):
            painter = _LevelPainter(info, k, tile, texture_scale / 2**k, quality, raster, rng)
            tw.write(
                painter.tiles(),
                shape=(h, w, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                photometric="rgb",  # tifffile stores JPEG as YCbCr 4:2:0, like imagecodecs' default
                compression="jpeg",
                compressionargs={"level": quality},
                resolution=(1e4 / mpp, 1e4 / mpp) if mpp else None,
                resolutionunit="CENTIMETER" if mpp else None,
                subfiletype=1 if k else 0,
                metadata=None,
                description="pathopeft synthetic slide" if k == 0 else None,
            )
    return info


def make_synthetic_cohort(out: str | Path, cfg: SynthConfig | None = None) -> list[SyntheticSlideInfo]:
    """``pathopeft synth``: ``cfg.n`` slides + ``annotations/<id>.geojson`` + ``labels.csv`` in ``out``.

    Slide ``i`` is ``synth_{i:03d}.tiff`` made with seed ``cfg.seed * 100003 + i``; which slides
    carry lesions (label ``tumor``) is a seeded choice of ``round(n * lesion_fraction)`` slides.
    Every slide gets a GeoJSON (an empty FeatureCollection for ``normal`` slides), so "no file"
    never has to mean "no tumour". ``labels.csv`` names the classes ``cfg.classes`` (default
    ``normal, tumor``; a second task's cohort needs its own names, e.g. ``liver_normal, liver_tumor``),
    and ``cfg.lesion`` picks the lesion look.
    """
    cfg = cfg or SynthConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    n_tumor = round(cfg.n * cfg.lesion_fraction) if cfg.modality != "blank" and cfg.n_tissue else 0
    tumor = set(rng.permutation(cfg.n)[:n_tumor].tolist())
    infos = []
    for i in range(cfg.n):
        slide_id = f"synth_{i:03d}"
        info = make_synthetic_slide(
            out / f"{slide_id}.tiff",
            width=cfg.width,
            height=cfg.height,
            mpp=cfg.mpp,
            seed=cfg.seed * 100003 + i,
            n_tissue=cfg.n_tissue,
            lesions=i in tumor,
            modality=cfg.modality,
            tile=cfg.tile,
            levels=cfg.levels,
            quality=cfg.quality,
            slide_id=slide_id,
            lesion_kind=cfg.lesion,
        )
        atomic_write_json(out / "annotations" / f"{slide_id}.geojson", info.geojson())
        infos.append(info)
    names = {"normal": cfg.classes[0], "tumor": cfg.classes[1]}
    lines = ["slide_id,label"] + [f"{info.slide_id},{names[info.label]}" for info in infos]
    atomic_write_text(out / "labels.csv", "\n".join(lines) + "\n")
    return infos


def _shapes(
    rng: np.random.Generator, width: int, height: int, n_tissue: int, n_lesions: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Disjoint tissue blobs (one per grid cell) and lesions strictly inside some of them."""
    if n_tissue == 0:
        return [], []
    cols = math.ceil(math.sqrt(n_tissue * width / height))
    rows = math.ceil(n_tissue / cols)
    cell_w, cell_h = width / cols, height / rows
    cells = rng.permutation(rows * cols)[:n_tissue]
    wobble = 0.25
    tissue, params = [], []
    for cell in sorted(int(c) for c in cells):
        r, c = divmod(cell, cols)
        # Half-axes leave a margin so the wobbled blob (≤ 1 + wobble) stays inside its cell.
        rx = cell_w * 0.5 / (1 + wobble) * rng.uniform(0.6, 0.9)
        ry = cell_h * 0.5 / (1 + wobble) * rng.uniform(0.6, 0.9)
        cx = (c + 0.5) * cell_w + rng.uniform(-1, 1) * (cell_w * 0.5 - rx * (1 + wobble))
        cy = (r + 0.5) * cell_h + rng.uniform(-1, 1) * (cell_h * 0.5 - ry * (1 + wobble))
        tissue.append(blob_polygon(rng, cx, cy, rx, ry, wobble))
        params.append((cx, cy, rx, ry))
    lesions = []
    hosts = rng.choice(len(tissue), size=min(n_lesions, len(tissue)), replace=False) if n_lesions else []
    lesion_wobble = 0.15
    for host in sorted(int(h) for h in hosts):
        cx, cy, rx, ry = params[host]
        inner = min(rx, ry) * (1 - wobble)  # the tissue blob contains this disc around its centre
        lr = inner * rng.uniform(0.3, 0.45)
        room = inner - lr * (1 + lesion_wobble)
        ang = rng.uniform(0, 2 * np.pi)
        off = rng.uniform(0, 0.8) * room
        lesions.append(
            blob_polygon(rng, cx + off * math.cos(ang), cy + off * math.sin(ang), lr, lr, lesion_wobble)
        )
    return tissue, lesions


def _class_raster(info: SyntheticSlideInfo, tile: int) -> dict[str, np.ndarray]:
    """Coarse rasters (tile/8 level-0 px per pixel) used to classify tiles without rendering them."""
    cell = tile / _SUB
    tissue = info.mask(cell)
    lesion = info.mask(cell, lesion=True)
    kernel = np.ones((5, 5), np.uint8)  # 2-cell safety margin around the rasterised edges
    return {
        "tissue_in": cv2.erode(tissue, kernel),
        "tissue_any": cv2.dilate(tissue, kernel),
        "lesion_in": cv2.erode(lesion, kernel),
        "lesion_any": cv2.dilate(lesion, kernel),
    }


def _blocks(raster: np.ndarray, block: int, ny: int, nx: int, reduce: str) -> np.ndarray:
    """Per-tile ``all``/``any`` of a raster over ``block``-sized cells → (ny, nx) bool."""
    padded = np.zeros((ny * block, nx * block), np.uint8)
    h, w = min(raster.shape[0], ny * block), min(raster.shape[1], nx * block)
    padded[:h, :w] = raster[:h, :w]
    view = padded.reshape(ny, block, nx, block)
    return view.all(axis=(1, 3)) if reduce == "all" else view.any(axis=(1, 3))


class _LevelPainter:
    """Yields the JPEG bytes of every tile of one level, in TIFF (row-major) order."""

    def __init__(
        self,
        info: SyntheticSlideInfo,
        level: int,
        tile: int,
        scale: float,
        quality: int,
        raster: dict[str, np.ndarray],
        rng: np.random.Generator,
    ) -> None:
        self.info, self.level, self.tile, self.quality = info, level, tile, quality
        self.ds = 2**level
        w, h = info.level_dimensions[level]
        self.nx, self.ny = math.ceil(w / tile), math.ceil(h / tile)
        block = _SUB * self.ds
        bg = ~_blocks(raster["tissue_any"], block, self.ny, self.nx, "any")
        lesion_in = _blocks(raster["lesion_in"], block, self.ny, self.nx, "all")
        normal_in = _blocks(raster["tissue_in"], block, self.ny, self.nx, "all") & ~_blocks(
            raster["lesion_any"], block, self.ny, self.nx, "any"
        )
        # 0 background, 1 normal interior, 2 lesion interior, 3 boundary (rendered exactly)
        self.kind = np.full((self.ny, self.nx), 3, np.uint8)
        self.kind[bg] = 0
        self.kind[normal_in] = 1
        self.kind[lesion_in] = 2
        self.choice = rng.integers(0, _BANK, size=(self.ny, self.nx))
        modality = info.modality
        self.normal = texture_bank(modality, tile, round(scale, 6), _BANK, False)
        self.lesion = texture_bank(modality, tile, round(scale, 6), _BANK, True, info.lesion_kind)
        self.normal_jpeg = [self._encode(t) for t in self.normal] if (self.kind == 1).any() else []
        self.lesion_jpeg = [self._encode(t) for t in self.lesion] if (self.kind == 2).any() else []
        self.background = np.empty((tile, tile, 3), np.uint8)
        self.background[:] = PALETTES[modality].background
        self.background_jpeg = self._encode(self.background)

    def _encode(self, img: np.ndarray) -> bytes:
        return bytes(imagecodecs.jpeg8_encode(img, level=self.quality))

    def tiles(self) -> Iterator[bytes]:
        for ty in range(self.ny):
            for tx in range(self.nx):
                kind = self.kind[ty, tx]
                if kind == 0:
                    yield self.background_jpeg
                elif kind == 1:
                    yield self.normal_jpeg[self.choice[ty, tx]]
                elif kind == 2:
                    yield self.lesion_jpeg[self.choice[ty, tx]]
                else:
                    yield self._encode(self._render(tx, ty))

    def _render(self, tx: int, ty: int) -> np.ndarray:
        t, ds = self.tile, self.ds
        x0, y0 = tx * t * ds, ty * t * ds  # level-0 origin of the tile
        labels = np.zeros((t, t), np.uint8)
        for value, polys in ((1, self.info.tissue_polygons), (2, self.info.lesion_polygons)):
            for poly in polys:
                lo, hi = poly.min(axis=0), poly.max(axis=0)
                if hi[0] < x0 or hi[1] < y0 or lo[0] > x0 + t * ds or lo[1] > y0 + t * ds:
                    continue
                _fill(labels, (poly - (x0, y0)) / ds, value)
        choice = self.choice[ty, tx]
        out = self.background.copy()
        cv2.copyTo(self.normal[choice], (labels == 1).view(np.uint8), out)
        if self.info.lesion_polygons:
            cv2.copyTo(self.lesion[choice], (labels == 2).view(np.uint8), out)
        return out
