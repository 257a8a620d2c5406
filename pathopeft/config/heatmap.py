"""Config schema of ``pathopeft heatmap``: which score is shown, how it is scaled, which files are written.

The defaults are chosen for a pathologist opening the result: the attention score, min–max within
the slide, *gated by the bag probability* (a slide the model calls negative shows no hot tiles and
no tumour regions, see :mod:`pathopeft.heatmaps.scoring`), a 0.5 threshold on that shown scale, every
format except the optional OME-TIFF.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from pathopeft.config.base import StrictModel

__all__ = [
    "FORMATS",
    "FrocConfig",
    "HeatmapConfig",
    "OverlayConfig",
    "TiffConfig",
]

Format = Literal["geojson", "png", "csv", "tiff", "ome_tiff"]
FORMATS: tuple[str, ...] = ("geojson", "png", "csv", "tiff", "ome_tiff")


class OverlayConfig(StrictModel):
    """The PNG thumbnail overlay."""

    max_px: int = Field(2048, ge=64)  # longest side of the thumbnail (the slide's own aspect ratio)
    alpha: float = Field(0.5, ge=0, le=1)  # heatmap opacity over tissue (0 = thumbnail only)
    outline_px: int = Field(2, ge=0)  # thickness of the thresholded region outlines (0 = none)


class TiffConfig(StrictModel):
    """The pyramidal RGB heatmap TIFF (streamed tile by tile: never a level-0 array)."""

    # TIFF tile size in pixels (a multiple of 16).
    tile: int = Field(512, ge=16, multiple_of=16)
    # Tile compression of the RGB TIFF.
    compression: Literal["jpeg", "deflate", "none"] = "jpeg"
    quality: int = Field(90, ge=1, le=100)  # JPEG quality
    nodata_rgb: tuple[int, int, int] = (255, 255, 255)  # where no tile was scored (white glass)
    workers: int = Field(0, ge=0)  # tile-encoding threads; 0 = one per CPU (at most 8)


class FrocConfig(StrictModel):
    """CAMELYON16 localisation: detections from tile scores, and the FROC evaluation settings."""

    # Detections: tiles whose shown score is a local maximum within ``nms_radius_um`` and ≥ min_score.
    nms_radius_um: float = Field(200.0, ge=0)
    # Detections below this shown score are dropped.
    min_score: float = Field(0.0, ge=0, le=1)
    max_detections: int = Field(1000, ge=1)  # per slide, highest first
    eval_level: int = Field(5, ge=0)  # evaluation mask at level-0 / 2**eval_level
    grow_um: float = Field(75.0, ge=0)  # tumour regions grown by 75 µm (official: radius 75/2 µm)
    itc_um: float = Field(275.0, ge=0)  # lesions with major axis < this (after growing) are excluded
    eval_thresholds: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)  # FPs per slide
    mpp: float | None = Field(None, gt=0)  # µm/px to use when a slide has none (official: 0.243)


class HeatmapConfig(StrictModel):
    """``pathopeft heatmap``: every option of the command (the flags override these keys)."""

    # a task of the checkpoint; null = its last (the newest) task; auto = each slide routed to its task
    # by the checkpoint's task router (a continual model asked about slides of unknown organ)
    task: str | None = None
    class_name: str | None = None  # class shown; null = the task's last class (e.g. tumor)
    # attention: the pooling's attention per tile; probability: the bag head applied to each tile's
    # embedding.
    score: Literal["attention", "probability"] = "attention"
    # Scale of the shown score within a slide: none (raw, clipped to 0-1), minmax (0-1) or rank (0 = lowest).
    normalize: Literal["none", "minmax", "rank"] = "minmax"
    # bag_probability: the shown value is the normalised score × the bag probability of the class,
    # so a slide the model calls negative never paints confident tiles; none: the normalised score.
    gate: Literal["bag_probability", "none"] = "bag_probability"
    threshold: float = Field(0.5, ge=0, le=1)  # region threshold on the shown scale
    # matplotlib colormap of the PNG, TIFF and viewer.
    colormap: str = "jet"
    smooth_um: float = Field(0.0, ge=0)  # Gaussian sigma in µm over the score raster (0 = off)
    # Files written per slide: geojson, png, csv, tiff, ome_tiff (the JSON score contract always).
    formats: list[Format] = Field(default_factory=lambda: ["geojson", "png", "csv", "tiff"])
    geojson_gzip: bool = False  # write <slide>.geojson.gz (for slides with ~10^5 tiles)
    min_region_tiles: int = Field(1, ge=1)  # drop regions covering fewer score cells than this
    tile_size: int | None = Field(None, ge=1)  # level-0 tile side; null = from the bag attributes
    backbone: str | None = None  # expected bag backbone; null = from the run's config.yaml if any
    overwrite: bool = False  # redo slides whose outputs already exist with the same settings
    annotations: str | None = None  # folder of <slide_id>.xml/.geojson: enables CAMELYON16 FROC
    overlay: OverlayConfig = Field(default_factory=OverlayConfig)
    tiff: TiffConfig = Field(default_factory=TiffConfig)
    froc: FrocConfig = Field(default_factory=FrocConfig)

    @field_validator("colormap")
    @classmethod
    def _known_colormap(cls, value: str) -> str:
        import matplotlib

        if value not in matplotlib.colormaps:
            raise ValueError(f"unknown matplotlib colormap {value!r}")
        return value

    @field_validator("formats")
    @classmethod
    def _unique_formats(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("formats must name at least one of " + ", ".join(FORMATS))
        return list(dict.fromkeys(value))
