"""The one interface every whole-slide reader backend implements.

Stages above (``features``, ``heatmaps``) only ever see a :class:`Slide`; which library decodes the
pixels (OpenSlide, or tifffile reading stored tiles directly for speed) is the factory's choice
(:func:`pathopeft.wsi.open_slide`).
"""

from __future__ import annotations

import math
import threading
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

import numpy as np

__all__ = ["MissingMppError", "Slide", "SlideError", "composite_on_white", "one_line"]


LEVEL_TOLERANCE = 0.01
"""Relative slack when matching a target downsample to a pyramid level (issue 13 item 6)."""


class SlideError(RuntimeError):
    """A slide that cannot be opened or read; the message names the file."""


class MissingMppError(SlideError):
    """The slide has no µm/px metadata and none was given (``--mpp`` or the CSV's ``mpp`` column)."""


class Slide(ABC):
    """A pyramidal whole-slide image.

    Conventions: sizes are ``(width, height)``; locations are level-0 pixels ``(x, y)`` of the
    top-left corner; pixels come back as ``(H, W, 3)`` uint8 RGB with transparent areas white.
    Instances are picklable (the file handle is reopened lazily), so DataLoader workers can read.

    Geometry and properties are read once at open and travel with the pickle (cheap, no file
    access in the worker until the first pixel read). Subclasses list their unpicklable handle
    attributes in ``_handle_attrs``; they are reset to ``None`` on pickling and reopened lazily.

    Threads may share one instance (handle (re)opening is locked; each backend documents its
    read-side safety). Processes should each hold their own instance: pickle it (spawn) — with
    ``fork``, the copied handle is still usable (reads are position-independent) but do not fork
    while another thread is inside ``read_region``.
    """

    _handle_attrs: tuple[str, ...] = ()

    backend: str = "abstract"

    def __init__(self, path: str | Path, slide_id: str | None = None, mpp: float | None = None) -> None:
        self.path = Path(path)
        self.slide_id = slide_id or _default_slide_id(self.path)
        self._mpp_override = mpp
        # Guards lazy (re)opening of handles when threads share one instance.
        self._lock = threading.RLock()

    # --- geometry -------------------------------------------------------------------------
    @property
    @abstractmethod
    def level_dimensions(self) -> list[tuple[int, int]]: ...

    @property
    @abstractmethod
    def level_downsamples(self) -> list[float]: ...

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    @abstractmethod
    def native_mpp(self) -> float | None:
        """µm/px of level 0 from the file's metadata, or ``None`` when it has none."""

    @property
    def mpp(self) -> float:
        """µm/px of level 0: the override if given, else the metadata; never guessed."""
        if self._mpp_override is not None:
            return float(self._mpp_override)
        native = self.native_mpp
        if native is None:
            raise MissingMppError(
                f"{self.path}: no usable µm/px (mpp) in the metadata (absent, or outside 0.05-20 µm/px); "
                "pass --mpp or an 'mpp' column in the CSV"
            )
        return native

    @property
    def properties(self) -> Mapping[str, str]:
        return {}

    @property
    def bounds_offset(self) -> tuple[int, int]:
        """``openslide.bounds-x/y`` (QuPath crops to the bounds), ``(0, 0)`` when absent."""
        props = self.properties
        return int(props.get("openslide.bounds-x", 0) or 0), int(props.get("openslide.bounds-y", 0) or 0)

    def best_level_for_downsample(self, downsample: float) -> int:
        """The coarsest level whose downsample is at most ``downsample`` times ``1 + LEVEL_TOLERANCE``.

        Pyramids with floor-rounded dimensions report e.g. 2.00034 for a 2x level; a strict
        comparison would read level 0 (4x the decoding) for a target of 1.996. A level up to 1%
        coarser is accepted: the tile is then upsampled by at most 1%.
        """
        limit = downsample * (1 + LEVEL_TOLERANCE)
        fitting = [(ds, level) for level, ds in enumerate(self.level_downsamples) if ds <= limit]
        return max(fitting)[1] if fitting else 0

    # --- pixels ---------------------------------------------------------------------------
    @abstractmethod
    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """``(size[1], size[0], 3)`` uint8 RGB; ``location`` in level-0 pixels; outside the slide is white."""

    def read_level(self, level: int) -> np.ndarray:
        """The whole of one level (call only on a low-resolution level)."""
        return self.read_region((0, 0), level, self.level_dimensions[level])

    def read_level_pixels(self, level: int, x: int, y: int, size: tuple[int, int]) -> np.ndarray:
        """``size`` pixels of ``level`` starting at *level* pixel ``(x, y)``, ideally unresampled.

        For strip-wise low-resolution reads. A level-0 location rarely maps onto a whole pixel of
        a level with a non-integer downsample; this default reads at the level-0 pixel that maps
        just past it (OpenSlide then resamples by less than ``1 / downsample`` px). The fast TIFF
        reader overrides it with an exact copy.
        """
        ds = self.level_downsamples[level]
        return self.read_region((math.ceil(x * ds - 1e-9), math.ceil(y * ds - 1e-9)), level, size)

    def close(self) -> None:  # noqa: B027 - optional for backends without handles
        """Release file handles; the slide reopens lazily if used again."""

    def __getstate__(self) -> dict[str, object]:
        state = self.__dict__.copy()
        for name in self._handle_attrs:
            if name in state:
                state[name] = None
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()

    def __enter__(self) -> Slide:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, levels={self.level_count}, size={self.dimensions})"


def _default_slide_id(path: Path) -> str:
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem if path.is_file() or path.suffix else name


def composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """Composite non-premultiplied RGBA (what openslide-python returns) on white → RGB uint8.

    openslide-python un-premultiplies OpenSlide's ARGB, so ``out = rgb·a/255 + (255 − a)``; fully
    transparent pixels (outside the slide, missing tiles) become white. Opaque input is returned
    without arithmetic (the common case).
    """
    rgb = rgba[..., :3]
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha.astype(np.uint32)[..., None]
    out = (rgb.astype(np.uint32) * a + 127) // 255 + (255 - a)
    return np.minimum(out, 255).astype(np.uint8)


def one_line(exc: BaseException) -> str:
    """An exception as one short line (the manifest stores it in a CSV cell)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."
