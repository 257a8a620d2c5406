"""The one interface every whole-slide reader backend implements.

Stages above (``features``, ``heatmaps``) only ever see a :class:`Slide`; which library decodes the
pixels (OpenSlide, or tifffile reading stored tiles directly for speed) is the factory's choice
(:func:`pathopeft.wsi.open_slide`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

import numpy as np

__all__ = ["MissingMppError", "Slide", "SlideError"]


class SlideError(RuntimeError):
    """A slide that cannot be opened or read; the message names the file."""


class MissingMppError(SlideError):
    """The slide has no µm/px metadata and none was given (``--mpp`` or the CSV's ``mpp`` column)."""


class Slide(ABC):
    """A pyramidal whole-slide image.

    Conventions: sizes are ``(width, height)``; locations are level-0 pixels ``(x, y)`` of the
    top-left corner; pixels come back as ``(H, W, 3)`` uint8 RGB with transparent areas white.
    Instances are picklable (the file handle is reopened lazily), so DataLoader workers can read.
    """

    backend: str = "abstract"

    def __init__(self, path: str | Path, slide_id: str | None = None, mpp: float | None = None) -> None:
        self.path = Path(path)
        self.slide_id = slide_id or _default_slide_id(self.path)
        self._mpp_override = mpp

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
                f"{self.path}: no µm/px (mpp) in the slide metadata; pass --mpp or an 'mpp' column in the CSV"
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
        """The coarsest level whose downsample does not exceed ``downsample`` (never coarser)."""
        limit = downsample * (1 + 1e-6)
        fitting = [(ds, level) for level, ds in enumerate(self.level_downsamples) if ds <= limit]
        return max(fitting)[1] if fitting else 0

    # --- pixels ---------------------------------------------------------------------------
    @abstractmethod
    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """``(size[1], size[0], 3)`` uint8 RGB; ``location`` in level-0 pixels; outside the slide is white."""

    def read_level(self, level: int) -> np.ndarray:
        """The whole of one level (call only on a low-resolution level)."""
        return self.read_region((0, 0), level, self.level_dimensions[level])

    def close(self) -> None:  # noqa: B027 - optional for backends without handles
        """Release file handles; the slide reopens lazily if used again."""

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
