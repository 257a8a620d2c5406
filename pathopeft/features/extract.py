"""Encode one slide's tiles into an ``(N, D)`` feature matrix.

Inference runs under ``torch.inference_mode()`` and the runtime's autocast (bf16 on CUDA by
default, fp32 on CPU unless configured). Tiles arrive as uint8 batches and are normalised on the
device (see :mod:`pathopeft.features.dataset`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import numpy as np
import torch

from pathopeft.features.backbones import Backbone
from pathopeft.features.dataset import Preprocess, TileDataset, TileLoaderPool, make_tile_loader
from pathopeft.features.runtime import auto_workers
from pathopeft.wsi.slide import Slide

__all__ = ["FeatureExtractor", "ResizeTo"]

ResizeTo = Literal["model", "tile"] | int


class FeatureExtractor:
    """A backbone on a device, plus the loader settings to feed it tiles of one slide at a time.

    ``num_workers=None`` means what the machine has (:func:`~pathopeft.features.runtime.auto_workers`).
    With ``num_workers > 0`` the reading workers are started on the first slide and kept for the
    next ones (:class:`~pathopeft.features.dataset.TileLoaderPool`); :meth:`close` stops them (a
    failed slide also stops them: the next slide starts fresh ones). Use it as a context manager.
    """

    def __init__(
        self,
        backbone: Backbone,
        *,
        device: torch.device | str = "cpu",
        autocast: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
        precision: str = "32-true",
        batch_size: int = 64,
        num_workers: int | None = None,
        resize_to: ResizeTo = "model",
    ) -> None:
        self.backbone = backbone
        self.device = torch.device(device)
        self.autocast = autocast or contextlib.nullcontext
        self.precision = precision
        self.batch_size = batch_size
        if num_workers is None:  # what the machine has (one device)
            num_workers = auto_workers(1)
        self.num_workers = int(num_workers)
        self.resize_to = resize_to
        self.channels_last = self.device.type == "cuda"
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed tile size: let cuDNN pick the fastest kernels
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        self.model = backbone.model.to(self.device, memory_format=fmt).eval()
        self.preprocess = Preprocess(backbone.mean, backbone.std, backbone.interpolation).to(self.device)
        self._pool: TileLoaderPool | None = None

    def close(self) -> None:
        """Stop the tile-reading workers (they restart on the next :meth:`extract`)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    def __enter__(self) -> FeatureExtractor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def out_size(self, tile_px: int) -> tuple[int, int]:
        """``(w, h)`` fed to the model for tiles of ``tile_px``: the model's input size, the tile's, or N."""
        if self.resize_to == "model":
            h, w = self.backbone.input_size
            return int(w), int(h)
        if self.resize_to == "tile":
            return int(tile_px), int(tile_px)
        return int(self.resize_to), int(self.resize_to)

    def fingerprint(self, tile_px: int) -> dict[str, Any]:
        """Everything about the encoder that changes the numbers in a bag (not batch size/devices)."""
        return {
            "backbone": self.backbone.name,
            "weights": self.backbone.weights_id,
            "weights_tensors": self.backbone.tensors_sha256,  # a changed hub default tag or revision
            "model_kwargs": self.backbone.model_kwargs,
            "input_px": list(self.out_size(tile_px)),
            "mean": list(self.backbone.mean),
            "std": list(self.backbone.std),
            "interpolation": self.backbone.interpolation,
            "precision": self.precision,
        }

    def dataset(
        self, slide: Slide, coords: np.ndarray, level: int, read_size: int | Sequence[int], tile_px: int
    ) -> TileDataset:
        """The slide's tiles for this extractor: resized to the model input in the workers for a CPU
        model; for a GPU at tile size (resized on the device, where it is free)."""
        return TileDataset(
            slide,
            coords,
            level,
            read_size,
            tile_px,
            interpolation=self.backbone.interpolation,
            input_size=self.out_size(tile_px) if self.device.type == "cpu" else None,
        )

    def loader_batch_size(self, n_tiles: int) -> int:
        """Tiles per loader batch: ``batch_size``, but small enough that every worker gets a share.

        Each worker reads whole batches; a biopsy of 900 tiles in batches of 256 would keep only 4
        of 12 workers busy while the GPU waits. Big slides are unaffected.
        """
        workers = max(1, self.num_workers)
        return max(1, min(self.batch_size, math.ceil(n_tiles / workers)))

    @torch.inference_mode()
    def encode(self, tiles: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """``(B, H, W, 3)`` uint8, resized to ``size`` = ``(w, h)`` if needed and normalised on the
        device → ``(B, D)`` float32 on the CPU."""
        x = self.preprocess(tiles.to(self.device, non_blocking=True), size)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self.autocast():
            out = self.model(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        if out.ndim != 2:
            raise RuntimeError(
                f"{self.backbone.name}: expected pooled (B, D) features, got shape {tuple(out.shape)}; "
                "keep the model's global pooling (do not pass global_pool='')"
            )
        return out.float().cpu()

    def extract(
        self,
        slide: Slide,
        coords: np.ndarray,
        level: int,
        read_size: int | Sequence[int],
        tile_px: int,
        *,
        on_batch: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        """Features of every tile of ``coords`` (in order) as ``(N, D)`` float32."""
        dataset = self.dataset(slide, coords, level, read_size, tile_px)
        if len(dataset) == 0:
            return np.zeros((0, self.backbone.dim), dtype=np.float32)
        batch_size = self.loader_batch_size(len(dataset))
        if self.num_workers > 0:
            if self._pool is None:
                self._pool = TileLoaderPool(self.num_workers, pin_memory=self.device.type == "cuda")
            loader: Iterable[torch.Tensor] = self._pool.batches(dataset, batch_size)
        else:
            loader = make_tile_loader(dataset, batch_size=batch_size, num_workers=0)
        chunks: list[torch.Tensor] = []
        size = self.out_size(tile_px)
        try:
            for tiles in loader:
                chunks.append(self.encode(tiles, size))
                if on_batch is not None:
                    on_batch(len(tiles))
        except BaseException:
            self.close()  # a worker may be dead or mid-slide: the next slide gets fresh ones
            raise
        feats = torch.cat(chunks).numpy()
        if not np.isfinite(feats).all():
            raise RuntimeError(f"{slide.path}: the encoder produced non-finite features (NaN/inf)")
        return feats
