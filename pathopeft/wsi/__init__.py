"""wsi stage: everything that touches slides — readers, discovery, tissue, tile grid, coords, QC.

from pathopeft.wsi import detect_tissue, discover_slides, open_slide, TileGrid, write_coords
for src in discover_slides(["slides/"]):
    with open_slide(src.path, slide_id=src.slide_id, mpp=src.mpp) as slide:
        mask = detect_tissue(slide, TissueConfig())
        grid = TileGrid.from_tissue(slide, mask, GridConfig())
        tile = slide.read_region(tuple(grid.coords[0]), grid.level, (grid.read_size,) * 2)
"""

from pathopeft.wsi.coords import read_coords, write_coords
from pathopeft.wsi.discovery import SLIDE_SUFFIXES, DiscoveryError, SlideSource, discover_slides
from pathopeft.wsi.factory import BACKENDS, open_slide
from pathopeft.wsi.grid import TileGrid, build_grid
from pathopeft.wsi.openslide_backend import OpenSlideSlide
from pathopeft.wsi.slide import MissingMppError, Slide, SlideError
from pathopeft.wsi.synth import SyntheticSlideInfo, make_synthetic_slide
from pathopeft.wsi.thumbnail import render_thumbnail
from pathopeft.wsi.tiff_backend import TiffSlide
from pathopeft.wsi.tissue import TissueMask, detect_tissue

__all__ = [
    "BACKENDS",
    "SLIDE_SUFFIXES",
    "DiscoveryError",
    "MissingMppError",
    "OpenSlideSlide",
    "Slide",
    "SlideError",
    "SlideSource",
    "SyntheticSlideInfo",
    "TiffSlide",
    "TileGrid",
    "TissueMask",
    "build_grid",
    "detect_tissue",
    "discover_slides",
    "make_synthetic_slide",
    "open_slide",
    "read_coords",
    "render_thumbnail",
    "write_coords",
]
