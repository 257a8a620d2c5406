"""Feature bags for training: locate and check them, tile labels, the Dataset and DataModule.

Bags are read with :mod:`pathopeft.bags`, so ``pathopeft tile`` output, CLAM ``h5_files``/``pt_files``
and TRIDENT h5 all work unchanged. Before anything trains, every manifest slide's bag is located
and its shape read: missing or unreadable bags are reported together in one error (or skipped with
one warning under ``allow_missing``), and a feature size that differs from the model's is an error
naming the slides.

Tile labels (localization): with ``annotations`` set, each slide with an annotation file gets
labels from :func:`pathopeft.wsi.annotations.tile_labels` using its coordinates and level-0 tile
size. A slide without an annotation file is all-negative when its bag label is the negative class
(a normal slide has no tumour) and otherwise unlabelled (−1: a tumour slide without outlines must
not count as tumour-free). Unlabelled tiles are ignored by the instance metrics.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import lightning
import numpy as np
import pandas as pd
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from pathopeft.bags import BagError, bag_shape, find_bag, read_bag
from pathopeft.config import ConfigError
from pathopeft.config.train import DataConfig
from pathopeft.mil.manifest import assign_splits, read_manifest
from pathopeft.wsi.annotations import find_annotation, read_annotations, tile_labels

__all__ = [
    "BagDataset",
    "MILDataModule",
    "SlideItem",
    "collate_bags",
    "locate_bags",
    "resolve_features_dir",
    "tile_size_level0",
]

log = logging.getLogger(__name__)


@dataclass
class SlideItem:
    """One manifest slide with its resolved bag."""

    slide_id: str
    label: int
    split: str
    bag: Path
    n_tiles: int


def resolve_features_dir(features_dir: str | Path, backbone: str | None = None) -> Path:
    """The folder that holds the bags: ``features_dir/backbone``, or the only backbone subfolder."""
    root = Path(features_dir)
    if backbone:
        root = root / backbone
    if not root.is_dir():
        raise ConfigError(f"{root}: features folder not found (data.features_dir / data.backbone)")
    if backbone or _has_bags(root):
        return root
    subfolders = sorted(p for p in root.iterdir() if p.is_dir() and _has_bags(p))
    if len(subfolders) == 1:
        return subfolders[0]
    if not subfolders:
        raise ConfigError(f"{root}: no feature bags here or in a <backbone>/ subfolder")
    names = ", ".join(p.name for p in subfolders)
    raise ConfigError(f"{root} holds several backbones ({names}); choose one with --set data.backbone=NAME")


def _has_bags(folder: Path) -> bool:
    return any(find_bag(folder, p.stem) for p in folder.glob("*") if p.is_file()) or any(
        (folder / sub).is_dir() for sub in ("h5_files", "pt_files")
    )


def locate_bags(
    df: pd.DataFrame, features_dir: Path, *, allow_missing: bool, in_dim: int | None
) -> tuple[list[SlideItem], int]:
    """Find and shape-check every slide's bag; return the items and the common feature size."""
    items, missing, unreadable = [], [], []
    dims: dict[int, list[str]] = {}
    for row in df.itertuples():
        path = find_bag(features_dir, row.slide_id)
        if path is None:
            missing.append(row.slide_id)
            continue
        try:
            n, d = bag_shape(path)
        except BagError as exc:
            unreadable.append(str(exc))
            continue
        if n == 0:
            unreadable.append(f"{path}: empty bag (0 tiles)")
            continue
        dims.setdefault(d, []).append(row.slide_id)
        items.append(SlideItem(row.slide_id, int(row.label), str(row.split), path, n))
    problems = []
    if missing:
        problems.append(
            f"{len(missing)} slide(s) have no feature bag in {features_dir}: {', '.join(missing)}"
        )
    if unreadable:
        problems.append(f"{len(unreadable)} bag(s) cannot be read:\n    " + "\n    ".join(unreadable))
    if problems:
        message = "\n".join(problems)
        if not allow_missing:
            raise ConfigError(message + "\n(set data.allow_missing=true to train without them)")
        log.warning("skipping slides without a usable bag:\n%s", message)
    if not items:
        raise ConfigError(f"no usable feature bags for the manifest in {features_dir}")
    expected = in_dim if in_dim is not None else max(dims, key=lambda d: len(dims[d]))
    wrong = {d: ids for d, ids in dims.items() if d != expected}
    if wrong:
        detail = "; ".join(f"{d}-d: {', '.join(ids[:10])}" for d, ids in sorted(wrong.items()))
        source = "model.in_dim" if in_dim is not None else "most bags"
        raise ConfigError(f"feature size mismatch: {source} = {expected}, but {detail}")
    return items, expected


def read_coords(bag: Path, coords_dir: str | Path | None, slide_id: str) -> tuple[np.ndarray | None, dict]:
    """Tile coordinates and attributes of a bag, from the bag itself or its coordinates file."""
    attrs: dict[str, Any] = {}
    coords = None
    if bag.suffix != ".pt":
        with h5py.File(bag, "r") as h5:
            if "coords" in h5:
                coords = np.asarray(h5["coords"][()]).reshape(-1, 2).astype(np.int64)
                attrs.update(_attrs(h5["coords"].attrs))
            attrs.update(_attrs(h5.attrs))
    candidates = [bag.parent.parent / "h5_files" / f"{slide_id}.h5"]  # CLAM: pt_files/ next to h5_files/
    if coords_dir:
        candidates.insert(0, Path(coords_dir) / f"{slide_id}.h5")
    for path in candidates:
        if path.is_file():
            with h5py.File(path, "r") as h5:
                if "coords" not in h5:
                    continue
                found = np.asarray(h5["coords"][()]).reshape(-1, 2).astype(np.int64)
                extra = {**_attrs(h5.attrs), **_attrs(h5["coords"].attrs)}
            if coords is None:
                coords = found
            if coords is not None and len(found) == len(coords):
                attrs = {**extra, **attrs}
            break
    return coords, attrs


def _attrs(source: Any) -> dict[str, Any]:
    out = {}
    for key, value in source.items():
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        elif isinstance(value, np.generic):
            value = value.item()
        elif isinstance(value, np.ndarray):
            value = value.tolist()
        out[key] = value
    return out


def tile_size_level0(attrs: dict[str, Any], coords: np.ndarray | None) -> float | None:
    """A tile's side on level 0: stored sizes first (ours, TRIDENT, CLAM), else the coordinate grid step."""
    for key in ("tile_size_level0", "patch_size_level0"):
        if float(attrs.get(key) or 0) > 0:
            return float(attrs[key])
    if "patch_size" in attrs and "downsample" in attrs:
        downsample = attrs["downsample"]
        downsample = downsample[0] if isinstance(downsample, (list, tuple)) else downsample
        if float(attrs["patch_size"]) > 0 and float(downsample) > 0:
            return float(attrs["patch_size"]) * float(downsample)
    if coords is not None and len(coords) > 1:
        steps = [np.diff(np.unique(coords[:, i])) for i in (0, 1)]
        steps = [s[s > 0].min() for s in steps if (s > 0).any()]
        if steps:
            return float(min(steps))
    return None


def compute_tile_labels(
    items: list[SlideItem], cfg: DataConfig, negative_index: int | None
) -> dict[str, np.ndarray]:
    """Per-slide tile labels (int8: 1 tumour, 0 not, −1 unknown) for slides that can have them."""
    if not cfg.annotations:
        return {}
    folder = Path(cfg.annotations)
    if not folder.is_dir():
        raise ConfigError(f"{folder}: annotation folder not found (data.annotations)")
    labels: dict[str, np.ndarray] = {}
    for item in items:
        path = find_annotation(folder, item.slide_id)
        if path is None:
            if negative_index is not None and item.label == negative_index:
                labels[item.slide_id] = np.zeros(item.n_tiles, dtype=np.int8)
            continue
        coords, attrs = read_coords(item.bag, cfg.coords_dir, item.slide_id)
        size = tile_size_level0(attrs, coords)
        if coords is None or size is None:
            log.warning(
                "%s: annotated, but its bag has no coordinates/tile size; no tile labels", item.slide_id
            )
            continue
        bounds = (int(attrs.get("bounds_x", 0)), int(attrs.get("bounds_y", 0)))  # QuPath's frame
        regions = read_annotations(path, bounds_offset=bounds)
        labels[item.slide_id] = tile_labels(regions, coords, size, cfg.tile_label_threshold).astype(np.int8)
    log.info("tile labels for %d of %d slides", len(labels), len(items))
    return labels


class BagDataset(Dataset):
    """One item per slide: its features, coordinates, label and tile labels (as tensors)."""

    def __init__(
        self,
        items: list[SlideItem],
        *,
        coords_dir: str | Path | None = None,
        tile_labels: dict[str, np.ndarray] | None = None,
        max_instances: int | None = None,
        task: int | None = None,
    ) -> None:
        self.items = items
        self.coords_dir = coords_dir
        self.tile_labels = tile_labels or {}
        self.max_instances = max_instances
        self.task = task  # index of the task in a continual model (None: the module's training task)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        bag = read_bag(item.bag, item.slide_id)
        coords = bag.coords
        if coords is None:
            coords, _ = read_coords(item.bag, self.coords_dir, item.slide_id)
            if coords is not None and len(coords) != bag.n_tiles:
                coords = None
        labels = self.tile_labels.get(item.slide_id)
        if labels is not None and len(labels) != bag.n_tiles:
            raise BagError(f"{item.bag}: {bag.n_tiles} tiles but {len(labels)} tile labels")
        keep = None
        if self.max_instances is not None and bag.n_tiles > self.max_instances:
            keep = np.sort(torch.randperm(bag.n_tiles)[: self.max_instances].numpy())
        feats = bag.features if keep is None else bag.features[keep]
        out = {
            "features": torch.as_tensor(np.ascontiguousarray(feats), dtype=torch.float32),
            "coords": None if coords is None else torch.as_tensor(coords if keep is None else coords[keep]),
            "label": item.label,
            "tile_labels": None
            if labels is None
            else torch.as_tensor((labels if keep is None else labels[keep]).astype(np.int64)),
            "slide_id": item.slide_id,
            "index": index,
            "task": self.task,
        }
        return out


def collate_bags(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Pad a list of bags to (B, N_max, D) with a boolean mask; tile labels −1 where unknown/padded."""
    n_max = max(b["features"].shape[0] for b in batch)
    d = batch[0]["features"].shape[1]
    size = len(batch)
    features = torch.zeros((size, n_max, d), dtype=torch.float32)
    mask = torch.zeros((size, n_max), dtype=torch.bool)
    tile = torch.full((size, n_max), -1, dtype=torch.long)
    has_coords = all(b["coords"] is not None for b in batch)
    coords = torch.zeros((size, n_max, 2), dtype=torch.long) if has_coords else None
    for i, b in enumerate(batch):
        n = b["features"].shape[0]
        features[i, :n] = b["features"]
        mask[i, :n] = True
        if b["tile_labels"] is not None:
            tile[i, :n] = b["tile_labels"]
        if coords is not None:
            coords[i, :n] = b["coords"]
    tasks = [b.get("task") for b in batch]
    return {
        "features": features,
        "mask": mask,
        "coords": coords,
        "tasks": None if any(t is None for t in tasks) else torch.tensor(tasks, dtype=torch.long),
        "labels": torch.tensor([b["label"] for b in batch], dtype=torch.long),
        "tile_labels": tile,
        "slide_ids": [b["slide_id"] for b in batch],
        "indices": torch.tensor([b["index"] for b in batch], dtype=torch.long),
    }


class MILDataModule(lightning.LightningDataModule):
    """Manifest → splits → located bags → train/val/test loaders (DDP-aware)."""

    def __init__(
        self, cfg: DataConfig, *, in_dim: int | None = None, seed: int = 0, task: int | None = None
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.task = task  # this data's task index in a continual model (None: the training task)
        # bags of other tasks trained alongside (experience replay, joint training): (task index, dataset)
        self.extra_train: list[BagDataset] = []
        self.seed = seed
        self.requested_dim = in_dim
        self.items: list[SlideItem] | None = None
        self.in_dim: int | None = None
        self.features_dir: Path | None = None
        self.tile_labels: dict[str, np.ndarray] | None = None
        self.test_split = "test"
        self.splits: pd.DataFrame | None = None

    def prepare(self) -> None:
        """Read and check everything (idempotent); called before the model is built."""
        if self.items is not None:
            return
        cfg = self.cfg
        df = read_manifest(cfg.manifest, cfg.classes)
        df = assign_splits(df, fold=cfg.fold, val_fraction=cfg.val_fraction, seed=self.seed)
        self.features_dir = resolve_features_dir(cfg.features_dir, cfg.backbone)
        self.items, self.in_dim = locate_bags(
            df, self.features_dir, allow_missing=cfg.allow_missing, in_dim=self.requested_dim
        )
        kept = {i.slide_id for i in self.items}
        self.splits = df[df["slide_id"].isin(kept)][["slide_id", "case_id", "label_name", "split"]].rename(
            columns={"label_name": "label"}
        )
        for split in ("train", "val"):  # the manifest had some (assign_splits checks): bags are missing
            if not self.split_items(split):
                ids = df.loc[df["split"] == split, "slide_id"].tolist()
                raise ConfigError(
                    f"no {split} slides left: the bags of all {len(ids)} {split} slide(s) "
                    f"({', '.join(ids[:10])}{', ...' if len(ids) > 10 else ''}) are missing or unreadable "
                    "and were skipped (data.allow_missing); add their bags or move other slides to that split"
                )
        if not self.split_items("test"):
            log.warning("the manifest has no test slides: the final evaluation uses the validation split")
            self.test_split = "val"
        self.tile_labels = compute_tile_labels(self.items, cfg, cfg.negative_index())

    def split_items(self, split: str) -> list[SlideItem]:
        assert self.items is not None
        return [i for i in self.items if i.split == split]

    def setup(self, stage: str | None = None) -> None:
        self.prepare()

    def _dataset(self, split: str, train: bool) -> BagDataset:
        return BagDataset(
            self.split_items(split),
            coords_dir=self.cfg.coords_dir,
            tile_labels=self.tile_labels,
            max_instances=self.cfg.max_instances_train if train else None,
            task=self.task,
        )

    def _loader(self, dataset: BagDataset, *, shuffle: bool, eval_mode: bool) -> DataLoader:
        sampler = None
        trainer = self.trainer
        if eval_mode and trainer is not None and trainer.world_size > 1:
            from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

            # every slide evaluated exactly once (Lightning's default sampler repeats some)
            sampler = UnrepeatedDistributedSampler(
                dataset, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False
            )
        return DataLoader(
            dataset,
            batch_size=self.cfg.batch_size,
            shuffle=shuffle if sampler is None else False,
            sampler=sampler,
            num_workers=self.cfg.num_workers,
            collate_fn=collate_bags,
            persistent_workers=self.cfg.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        dataset: Any = self._dataset("train", train=True)
        if self.extra_train:
            dataset = ConcatDataset([dataset, *self.extra_train])
        return self._loader(dataset, shuffle=True, eval_mode=False)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("val", train=False), shuffle=False, eval_mode=True)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._dataset(self.test_split, train=False), shuffle=False, eval_mode=True)
