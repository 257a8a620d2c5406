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

__all__ = [
    "LocalizationCohort",
    "SyntheticCohort",
    "make_localization_cohort",
    "make_synthetic_bags",
    "make_task_sequence",
    "synthetic_bag",
]


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


@dataclass
class LocalizationCohort(SyntheticCohort):
    ideal_instance_auc: float  # AUC of the ideal per-tile score (projection on the lesion direction)


def _lesion_cells(rng: np.random.Generator, side: int, count: int, compact: bool) -> np.ndarray:
    """``count`` grid cells: a grown blob of neighbours (compact) or scattered at random."""
    if not compact:
        return rng.choice(side * side, size=count, replace=False)
    start = int(rng.integers(0, side * side))
    chosen, frontier = {start}, [start]
    while len(chosen) < count:
        cell = frontier[int(rng.integers(0, len(frontier)))]
        x, y = cell % side, cell // side
        nx, ny = x + int(rng.integers(-1, 2)), y + int(rng.integers(-1, 2))
        if 0 <= nx < side and 0 <= ny < side and (ny * side + nx) not in chosen:
            chosen.add(ny * side + nx)
            frontier.append(ny * side + nx)
    return np.array(sorted(chosen))


def make_localization_cohort(
    root: str | Path,
    *,
    n_bags: tuple[int, int, int] = (40, 12, 16),
    tiles: tuple[int, int] = (300, 600),
    dim: int = 64,
    signal: float = 2.5,
    lesion_share: tuple[float, float] = (0.02, 0.10),
    compact: bool = True,
    n_types: int = 6,
    seed: int = 0,
    classes: tuple[str, str] = ("normal", "tumor"),
    prefix: str = "",
    direction: np.ndarray | None = None,
    centres: np.ndarray | None = None,
) -> LocalizationCohort:
    """A cohort to measure localization on: bags with a known ideal per-tile AUC.

    Background tiles are one of ``n_types`` tissue centres plus unit Gaussian noise; positive bags
    hold a lesion on a share of their tiles drawn from ``lesion_share``, grown as a connected blob
    (``compact``) or scattered, each lesion tile shifted by ``signal`` σ along one fixed direction.
    The ideal per-tile classifier projects on that direction; its pooled AUC over the test bags is
    returned, so a model's instance AUC can be read against what the signal allows.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    features_dir, annotations_dir = root / "features" / "synthetic", root / "annotations"
    annotations_dir.mkdir(parents=True, exist_ok=True)
    if direction is None:
        direction = rng.normal(0, 1, dim)
    direction = direction / np.linalg.norm(direction)
    centres = rng.normal(0, 1.0, (n_types, dim)) if centres is None else centres
    n_types = len(centres)
    rows, ids, labels, ideal_scores, ideal_labels = ["slide_id,label,split"], [], [], [], []
    for split, count in zip(("train", "val", "test"), n_bags):
        for i in range(count):
            tumor = i % 2 == 1
            slide_id = f"{prefix}{split}_{i:03d}"
            side = int(np.ceil(np.sqrt(rng.integers(tiles[0], tiles[1] + 1))))
            n = side * side
            feats = centres[rng.integers(0, n_types, n)] + rng.normal(0, 1.0, (n, dim))
            truth = np.zeros(n, dtype=np.uint8)
            if tumor:
                k = max(2, round(n * rng.uniform(*lesion_share)))
                cells = _lesion_cells(rng, side, k, compact)
                truth[cells] = 1
                feats[cells] += signal * direction
            grid = np.stack(np.meshgrid(np.arange(side), np.arange(side)), axis=-1).reshape(-1, 2)
            order = rng.permutation(n)
            coords = (grid[order] * 256).astype(np.int64)
            attrs = {"patch_size": 256, "downsample": 1.0, "patch_size_level0": 256}
            write_bag(
                features_dir / f"{slide_id}.h5",
                FeatureBag(slide_id, feats[order].astype(np.float32), coords, attrs),
            )
            if tumor:
                polys = [
                    [
                        [
                            [256 * x, 256 * y],
                            [256 * x + 256, 256 * y],
                            [256 * x + 256, 256 * y + 256],
                            [256 * x, 256 * y + 256],
                            [256 * x, 256 * y],
                        ]
                    ]
                    for x, y in (grid[c].tolist() for c in np.flatnonzero(truth))
                ]
                geometry = {"type": "MultiPolygon", "coordinates": polys}
                collection = {
                    "type": "FeatureCollection",
                    "features": [
                        {"type": "Feature", "geometry": geometry, "properties": {"objectType": "annotation"}}
                    ],
                }
                atomic_write_text(annotations_dir / f"{slide_id}.geojson", json.dumps(collection))
            if split == "test":
                ideal_scores.append(feats @ direction)
                ideal_labels.append(truth)
            label = classes[1] if tumor else classes[0]
            rows.append(f"{slide_id},{label},{split}")
            ids.append(slide_id)
            labels.append(label)
    manifest = root / "manifest.csv"
    atomic_write_text(manifest, "\n".join(rows) + "\n")
    ideal = _auc(np.concatenate(ideal_scores), np.concatenate(ideal_labels))
    return LocalizationCohort(root, features_dir, annotations_dir, manifest, ids, labels, ideal)


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    import torch
    from torchmetrics.functional.classification import binary_auroc

    return float(binary_auroc(torch.as_tensor(scores, dtype=torch.float32), torch.as_tensor(labels).long()))


def make_task_sequence(
    root: str | Path,
    names: tuple[str, ...] = ("breast", "liver", "colon"),
    *,
    dim: int = 64,
    seed: int = 0,
    shared_tissue: bool = False,
    **options: object,
) -> list[LocalizationCohort]:
    """A continual sequence: one localization cohort per organ, under ``root/<name>/``.

    Each organ has its own tissue centres (its own background) and its own lesion direction, so
    the three lesion types differ and a shared encoder must tell them apart; class names are
    ``<organ>_normal`` / ``<organ>_tumor`` (class-incremental prediction needs distinct names) and
    slide ids start with the organ. One bag feature space (``dim``) for all, as one backbone gives.
    ``shared_tissue`` gives every organ the same tissue centres (only the lesions differ): the
    hard case for routing a bag to its task by what its tissue looks like.
    """
    rng = np.random.default_rng(seed)
    cohorts = []
    shared = rng.normal(0, 1.0, (6, dim)) if shared_tissue else None
    for i, name in enumerate(names):
        direction = rng.normal(0, 1, dim)
        centres = rng.normal(0, 1.0, (6, dim)) + rng.normal(0, 1.5, dim)  # the organ's own background
        if shared is not None:
            centres = shared
        cohorts.append(
            make_localization_cohort(
                Path(root) / name,
                dim=dim,
                seed=seed * 100 + i,
                classes=(f"{name}_normal", f"{name}_tumor"),
                prefix=f"{name}_",
                direction=direction,
                centres=centres,
                **options,  # type: ignore[arg-type]
            )
        )
    return cohorts
