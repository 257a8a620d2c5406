"""``open_slide``: one entry point that picks the reader backend for a slide.

OpenSlide always opens the slide first: it is the reference for what the levels are, the
properties (``openslide.mpp-x``, bounds, vendor) and whether the file is a slide at all. Then,
for TIFF-family layouts, the fast :class:`~pathopeft.wsi.tiff_backend.TiffSlide` is used when
it can prove it reads the same levels; otherwise the OpenSlide handle is kept.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Literal

import openslide
import tifffile

from pathopeft.wsi.openslide_backend import OpenSlideSlide, mpp_from_properties, open_openslide_handle
from pathopeft.wsi.slide import Slide, SlideError, one_line
from pathopeft.wsi.tiff_backend import TiffSlide, probe_tiff_levels

__all__ = ["BACKENDS", "Backend", "open_slide", "resolve_open_path"]

log = logging.getLogger(__name__)

Backend = Literal["auto", "openslide", "tiff"]
BACKENDS: tuple[str, ...] = ("auto", "openslide", "tiff")
_TIFF_SUFFIXES = (".tif", ".tiff", ".svs", ".qptiff", ".ome.tif", ".ome.tiff")


def resolve_open_path(path: Path) -> Path:
    """The file OpenSlide should open for ``path``; a DICOM folder opens through one of its files."""
    if not path.exists():
        raise SlideError(f"{path}: file not found")
    if path.is_dir():
        dcm = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == ".dcm")
        if not dcm:
            raise SlideError(f"{path}: a folder is a slide only when it holds DICOM (.dcm) files")
        return dcm[0]
    if path.stat().st_size == 0:
        raise SlideError(f"{path}: empty file (0 bytes)")
    return path


def open_slide(
    path: str | Path,
    *,
    slide_id: str | None = None,
    mpp: float | None = None,
    backend: Backend = "auto",
    cache_mb: float = 64.0,
) -> Slide:
    """Open a whole-slide image (or a DICOM folder, or a flat image) as a :class:`Slide`.

    ``mpp`` overrides the file's µm/px (``--mpp`` / CSV column); ``backend`` = ``"auto"`` uses
    the fast TIFF reader when its levels provably equal OpenSlide's, ``"openslide"`` / ``"tiff"``
    force one (``"tiff"`` raises :class:`SlideError` with the reason when it cannot).
    ``cache_mb`` bounds the fast reader's decoded-tile cache per instance (per worker process).
    Every failure to open is a :class:`SlideError` whose one-line message names the file.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if mpp is not None and not mpp > 0:
        raise ValueError(f"{path}: mpp must be a positive number of µm per pixel, got {mpp!r}")
    path = Path(path)
    open_path = resolve_open_path(path)
    handle = open_openslide_handle(open_path)
    is_image = isinstance(handle, openslide.ImageSlide)
    props = {str(k): str(v) for k, v in handle.properties.items()}
    native = mpp_from_properties(props)
    if native is None and is_image and open_path.name.lower().endswith(_TIFF_SUFFIXES):
        native = _mpp_from_tiff_tags(open_path)
    if is_image:
        _check_image_loads(handle, open_path)
    vendor = "image" if is_image else props.get("openslide.vendor", "unknown")

    if backend != "openslide" and not is_image:
        dims = [tuple(int(v) for v in d) for d in handle.level_dimensions]
        levels = probe_tiff_levels(open_path, dims, vendor)
        if not isinstance(levels, str):
            downsamples = [float(d) for d in handle.level_downsamples]
            handle.close()
            return TiffSlide(
                path,
                slide_id,
                mpp,
                levels=levels,
                level_downsamples=downsamples,
                properties=props,
                native_mpp=native,
                cache_mb=cache_mb,
            )
        reason = levels
    else:
        reason = "a flat image (ImageSlide)" if is_image else "OpenSlide requested"
    if backend == "tiff":
        handle.close()
        raise SlideError(f"{path}: the fast TIFF reader cannot read it: {reason}")
    log.debug("%s: OpenSlide backend (%s)", path, reason)
    return OpenSlideSlide(path, slide_id, mpp, open_path=open_path, handle=handle, native_mpp=native)


def _mpp_from_tiff_tags(path: Path) -> float | None:
    """µm/px from a flat TIFF's resolution tags (unit cm or inch only), for ImageSlide files."""
    try:
        with tifffile.TiffFile(path) as tif:
            tags = tif.pages[0].tags
            unit = int(tags.valueof("ResolutionUnit", 1))
            res = tags.valueof("XResolution")
    except Exception:
        return None
    names = {2: "inch", 3: "centimeter"}
    if unit not in names or not res:
        return None
    value = res[0] / res[1] if isinstance(res, tuple) else float(res)
    return mpp_from_properties({"tiff.ResolutionUnit": names[unit], "tiff.XResolution": str(value)})


def _check_image_loads(handle: openslide.ImageSlide, path: Path) -> None:
    """ImageSlide decodes lazily; decode now (PIL's crop loads the whole image) so a broken image
    fails at open, not mid-run."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            handle.read_region((0, 0), 0, (1, 1))
    except Exception as exc:
        handle.close()
        raise SlideError(f"{path}: the image cannot be decoded ({one_line(exc)})") from None
