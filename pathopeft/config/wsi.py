"""Config schemas of the slide-facing steps: reader, tissue mask, tile grid, synthetic slides.

The ``tile`` command composes ``ReaderConfig``, ``TissueConfig`` and ``GridConfig`` into its own
schema. Every size threshold is physical (µm, µm²), never pixels, so a default means the same on a
0.25 µm/px scanner as on a 0.5 µm/px one, and on a 3 mm biopsy as on a resection.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from pathopeft.config.base import StrictModel

__all__ = ["GridConfig", "PenColour", "ReaderConfig", "SynthConfig", "TissueConfig"]

PenColour = Literal["blue", "green", "black", "red"]


class ReaderConfig(StrictModel):
    """How slides are opened (see ``pathopeft.wsi.open_slide``)."""

    # auto: decode stored TIFF tiles directly when the level layout provably equals OpenSlide's
    # (≥ 3× faster for SVS / generic TIFF), OpenSlide otherwise; "openslide"/"tiff" force one.
    backend: Literal["auto", "openslide", "tiff"] = "auto"
    # Decoded-tile cache of the fast reader, per open slide (per worker). 64 MiB holds ~2 rows of
    # 256-px tiles of a 40k-px-wide level, enough for row-major tile reads to decode each tile once.
    cache_mb: float = Field(64.0, ge=0)


class TissueConfig(StrictModel):
    """Tissue mask from a low-resolution level (``pathopeft.wsi.detect_tissue``)."""

    # µm/px at which the mask is computed: the pyramid level closest to it is read (never level 0
    # of a big slide). 8 µm/px = 1/16 of a 0.5 µm/px scan: a 100k-px slide gives a ~6k-px mask.
    mask_mpp: float = Field(8.0, gt=0)
    # auto: dark background (median brightness < 80/255) → fluorescence (tissue bright on dark);
    # otherwise brightfield (tissue = saturated colour on white glass).
    modality: Literal["auto", "brightfield", "fluorescence"] = "auto"
    # Threshold on HSV saturation (brightfield) or brightness (fluorescence), 0–255, or "otsu".
    threshold: int | Literal["otsu"] = "otsu"
    # Otsu's threshold is never taken below this: on an image with no tissue, Otsu splits noise.
    min_threshold: int = Field(15, ge=0, le=255)
    # Median blur removes JPEG/dust speckle; kernel in µm (→ odd pixels at the mask's µm/px).
    # 40 µm = 5 px at 8 µm/px (OpenCV's median is ~20x slower above 5 px).
    median_um: float = Field(40.0, ge=0)
    # Morphological closing joins tissue torn by cracks and pale fat; kernel in µm.
    closing_um: float = Field(64.0, ge=0)
    # Fill holes inside tissue smaller than min_hole_um2 (lumens bigger than that stay out);
    # min_hole_um2 = null fills every hole.
    fill_holes: bool = True
    # Largest hole area (µm²) that fill_holes fills; null fills every hole.
    min_hole_um2: float | None = Field(50_000.0, ge=0)
    # Tissue pieces smaller than this are dropped (dust, debris). 10,000 µm² = a 100 µm square,
    # less than one 256-px tile at 0.5 µm/px, so small biopsies and TMA cores (~280,000 µm²) stay.
    min_region_um2: float = Field(10_000.0, ge=0)
    # Pen ink removed (by hue, brightfield only) before thresholding: marker strokes are saturated
    # and would otherwise count as tissue. blue and green never occur in H&E; black (also dark
    # debris and folds) and red (overlaps strongly stained eosin) are opt-in. [] turns it off.
    pen_filter: list[PenColour] = Field(default_factory=lambda: ["blue", "green"])
    # Pen pixels are grown by this margin (µm) to take the stroke's blended edges with them.
    pen_margin_um: float = Field(16.0, ge=0)

    @field_validator("pen_filter")
    @classmethod
    def _unique_pens(cls, value: list[str]) -> list[str]:
        return sorted(set(value))

    @field_validator("threshold")
    @classmethod
    def _threshold_range(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not 0 <= value <= 255:
            raise ValueError("threshold must be 0–255 or 'otsu'")
        return value


class GridConfig(StrictModel):
    """Tile grid at a target resolution (``pathopeft.wsi.TileGrid.from_tissue``)."""

    # µm/px of the tiles given to the model: 0.5 ≈ 20× (what most pathology encoders expect).
    target_mpp: float = Field(0.5, gt=0)
    # Tile size in pixels at target_mpp (the model input, e.g. 224 or 256).
    tile_px: int = Field(256, ge=8)
    # Overlap between neighbouring tiles, in target pixels (stride = tile_px − overlap_px).
    overlap_px: int = Field(0, ge=0)
    # Keep a tile when at least this fraction of it is tissue (by the mask). 0.25 keeps tissue
    # edges (where tumour fronts often are) but drops tiles that are mostly glass.
    min_tissue_fraction: float = Field(0.25, ge=0, le=1)
    # Tiles crossing the right/bottom slide edge: dropped (false) so every tile is real pixels,
    # or kept and padded white (true).
    keep_partial: bool = False
    # A slide scanned coarser than target_mpp is read at level 0 and upsampled (with a warning);
    # set false to fail such slides instead.
    allow_upsample: bool = True
    # ... but never by more than this factor: a slide "scanned" 4x coarser than the target almost
    # always has wrong metadata (e.g. a 72-dpi resolution tag → 352 µm/px); it fails with a
    # message asking for --mpp instead of producing tiles of a few upsampled pixels.
    max_upsample: float = Field(4.0, ge=1)

    @model_validator(mode="after")
    def _overlap_below_tile(self) -> GridConfig:
        if self.overlap_px >= self.tile_px:
            raise ValueError(f"overlap_px ({self.overlap_px}) must be smaller than tile_px ({self.tile_px})")
        return self


class SynthConfig(StrictModel):
    """Synthetic cohort (``pathopeft synth``): pyramidal JPEG TIFFs + lesion GeoJSON + labels."""

    n: int = Field(4, ge=1)  # number of slides
    # Random seed: the same seed writes the same files.
    seed: int = 0
    width: int = Field(8192, ge=64)  # level-0 pixels
    # Level-0 height in pixels.
    height: int = Field(8192, ge=64)
    mpp: float | None = Field(0.5, gt=0)  # µm/px written as TIFF resolution; null = no metadata
    lesion_fraction: float = Field(0.5, ge=0, le=1)  # share of slides with planted lesions (tumor)
    n_tissue: int = Field(3, ge=0)  # tissue pieces per slide
    tile: int = Field(256, ge=16, multiple_of=16)  # TIFF tile size (TIFF needs multiples of 16)
    levels: int | None = Field(None, ge=1)  # pyramid levels; null = halve until < one tile
    quality: int = Field(80, ge=1, le=100)  # JPEG quality
    # brightfield (H&E-like on white glass), fluorescence (bright on dark) or blank (glass only).
    modality: Literal["brightfield", "fluorescence", "blank"] = "brightfield"
    # Lesion look: "dense" (crowded, large, dark nuclei) or "vesicular" (few, very large, pale
    # nuclei on paler stroma): two tasks with different lesion types.
    lesion: Literal["dense", "vesicular"] = "dense"
    # Names written to labels.csv for slides without and with lesions (negative class first).
    classes: tuple[str, str] = ("normal", "tumor")

    @field_validator("classes")
    @classmethod
    def _distinct_classes(cls, value: tuple[str, str]) -> tuple[str, str]:
        if not all(name.strip() for name in value) or value[0].lower() == value[1].lower():
            raise ValueError("classes must be two distinct, non-empty names, e.g. [normal, tumor]")
        return value
