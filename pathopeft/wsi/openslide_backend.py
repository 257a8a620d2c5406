"""OpenSlide backend: every format OpenSlide opens (SVS, NDPI, MRXS, SCN, DICOM, Philips, BIF, generic
TIFF, ...) plus openslide-python's ``ImageSlide`` fallback for flat TIFF/PNG/JPEG images.

Thread safety: one OpenSlide handle may be shared by threads (OpenSlide serialises internally).
Process safety: the handle is dropped when pickled and reopened lazily in the worker, so a ``Slide``
can be handed to DataLoader worker processes.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import openslide
import tifffile

from pathopeft.wsi.slide import Slide, SlideError, composite_on_white, one_line

__all__ = ["IMAGE_SUFFIXES", "OpenSlideSlide", "mpp_from_properties", "open_openslide_handle"]

log = logging.getLogger(__name__)

# Flat images openslide-python reads through PIL (ImageSlide) when OpenSlide does not know them.
from pathopeft.suffixes import IMAGE_SUFFIXES  # noqa: E402  (one list for all stages)

# Flat images are decoded whole by PIL; beyond this (~1 GB RGB) a pyramidal TIFF is required.
MAX_FLAT_PIXELS = 20_000 * 20_000

_UNIT_TO_UM = {"centimeter": 1e4, "inch": 25400.0}


def open_openslide_handle(path: Path) -> Any:
    """Open ``path`` with OpenSlide; flat images fall back to ``ImageSlide``; every failure becomes a
    one-line :class:`SlideError` naming the file.

    ``path`` is the file OpenSlide should open (for DICOM: one ``.dcm`` of the series; OpenSlide
    finds the other instances in the same folder). Only files with an ordinary image extension are
    offered to ``ImageSlide``: a truncated ``.svs`` must be reported as a broken slide, not
    half-decoded by PIL as a TIFF.
    """
    try:
        return openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError as exc:
        unsupported = one_line(exc)
    except openslide.OpenSlideError as exc:
        raise SlideError(f"{path}: OpenSlide cannot open it: {one_line(exc)}") from None
    except Exception as exc:
        raise SlideError(f"{path}: cannot open it ({type(exc).__name__}: {one_line(exc)})") from None
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise SlideError(
            f"{path}: not a slide OpenSlide recognises (truncated, corrupt or not a slide?): {unsupported}"
        )
    _check_flat_image(path, unsupported)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return openslide.ImageSlide(str(path))
    except Exception as exc:  # PIL.UnidentifiedImageError, OSError, ...
        raise SlideError(
            f"{path}: neither a slide OpenSlide recognises nor a readable image "
            f"({type(exc).__name__}: {one_line(exc)})"
        ) from None


def _check_flat_image(path: Path, unsupported: str) -> None:
    """Refuse the ImageSlide fallback for what is really a broken slide or a huge flat image.

    A tiled TIFF that OpenSlide rejects is a damaged (often truncated) pyramid: PIL would
    half-decode it as a plain image. A flat image above ``MAX_FLAT_PIXELS`` would be decoded whole
    into memory by PIL.
    """
    if path.suffix.lower() in (".tif", ".tiff"):
        try:
            with tifffile.TiffFile(path) as tif:
                page = tif.pages[0]
                tiled, shape = page.is_tiled, (page.imagelength, page.imagewidth)
        except Exception as exc:
            raise SlideError(f"{path}: not a valid TIFF ({one_line(exc)})") from None
        if tiled:
            raise SlideError(
                f"{path}: a tiled TIFF that OpenSlide cannot open (truncated or corrupt?): {unsupported}"
            )
        if shape[0] * shape[1] > MAX_FLAT_PIXELS:
            raise SlideError(
                f"{path}: a flat (non-tiled) {shape[1]}x{shape[0]} image is too large to decode whole; "
                "convert it to a tiled pyramidal TIFF"
            )


def mpp_from_properties(props: Mapping[str, str]) -> float | None:
    """µm/px of level 0 from OpenSlide properties; ``None`` when the file does not say.

    ``openslide.mpp-x/y`` first; else the TIFF resolution tags when their unit is centimetre or
    inch (TIFF's "no unit" value means the numbers are only an aspect ratio, so it is ignored).
    Never guessed from the objective power: scanners disagree on what "20x" means.
    """
    xs = [props.get("openslide.mpp-x"), props.get("openslide.mpp-y")]
    values = [_positive_float(v) for v in xs]
    found = [v for v in values if v is not None]
    if found:
        if len(found) == 2 and abs(found[0] - found[1]) > 0.01 * max(found):
            log.warning("anisotropic pixels (mpp-x=%s, mpp-y=%s); using their mean", *found)
        return _plausible(float(sum(found) / len(found)), "openslide.mpp-x/y")
    unit = (props.get("tiff.ResolutionUnit") or "").lower()
    res = _positive_float(props.get("tiff.XResolution"))
    if unit in _UNIT_TO_UM and res:
        return _plausible(_UNIT_TO_UM[unit] / res, "tiff.XResolution")
    return None


PLAUSIBLE_MPP = (0.05, 20.0)
"""µm/px range a slide scan can have; metadata outside it (e.g. 72 dpi = 352.78) counts as missing."""


def _plausible(mpp: float, key: str) -> float | None:
    """``mpp`` when inside :data:`PLAUSIBLE_MPP`, else ``None`` so ``--mpp`` / the CSV column apply."""
    low, high = PLAUSIBLE_MPP
    if low <= mpp <= high:
        return mpp
    log.warning(
        "metadata %s gives %g µm/px, outside the plausible %g-%g µm/px: treated as missing",
        key,
        mpp,
        low,
        high,
    )
    return None


def _positive_float(value: str | None) -> float | None:
    try:
        number = float(value) if value is not None else None
    except ValueError:
        return None
    return number if number is not None and np.isfinite(number) and number > 0 else None


class OpenSlideSlide(Slide):
    """A slide read through OpenSlide (or ``ImageSlide`` for flat images)."""

    backend = "openslide"
    _handle_attrs = ("_osr",)

    def __init__(
        self,
        path: str | Path,
        slide_id: str | None = None,
        mpp: float | None = None,
        *,
        open_path: str | Path | None = None,
        handle: Any = None,
        native_mpp: float | None = None,
    ) -> None:
        """``path`` is what the user named (a file, or a DICOM folder); ``open_path`` the file
        OpenSlide opens. ``handle`` lets the factory hand over an already-open handle."""
        super().__init__(path, slide_id, mpp)
        self.open_path = Path(open_path or path)
        self._osr = handle if handle is not None else open_openslide_handle(self.open_path)
        self._is_image = isinstance(self._osr, openslide.ImageSlide)
        self._props = {str(k): str(v) for k, v in self._osr.properties.items()}
        self._dims = [tuple(int(v) for v in d) for d in self._osr.level_dimensions]
        self._downsamples = [float(d) for d in self._osr.level_downsamples]
        self._native_mpp = native_mpp if native_mpp is not None else mpp_from_properties(self._props)

    # --- geometry ---------------------------------------------------------------------------
    @property
    def level_dimensions(self) -> list[tuple[int, int]]:
        return list(self._dims)  # type: ignore[arg-type]

    @property
    def level_downsamples(self) -> list[float]:
        return list(self._downsamples)

    @property
    def native_mpp(self) -> float | None:
        return self._native_mpp

    @property
    def properties(self) -> Mapping[str, str]:
        return dict(self._props)

    @property
    def vendor(self) -> str:
        """OpenSlide's format name (``aperio``, ``generic-tiff``, ...; ``image`` for ImageSlide)."""
        return "image" if self._is_image else self._props.get("openslide.vendor", "unknown")

    # --- pixels -----------------------------------------------------------------------------
    def _handle(self) -> Any:
        with self._lock:
            if self._osr is None:
                self._osr = open_openslide_handle(self.open_path)
            return self._osr

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB pixels via OpenSlide (which resamples bilinearly when ``location / downsample`` is
        not a whole level pixel); transparent areas are composited on white."""
        _check_request(self, level, size)
        x, y = (int(v) for v in location)
        try:
            rgba = np.asarray(self._handle().read_region((x, y), int(level), (int(size[0]), int(size[1]))))
        except SlideError:
            raise
        except Exception as exc:
            raise SlideError(
                f"{self.path}: cannot read region at ({x}, {y}) level {level}: {one_line(exc)}"
            ) from None
        return composite_on_white(rgba)

    def close(self) -> None:
        with self._lock:
            if self._osr is not None:
                self._osr.close()
                self._osr = None


def _check_request(slide: Slide, level: int, size: tuple[int, int]) -> None:
    if not 0 <= int(level) < slide.level_count:
        raise ValueError(f"{slide.path}: level {level} does not exist (slide has {slide.level_count})")
    if int(size[0]) <= 0 or int(size[1]) <= 0:
        raise ValueError(f"{slide.path}: region size must be positive, got {tuple(size)}")
