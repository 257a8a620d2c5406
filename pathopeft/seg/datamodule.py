"""Datasets, albumentations transforms and the LightningDataModule of ``segment train``.

Training sees random ``img_size`` crops (tile mode) or whole images squashed to ``img_size``
(resize mode), augmented; validation and test see whole images, only normalised — the module
runs sliding-window (or resize) inference over them, so metrics are computed on full images.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import albumentations as A
import cv2
import lightning
import torch
from albumentations.pytorch import ToTensorV2
from torch.utils.data import DataLoader, Dataset, get_worker_info

from pathopeft.config.segment import SegAugmentConfig, SegDataConfig
from pathopeft.seg.data import LabelMap, Sample, read_image, read_mask, rescale_pair

__all__ = ["EvalDataset", "SegDataModule", "TrainDataset", "eval_transform", "train_transform"]


def train_transform(
    augment: SegAugmentConfig,
    *,
    img_size: int,
    mode: str,
    mean: Sequence[float],
    std: Sequence[float],
    seed: int,
) -> A.Compose:
    """Geometry (scale, crop/resize, flips, 90° turns), then colour and H&E stain jitter."""
    low, high = augment.scale
    ops: list[Any] = []
    if mode == "tile":
        if (low, high) != (1.0, 1.0):
            ops.append(A.RandomScale(scale_limit=(low - 1.0, high - 1.0), p=1.0))
        ops += [
            A.PadIfNeeded(min_height=img_size, min_width=img_size, border_mode=cv2.BORDER_REFLECT_101),
            A.RandomCrop(height=img_size, width=img_size),
        ]
    else:
        ops.append(A.Resize(height=img_size, width=img_size))
        if (low, high) != (1.0, 1.0):
            ops.append(A.Affine(scale=(low, high), border_mode=cv2.BORDER_REFLECT_101, p=1.0))
    if augment.flip:
        ops += [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)]
    if augment.rotate90:
        ops.append(A.RandomRotate90(p=1.0))
    if augment.color_jitter > 0:
        j = augment.color_jitter
        ops.append(
            A.ColorJitter(
                brightness=(1 - j, 1 + j),
                contrast=(1 - j, 1 + j),
                saturation=(1 - j, 1 + j),
                hue=(-j / 4, j / 4),
                p=0.8,
            )
        )
    if augment.stain_jitter > 0:
        ops.append(A.HEStain(method="random_preset", p=augment.stain_jitter))
    ops += [A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0), ToTensorV2()]
    return A.Compose(ops, seed=seed)


def eval_transform(mean: Sequence[float], std: Sequence[float]) -> A.Compose:
    """Deterministic: normalisation only (the image keeps its size)."""
    return A.Compose([A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0), ToTensorV2()])


class TrainDataset(Dataset):
    """``samples_per_image`` augmented views of each training image per epoch."""

    def __init__(
        self,
        samples: Sequence[Sample],
        labels: LabelMap,
        transform: A.Compose,
        *,
        samples_per_image: int = 1,
        rescale: float = 1.0,
        seed: int = 0,
    ) -> None:
        self.samples = list(samples)
        self.labels = labels
        self.transform = transform
        self.samples_per_image = samples_per_image
        self.rescale = rescale
        self.seed = seed
        self._seeded_for: tuple[int, int] | None = None

    def __len__(self) -> int:
        return len(self.samples) * self.samples_per_image

    def _reseed(self) -> None:
        # albumentations keeps its own generator: give each DataLoader worker (and each epoch's
        # fresh workers) its own reproducible stream, derived from torch's per-worker seed.
        info = get_worker_info()
        if info is None:
            return
        key = (info.id, info.seed)
        if key != self._seeded_for:
            self.transform.set_random_seed((self.seed * 1_000_003 + info.seed) % 2**32)
            self._seeded_for = key

    def __getitem__(self, index: int) -> dict[str, Any]:
        self._reseed()
        sample = self.samples[index // self.samples_per_image]
        assert sample.mask is not None
        image, mask = rescale_pair(
            read_image(sample.image), read_mask(sample.mask, self.labels), self.rescale
        )
        out = self.transform(image=image, mask=mask)
        return {"image": out["image"], "mask": out["mask"].long().unsqueeze(0)}


class EvalDataset(Dataset):
    """Whole images (normalised) with their masks; sizes may differ, so batch size is 1."""

    def __init__(
        self, samples: Sequence[Sample], labels: LabelMap, transform: A.Compose, *, rescale: float = 1.0
    ) -> None:
        self.samples = list(samples)
        self.labels = labels
        self.transform = transform
        self.rescale = rescale

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        assert sample.mask is not None
        image, mask = rescale_pair(
            read_image(sample.image), read_mask(sample.mask, self.labels), self.rescale
        )
        out = self.transform(image=image, mask=mask)
        return {"image": out["image"], "mask": out["mask"].long().unsqueeze(0), "name": sample.name}


class SegDataModule(lightning.LightningDataModule):
    """Train/val/test loaders over already-checked, already-split samples."""

    def __init__(
        self,
        cfg: SegDataConfig,
        splits: dict[str, list[Sample]],
        *,
        img_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        seed: int,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.splits = splits
        self.img_size = img_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.seed = seed
        self.labels = LabelMap(cfg.num_classes, tuple(cfg.label_values) if cfg.label_values else None)

    def _loader(self, dataset: Dataset, *, train: bool) -> DataLoader:
        workers = self.cfg.num_workers
        sampler = None
        trainer = self.trainer
        # (a rank without any image would skip the epoch-end metric sync and hang the others: with
        # fewer images than ranks Lightning's padding sampler stays, and an image may count twice)
        if not train and trainer is not None and 1 < trainer.world_size <= len(dataset):  # type: ignore[arg-type]
            from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

            # every image scored exactly once: Lightning's default DistributedSampler pads the
            # shards to equal length by repeating images, which would count them twice
            sampler = UnrepeatedDistributedSampler(
                dataset,  # type: ignore[arg-type]
                num_replicas=trainer.world_size,
                rank=trainer.global_rank,
                shuffle=False,
            )
        return DataLoader(
            dataset,
            batch_size=self.cfg.batch_size if train else 1,
            shuffle=train and sampler is None,
            sampler=sampler,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        rank = self.trainer.global_rank if self.trainer is not None else 0
        seed = self.seed + 7919 * rank  # each DDP rank augments differently
        transform = train_transform(
            self.cfg.augment,
            img_size=self.img_size,
            mode=self.cfg.mode,
            mean=self.mean,
            std=self.std,
            seed=seed,
        )
        dataset = TrainDataset(
            self.splits["train"],
            self.labels,
            transform,
            samples_per_image=self.cfg.samples_per_image,
            rescale=self.cfg.rescale,
            seed=seed,
        )
        return self._loader(dataset, train=True)

    def _eval(self, split: str) -> DataLoader:
        dataset = EvalDataset(
            self.splits[split], self.labels, eval_transform(self.mean, self.std), rescale=self.cfg.rescale
        )
        return self._loader(dataset, train=False)

    def val_dataloader(self) -> DataLoader:
        return self._eval("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval("test")
