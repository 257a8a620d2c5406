"""Pairing slides with feature bags, and what the heatmap needs from a slide file.

Pairing is by slide id (file name without extension, as ``pathopeft tile`` names bags). A slide
without a bag, or a bag without a slide, becomes an error row of its own: nothing is dropped
silently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pathopeft.bags import FeatureBag
from pathopeft.wsi.discovery import discover_slides

__all__ = ["Pair", "SlideGeometry", "find_bag_files", "pair_inputs", "read_geometry", "tile_size_of"]

BAG_SUFFIXES = (".h5", ".pt")


@dataclass
class Pair:
    slide_id: str
    slide_path: Path | None
    bag_path: Path | None
    mpp: float | None = None  # from a slides CSV, if given there


@dataclass
class SlideGeometry:
    """Level-0 size, µm/px, OpenSlide bounds offset and a thumbnail of one slide."""

    width: int
    height: int
    mpp: float | None
    bounds: tuple[int, int]
    thumbnail: np.ndarray  # (h, w, 3) uint8


def find_bag_files(features_dir: Path) -> dict[str, Path]:
    """``<slide_id>.h5|.pt`` in ``features_dir``, or in its only ``<backbone>/`` subfolder."""
    if not features_dir.is_dir():
        raise FileNotFoundError(f"{features_dir}: features folder not found")
    found = {p.stem: p for p in sorted(features_dir.iterdir()) if p.suffix in BAG_SUFFIXES and p.is_file()}
    if not found:
        subs = [d for d in sorted(features_dir.iterdir()) if d.is_dir() and not d.name.startswith(".")]
        with_bags = [d for d in subs if any(p.suffix in BAG_SUFFIXES for p in d.iterdir())]
        if len(with_bags) == 1:
            return find_bag_files(with_bags[0])
        if len(with_bags) > 1:
            names = [d.name for d in with_bags]
            raise ValueError(f"{features_dir}: several backbone subfolders {names}; pass one of them")
    for stem, path in list(found.items()):  # .h5 wins over CLAM's .pt of the same slide
        if path.suffix == ".pt" and (path.with_suffix(".h5")).is_file():
            found[stem] = path.with_suffix(".h5")
    return found


def pair_inputs(slides: Path, features_dir: Path) -> list[Pair]:
    """Every slide id seen on either side, sorted; a side that is missing stays None."""
    sources = {s.slide_id: s for s in discover_slides([slides])}
    bags = find_bag_files(features_dir)
    ids = sorted(set(sources) | set(bags))
    return [
        Pair(
            i,
            sources[i].path.resolve() if i in sources else None,
            bags.get(i),
            sources[i].mpp if i in sources else None,
        )
        for i in ids
    ]


def read_geometry(path: Path, max_px: int, mpp_override: float | None = None) -> SlideGeometry:
    """Open the slide with OpenSlide; any failure names the file."""
    import openslide

    try:
        slide = openslide.OpenSlide(str(path))
    except Exception as exc:
        raise OSError(f"{path}: OpenSlide cannot open this slide ({type(exc).__name__}: {exc})") from exc
    try:
        props = slide.properties
        width, height = slide.dimensions
        mpp = mpp_override
        if mpp is None and props.get("openslide.mpp-x"):
            mpp = float(props["openslide.mpp-x"])
        bounds = (int(props.get("openslide.bounds-x", 0) or 0), int(props.get("openslide.bounds-y", 0) or 0))
        scale = max(width, height) / max_px
        size = (max(1, round(width / scale)), max(1, round(height / scale))) if scale > 1 else (width, height)
        thumb = np.asarray(slide.get_thumbnail(size).convert("RGB"))
    finally:
        slide.close()
    if thumb.shape[1] != size[0] or thumb.shape[0] != size[1]:  # OpenSlide keeps the aspect ratio itself
        import cv2

        thumb = cv2.resize(thumb, size, interpolation=cv2.INTER_AREA)
    return SlideGeometry(int(width), int(height), mpp, bounds, np.ascontiguousarray(thumb))


def tile_size_of(bag: FeatureBag, override: int | None) -> int:
    """Level-0 tile side: the config's, else the bag's ``patch_size_level0`` (ours, TRIDENT), else
    CLAM's ``patch_size`` × ``downsample``, else the smallest coordinate spacing."""
    if override:
        return int(override)
    attrs = bag.attrs
    if int(attrs.get("patch_size_level0", 0) or 0) > 0:
        return int(attrs["patch_size_level0"])
    if int(attrs.get("patch_size", 0) or 0) > 0:
        return round(float(attrs["patch_size"]) * float(attrs.get("downsample", 1.0) or 1.0))
    assert bag.coords is not None
    steps = [np.diff(np.unique(bag.coords[:, k])) for k in (0, 1)]
    positive = [int(s[s > 0].min()) for s in steps if (s > 0).any()]
    if not positive:
        raise ValueError("the bag has no tile size attribute and a single tile; set tile_size")
    return int(min(positive))


def check_coords(bag: FeatureBag, width: int, height: int, tile: int) -> None:
    """Tiles must lie on the slide (a bag of another slide usually does not)."""
    assert bag.coords is not None
    c = bag.coords
    if (c < 0).any() or (c[:, 0] >= width).any() or (c[:, 1] >= height).any():
        x, y = int(c[:, 0].max()), int(c[:, 1].max())
        raise ValueError(
            f"tile coordinates reach ({x}, {y}) but the slide is {width} x {height} px: "
            "is the bag from another slide?"
        )
    if tile <= 0 or not math.isfinite(tile):
        raise ValueError(f"bad tile size {tile}")
