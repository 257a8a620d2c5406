"""File suffixes every stage recognises, defined once (tiling, MIL manifests, segmentation).

* :data:`SLIDE_SUFFIXES` — whole-slide formats OpenSlide opens (DICOM is handled as folders);
* :data:`IMAGE_SUFFIXES` — flat images: segmentation images/masks and ``predict`` inputs, and the
  flat files the tile stage reads through openslide-python's ``ImageSlide``.

Compare with ``path.suffix.lower()``.
"""

from __future__ import annotations

__all__ = ["IMAGE_SUFFIXES", "SLIDE_SUFFIXES"]

SLIDE_SUFFIXES = frozenset(
    {".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".qptiff"}
)
IMAGE_SUFFIXES = frozenset({".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp"})
