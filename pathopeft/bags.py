"""Feature bags: per-slide tile features + level-0 coordinates, in our, CLAM's and TRIDENT's layouts.

Our layout (``tiles/features/<backbone>/<slide_id>.h5``) is the one CLAM and TRIDENT users already
read: datasets ``features`` (N, D) and ``coords`` (N, 2, level-0 x/y of each tile's top-left
corner), with provenance in attributes. Reading accepts all three producers without conversion:

* ours / TRIDENT / CLAM ``h5_files``: ``features`` (N, D) or (1, N, D), ``coords`` (N, 2);
* CLAM ``pt_files``: a bare (N, D) tensor saved with ``torch.save`` (read with ``weights_only=True``,
  so no code is unpickled); it carries no coordinates, CLAM keeps them in the sibling h5.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pathopeft.files import atomic_path

__all__ = [
    "BAG_SUFFIXES",
    "BagError",
    "FeatureBag",
    "bag_shape",
    "find_bag",
    "read_bag",
    "write_bag",
]

BAG_SUFFIXES = (".h5", ".hdf5", ".pt")


class BagError(ValueError):
    """A feature bag that is missing, unreadable or malformed (the message names the file)."""


@dataclass
class FeatureBag:
    """The features of one slide's tiles, in tile order, with where each tile lies on level 0."""

    slide_id: str
    features: np.ndarray  # (N, D) float
    coords: np.ndarray | None = None  # (N, 2) int64, level-0 top-left x, y
    attrs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.features.ndim != 2:
            raise BagError(f"{self.slide_id}: features must be (N, D), got shape {self.features.shape}")
        if self.coords is not None and self.coords.shape != (len(self.features), 2):
            raise BagError(
                f"{self.slide_id}: coords shape {self.coords.shape} does not match "
                f"{len(self.features)} feature rows"
            )

    @property
    def n_tiles(self) -> int:
        return int(self.features.shape[0])

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])


def write_bag(path: str | Path, bag: FeatureBag, *, dtype: str = "float32") -> Path:
    """Write ``bag`` atomically as h5 (``features``, ``coords`` + attrs on the file and datasets)."""
    path = Path(path)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
        feats = h5.create_dataset("features", data=bag.features.astype(dtype, copy=False))
        if bag.coords is not None:
            coords = h5.create_dataset("coords", data=bag.coords.astype(np.int64, copy=False))
            for key, value in bag.attrs.items():
                coords.attrs[key] = _h5_value(value)
        for key, value in bag.attrs.items():
            h5.attrs[key] = _h5_value(value)
            feats.attrs[key] = _h5_value(value)
        h5.attrs["slide_id"] = bag.slide_id
    return path


def read_bag(path: str | Path, slide_id: str | None = None) -> FeatureBag:
    """Read a bag written by pathopeft, CLAM or TRIDENT (``slide_id`` defaults to the file stem)."""
    path = Path(path)
    sid = slide_id or path.stem
    if not path.is_file():
        raise BagError(f"{path}: feature bag not found")
    try:
        if path.suffix == ".pt":
            return _read_pt(path, sid)
        return _read_h5(path, sid)
    except BagError:
        raise
    except Exception as exc:  # h5py/torch raise many types for corrupt files
        raise BagError(f"{path}: unreadable feature bag ({type(exc).__name__}: {exc})") from exc


def bag_shape(path: str | Path) -> tuple[int, int]:
    """(N, D) of a bag without loading its features (cheap check before training)."""
    path = Path(path)
    if path.suffix == ".pt":
        bag = read_bag(path)
        return bag.n_tiles, bag.dim
    try:
        with h5py.File(path, "r") as h5:
            if "features" not in h5:
                raise BagError(f"{path}: no 'features' dataset (keys: {sorted(h5.keys())})")
            shape = h5["features"].shape
    except BagError:
        raise
    except Exception as exc:
        raise BagError(f"{path}: unreadable feature bag ({type(exc).__name__}: {exc})") from exc
    shape = _squeeze_shape(shape, path)
    return int(shape[0]), int(shape[1])


def find_bag(features_dir: str | Path, slide_id: str) -> Path | None:
    """Locate a slide's bag in a features folder, whichever producer laid it out."""
    root = Path(features_dir)
    candidates = [root / f"{slide_id}{suffix}" for suffix in BAG_SUFFIXES]
    candidates += [root / "h5_files" / f"{slide_id}.h5", root / "pt_files" / f"{slide_id}.pt"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    return None


def _read_h5(path: Path, slide_id: str) -> FeatureBag:
    with h5py.File(path, "r") as h5:
        if "features" not in h5:
            raise BagError(f"{path}: no 'features' dataset (keys: {sorted(h5.keys())})")
        feats = np.asarray(h5["features"][()])
        feats = feats.reshape(_squeeze_shape(feats.shape, path))
        coords = None
        if "coords" in h5:
            coords = np.asarray(h5["coords"][()]).reshape(-1, 2).astype(np.int64)
        attrs: dict[str, Any] = {}
        for source in (h5.attrs, h5["features"].attrs, h5["coords"].attrs if "coords" in h5 else {}):
            attrs.update({k: _py_value(v) for k, v in source.items()})
    if coords is not None and len(coords) != len(feats):
        raise BagError(f"{path}: {len(feats)} feature rows but {len(coords)} coordinates")
    sid = str(attrs.pop("slide_id", slide_id))
    return FeatureBag(sid, feats, coords, attrs)


def _read_pt(path: Path, slide_id: str) -> FeatureBag:
    import torch

    obj = torch.load(path, map_location="cpu", weights_only=True)
    coords = None
    if isinstance(obj, Mapping):
        if "features" not in obj:
            raise BagError(f"{path}: a dict without a 'features' entry (keys: {sorted(obj)})")
        coords = obj.get("coords")
        obj = obj["features"]
    if not isinstance(obj, torch.Tensor):
        raise BagError(f"{path}: expected a feature tensor, got {type(obj).__name__}")
    feats = obj.float().numpy()
    feats = feats.reshape(_squeeze_shape(feats.shape, path))
    coords_np = None if coords is None else np.asarray(coords).reshape(-1, 2).astype(np.int64)
    return FeatureBag(slide_id, feats, coords_np, {})


def _squeeze_shape(shape: tuple[int, ...], path: Path) -> tuple[int, int]:
    if len(shape) == 3 and shape[0] == 1:
        return int(shape[1]), int(shape[2])
    if len(shape) != 2:
        raise BagError(f"{path}: features must be (N, D) or (1, N, D), got shape {tuple(shape)}")
    return int(shape[0]), int(shape[1])


def _h5_value(value: Any) -> Any:
    if value is None:
        return "none"
    if isinstance(value, (bool, int, float, str, np.generic)):
        return value
    return str(value)


def _py_value(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value
