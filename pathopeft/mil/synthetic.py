"""Synthetic MIL cohorts with planted positive tiles (tests, benchmarks, demos).

Each slide is a grid of tiles (level-0 coordinates, tile side ``tile_size``) stored in *shuffled*
file order, so file-order and spatial grouping differ. Tile features are Gaussian noise around a
few "tissue type" centres; a tumour slide carries one rectangular lesion of neighbouring tiles
whose features are shifted along a fixed direction by ``signal``. Written as ``pathopeft tile``
writes them (``features/<id>.h5`` via :func:`pathopeft.bags.write_bag`), plus
``annotations/<id>.geojson`` (the lesion rectangle, level-0 px) and ``manifest.csv``
(slide_id,label,split). The ground-truth tile labels follow from the annotations exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pathopeft.bags import FeatureBag, write_bag
from pathopeft.files import atomic_write_text

__all__ = ["SyntheticCohort", "make_synthetic_bags", "synthetic_bag"]


@dataclass
class SyntheticCohort:
    root: Path
    features_dir: Path
    annotations_dir: Path
    manifest: Path
    slide_ids: list[str]
    labels: list[str]


def synthetic_bag(
    rng: np.random.Generator,
    *,
    dim: int,
    side: int,
    tumor: bool,
    signal: float,
    tile_size: int = 256,
    lesion_tiles: tuple[int, int] = (2, 5),
    n_types: int = 4,
    direction: np.ndarray | None = None,
    centres: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int, int, int] | None]:
    """Features (N, D), coords (N, 2), tile labels (N,) and the lesion box in tiles (x0, y0, x1, y1)."""
    gx, gy = np.meshgrid(np.arange(side), np.arange(side))
    cells = np.stack([gx.ravel(), gy.ravel()], axis=1)
    direction = np.ones(dim) / np.sqrt(dim) if direction is None else direction
    centres = rng.normal(0, 1.0, (n_types, dim)) if centres is None else centres
    feats = centres[rng.integers(0, len(centres), len(cells))] + rng.normal(0, 1.0, (len(cells), dim))
    labels = np.zeros(len(cells), dtype=np.uint8)
    box = None
    if tumor:
        w, h = (int(v) for v in rng.integers(lesion_tiles[0], lesion_tiles[1] + 1, 2))
        x0, y0 = int(rng.integers(0, side - w + 1)), int(rng.integers(0, side - h + 1))
        box = (x0, y0, x0 + w, y0 + h)
        inside = (cells[:, 0] >= x0) & (cells[:, 0] < x0 + w) & (cells[:, 1] >= y0) & (cells[:, 1] < y0 + h)
        labels[inside] = 1
        feats[inside] += signal * direction * np.sqrt(dim)
    order = rng.permutation(len(cells))
    coords = cells[order] * tile_size
    return feats[order].astype(np.float32), coords.astype(np.int64), labels[order], box


def make_synthetic_bags(
    root: str | Path,
    *,
    n_train: int = 40,
    n_val: int = 12,
    n_test: int = 16,
    dim: int = 32,
    side: tuple[int, int] = (8, 12),
    signal: float = 1.0,
    tile_size: int = 256,
    seed: int = 0,
    backbone: str = "synthetic",
) -> SyntheticCohort:
    """Write a balanced synthetic cohort under ``root`` (see the module docstring)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    features_dir = root / "features" / backbone
    annotations_dir = root / "annotations"
    direction = rng.normal(0, 1, dim)
    direction /= np.linalg.norm(direction)
    centres = rng.normal(0, 1.0, (4, dim))
    rows, ids, labels = ["slide_id,label,split"], [], []
    for split, count in (("train", n_train), ("val", n_val), ("test", n_test)):
        for i in range(count):
            tumor = i % 2 == 1
            slide_id = f"{split}_{i:03d}"
            n_side = int(rng.integers(side[0], side[1] + 1))
            feats, coords, _, box = synthetic_bag(
                rng, dim=dim, side=n_side, tumor=tumor, signal=signal, tile_size=tile_size,
                direction=direction, centres=centres,
            )  # fmt: skip
            attrs = {"patch_size": tile_size, "downsample": 1.0, "patch_size_level0": tile_size}
            write_bag(features_dir / f"{slide_id}.h5", FeatureBag(slide_id, feats, coords, attrs))
            features = []
            if box is not None:
                x0, y0, x1, y1 = (v * tile_size for v in box)
                ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
                features.append(
                    {
                        "type": "Feature",
                        "geometry": {"type": "Polygon", "coordinates": [ring]},
                        "properties": {"objectType": "annotation", "classification": {"name": "Tumor"}},
                    }
                )
                collection = {"type": "FeatureCollection", "features": features}
                atomic_write_text(annotations_dir / f"{slide_id}.geojson", json.dumps(collection))
            label = "tumor" if tumor else "normal"
            rows.append(f"{slide_id},{label},{split}")
            ids.append(slide_id)
            labels.append(label)
    manifest = root / "manifest.csv"
    atomic_write_text(manifest, "\n".join(rows) + "\n")
    annotations_dir.mkdir(parents=True, exist_ok=True)
    return SyntheticCohort(root, features_dir, annotations_dir, manifest, ids, labels)
