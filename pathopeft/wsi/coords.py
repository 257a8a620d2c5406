"""``coords/<slide_id>.h5``: the tile grid in CLAM's layout (also readable the TRIDENT way).

Layout::

    coords            (N, 2) int64, level-0 x, y of each tile's top-left corner
      attrs: patch_size (tile_px), patch_level, downsample (target_mpp / slide_mpp),
             level_downsample, read_size, patch_size_level0 (TRIDENT), tile_size_level0,
             mpp, target_mpp, overlap, slide_id, level_dim (W, H),
             bounds_x, bounds_y (openslide.bounds-x/y: add to QuPath coordinates), + extra attrs
    tissue_fraction   (N,) float32

CLAM/TRIDENT users read it as ``f['coords'][:]`` and ``f['coords'].attrs['patch_size']``; the same
attributes are mirrored on the file root for tools that look there.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pathopeft.files import atomic_path
from pathopeft.wsi.grid import TileGrid

__all__ = ["read_coords", "write_coords"]


def write_coords(path: str | Path, grid: TileGrid, extra_attrs: Mapping[str, Any] | None = None) -> None:
    """Write ``grid`` atomically (a killed run never leaves a file that looks complete)."""
    attrs: dict[str, Any] = {
        "patch_size": int(grid.tile_px),
        "patch_level": int(grid.level),
        "downsample": float(grid.downsample),
        "level_downsample": float(grid.level_downsample),
        "read_size": int(grid.read_size),
        "patch_size_level0": round(grid.tile_size_level0),
        "tile_size_level0": float(grid.tile_size_level0),
        "mpp": float(grid.slide_mpp),
        "target_mpp": float(grid.target_mpp),
        "overlap": int(grid.overlap_px),
        "slide_id": str(grid.slide_id),
        "level_dim": np.asarray(grid.slide_dimensions, dtype=np.int64),
        "bounds_x": int(grid.bounds_offset[0]),
        "bounds_y": int(grid.bounds_offset[1]),
    }
    for key, value in (extra_attrs or {}).items():
        attrs[str(key)] = value
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
        coords = h5.create_dataset("coords", data=np.asarray(grid.coords, dtype=np.int64).reshape(-1, 2))
        h5.create_dataset("tissue_fraction", data=np.asarray(grid.tissue_fraction, dtype=np.float32))
        for key, value in attrs.items():
            coords.attrs[key] = value
            h5.attrs[key] = value


def read_coords(path: str | Path) -> TileGrid:
    """Read a coords file written by :func:`write_coords` back into a :class:`TileGrid`."""
    path = Path(path)
    with h5py.File(path, "r") as h5:
        if "coords" not in h5:
            raise KeyError(f"{path}: no 'coords' dataset")
        ds = h5["coords"]
        coords = np.asarray(ds[:], dtype=np.int64).reshape(-1, 2)
        attrs = {k: _plain(v) for k, v in ds.attrs.items()}
        fraction = (
            np.asarray(h5["tissue_fraction"][:], dtype=np.float32)
            if "tissue_fraction" in h5
            else np.ones(len(coords), np.float32)
        )
    missing = [k for k in ("patch_size", "patch_level", "downsample", "mpp", "target_mpp") if k not in attrs]
    if missing:
        raise KeyError(f"{path}: coords attrs missing {missing}")
    tile_px = int(attrs["patch_size"])
    downsample = float(attrs["downsample"])
    tile0 = float(attrs.get("tile_size_level0", tile_px * downsample))
    level_ds = float(attrs.get("level_downsample", 1.0))
    dims = attrs.get("level_dim", (0, 0))
    bounds = (attrs.get("bounds_x", 0), attrs.get("bounds_y", 0))
    return TileGrid(
        coords=coords,
        tissue_fraction=fraction,
        tile_px=tile_px,
        level=int(attrs["patch_level"]),
        level_downsample=level_ds,
        read_size=int(attrs.get("read_size", round(tile0 / level_ds))),
        tile_size_level0=tile0,
        downsample=downsample,
        slide_mpp=float(attrs["mpp"]),
        target_mpp=float(attrs["target_mpp"]),
        slide_id=str(attrs.get("slide_id", path.stem)),
        overlap_px=int(attrs.get("overlap", 0)),
        slide_dimensions=(int(dims[0]), int(dims[1])),
        bounds_offset=(int(bounds[0]), int(bounds[1])),
    )


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value
