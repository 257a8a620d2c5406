"""Tile loading for feature extraction: the hot path between the slide file and the model.

Two resizes, as a tile encoder's own eval transform expects:

1. the region read off the pyramid (``read_size`` px at ``level``) covers one tile of ``tile_px``
   px at the target µm/px; when the pyramid has no level at exactly that scale it is brought to
   ``tile_px`` in the worker (OpenCV: area-average by the integer part of the factor, then the
   model's interpolation for the rest);
2. ``tile_px`` → the model's input size (``FeatureConfig.resize_to``: 256 → 224 for most
   pathology encoders), with torch's anti-aliased bicubic/bilinear ``interpolate`` — what timm's
   PIL-based eval transform computes — on whole batches: on the GPU for a GPU run (free there),
   in the workers for a CPU run.

Design, for throughput:

* the dataset yields whole batches (``__getitems__``): one ``(B, H, W, 3)`` tensor per batch, no
  per-tile tensors and no default-collate overhead;
* workers ship uint8 (4× smaller than float32) across the process (and PCIe) boundary. GPU runs:
  workers only read + decode (+ step 1 when needed); step 2 and the normalisation run on the
  device (:class:`Preprocess`). CPU runs: workers also do step 2 (it is CPU work either way); the
  main process normalises (a fast NumPy kernel; shipping float32 from the workers instead was
  measured slower: the 4× larger batches cost more to pass than the normalisation itself);
* the :class:`~pathopeft.wsi.slide.Slide` is pickled into each worker without its file handle and
  reopens lazily there;
* workers start from a ``forkserver`` (``spawn`` where there is none), never by forking the main
  process: by then the main process has run OpenCV (tissue masks) and OpenSlide, whose thread
  pools do not survive ``fork`` (a forked worker calling into OpenCV's pthreads pool hangs
  forever — observed here). The server preloads this module, so a worker costs a fork of a clean
  process, not a fresh interpreter;
* a cohort keeps ONE set of workers (:class:`TileLoaderPool`): starting workers costs about as
  much as reading a 300-tile biopsy (0.5–0.7 s measured here, per slide), so per-slide loaders
  would spend most of a cohort of small slides starting processes. Each batch sent to the pool
  carries its slide (pickled without file handles, a few KB); a worker keeps the current slide
  open until a batch of the next slide arrives.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import logging
import multiprocessing as mp
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.context import BaseContext

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, get_worker_info

from pathopeft.wsi.slide import Slide

log = logging.getLogger(__name__)

__all__ = [
    "Preprocess",
    "TileDataset",
    "TileLoaderPool",
    "collate_tiles",
    "make_tile_loader",
    "normalize_nhwc",
    "resize_batch",
    "worker_context",
]

_CV2_INTERP = {
    "nearest": cv2.INTER_NEAREST,
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "lanczos": cv2.INTER_LANCZOS4,
}


def _size2(value: int | Sequence[int]) -> tuple[int, int]:
    """``(w, h)`` from an int or a pair."""
    if isinstance(value, (int, np.integer)):
        return int(value), int(value)
    w, h = (int(v) for v in value)
    return w, h


def _torch_mode(interpolation: str) -> str:
    """torch's anti-aliased modes are bicubic and bilinear; anything else maps to bicubic."""
    return interpolation if interpolation in ("bicubic", "bilinear") else "bicubic"


def resize_batch(x: torch.Tensor, size: tuple[int, int], interpolation: str = "bicubic") -> torch.Tensor:
    """``(B, 3, H, W)`` → ``(B, 3, h, w)`` (``size`` = ``(w, h)``), anti-aliased like PIL / timm.

    uint8 input stays uint8 (torch's fast CPU kernel wants channels-last memory, which the NHWC
    batches are); float input stays float.
    """
    w, h = size
    if tuple(x.shape[-2:]) == (h, w):
        return x
    out = F.interpolate(x, size=(h, w), mode=_torch_mode(interpolation), antialias=True, align_corners=False)
    return out


class TileDataset(Dataset):
    """The tiles of one slide's grid, batched.

    ``coords`` are level-0 top-left corners; ``read_size`` the region read at ``level`` (an int or
    ``(w, h)``); ``tile_size`` the tile in pixels at the target µm/px. ``input_size`` (optional)
    also resizes each batch to the model's input in the worker. Batches are ``(B, H, W, 3)``
    uint8 tensors.
    """

    def __init__(
        self,
        slide: Slide,
        coords: np.ndarray,
        level: int,
        read_size: int | Sequence[int],
        tile_size: int | Sequence[int],
        *,
        interpolation: str = "bicubic",
        input_size: int | Sequence[int] | None = None,
    ) -> None:
        self.slide = slide
        self.coords = np.ascontiguousarray(np.asarray(coords, dtype=np.int64).reshape(-1, 2))
        self.level = int(level)
        self.read_size = _size2(read_size)
        self.tile_size = _size2(tile_size)
        self.input_size = None if input_size is None else _size2(input_size)
        self.interpolation = interpolation
        self._interp = _CV2_INTERP.get(interpolation, cv2.INTER_CUBIC)

    def __len__(self) -> int:
        return len(self.coords)

    def subset(self, start: int, stop: int) -> TileDataset:
        """The tiles ``start:stop`` (same slide object, sliced coordinates)."""
        part = copy.copy(self)
        part.coords = self.coords[start:stop]
        return part

    def read_tile(self, index: int, out: np.ndarray) -> None:
        """Read tile ``index`` into ``out`` (``tile_size``, uint8 RGB)."""
        x, y = self.coords[index]
        region = self.slide.read_region((int(x), int(y)), self.level, self.read_size)
        if region.shape[:2] != out.shape[:2]:
            self._to_tile(region, out)
        else:
            out[...] = region

    def _to_tile(self, region: np.ndarray, out: np.ndarray) -> None:
        """Area-average by an integer factor first (anti-aliased, fast), then the model's interpolation.

        OpenCV's ``INTER_AREA`` is fast only for integer factors and a plain bicubic aliases when
        shrinking by 2× or more.
        """
        oh, ow = out.shape[:2]
        h, w = region.shape[:2]
        k = min(w // ow, h // oh)
        if k >= 2:
            region = cv2.resize(region, (w // k, h // k), interpolation=cv2.INTER_AREA)
            if region.shape[:2] == (oh, ow):
                out[...] = region
                return
        cv2.resize(region, (ow, oh), dst=out, interpolation=self._interp)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> torch.Tensor:
        """A whole batch in one tensor (the DataLoader's batched fetcher calls this)."""
        shape = (len(indices), self.tile_size[1], self.tile_size[0], 3)
        tiles = torch.empty(shape, dtype=torch.uint8)
        if get_worker_info() is not None and self.input_size in (None, self.tile_size):
            tiles.share_memory_()  # filled in place: passing it to the main process then copies nothing
        batch = tiles.numpy()
        for row, index in enumerate(indices):
            self.read_tile(int(index), batch[row])
        if self.input_size is not None and self.input_size != self.tile_size:
            tiles = resize_batch(tiles.permute(0, 3, 1, 2), self.input_size, self.interpolation)
            tiles = tiles.permute(0, 2, 3, 1).contiguous()  # NHWC (channels-last memory: no copy)
        return tiles


def _affine(mean: Sequence[float], std: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel ``scale, shift`` so that ``x * scale + shift == (x / 255 - mean) / std``."""
    scale = np.asarray([1.0 / (255.0 * float(v)) for v in std], np.float32)
    shift = np.asarray([-float(m) / float(v) for m, v in zip(mean, std)], np.float32)
    return scale, shift


def normalize_nhwc(batch: np.ndarray, scale: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """uint8 ``(..., W, 3)`` → float32 ``x * scale + shift`` per channel, in two in-place passes.

    The per-channel constants are tiled along whole image rows: broadcasting a length-3 last axis
    makes NumPy's (and torch's) inner loop 3 elements long, about 4× slower on the CPU.
    """
    out = np.ascontiguousarray(batch).astype(np.float32)
    width = out.shape[-2] * out.shape[-1]
    rows = out.reshape(-1, width)
    rows *= np.tile(scale, width // 3)
    rows += np.tile(shift, width // 3)
    return out


def collate_tiles(batch: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    """The dataset already returns whole batches; single items (no ``__getitems__``) are stacked."""
    if isinstance(batch, list):
        return torch.stack(batch)
    return batch


def _worker_init(worker_id: int) -> None:
    """One cv2/torch thread per worker: the workers are the parallelism; nested threads only thrash.

    Safe here because workers come from a forkserver/spawn (see the module docstring); calling
    this in a worker forked from a process that already used OpenCV's thread pool deadlocks.
    """
    cv2.setNumThreads(1)
    torch.set_num_threads(1)


def worker_context() -> BaseContext:
    """``forkserver`` preloading this module (clean, cheap workers), else ``spawn``."""
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])  # no effect once the server runs; harmless
        return ctx
    return mp.get_context("spawn")


def make_tile_loader(
    dataset: TileDataset, *, batch_size: int = 64, num_workers: int = 2, pin_memory: bool = False
) -> DataLoader:
    """Batched, in-order loader (order = grid order, so bags line up with coords)."""
    return DataLoader(
        dataset,
        batch_size=max(1, int(batch_size)),
        shuffle=False,
        num_workers=max(0, int(num_workers)),
        collate_fn=collate_tiles,
        pin_memory=pin_memory,
        worker_init_fn=_worker_init if num_workers > 0 else None,
        multiprocessing_context=worker_context() if num_workers > 0 else None,
        prefetch_factor=4 if num_workers > 0 else None,
        persistent_workers=False,
    )


@dataclass(frozen=True)
class _SlideBatch:
    """One batch sent to a pool worker: the tiles to read, tagged with the slide's run-local token."""

    token: int
    part: TileDataset


class _PooledTiles(Dataset):
    """The dataset a pool worker holds: reads whatever batch it is sent, keeping one slide open.

    Every batch arrives with a fresh (unpickled, not yet opened) copy of its slide; the first batch
    of a slide becomes the worker's open slide, later batches of the same token reuse it (its file
    handle and decoded-tile cache), and the next slide's first batch closes it.
    """

    def __init__(self) -> None:
        self._token: int | None = None
        self._slide: Slide | None = None

    def __getitems__(self, batch: _SlideBatch) -> torch.Tensor:
        part = batch.part
        if batch.token != self._token:
            if self._slide is not None:
                self._slide.close()
            self._token, self._slide = batch.token, part.slide
        else:
            part.slide = self._slide
        return part.__getitems__(range(len(part)))


class _BatchPlan:
    """The pool loader's batch sampler: the current slide's batches (replaced per slide)."""

    def __init__(self) -> None:
        self.batches: list[_SlideBatch] = []

    def __iter__(self) -> Iterator[_SlideBatch]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class TileLoaderPool:
    """Tile-reading worker processes kept alive across slides (see the module docstring).

    ``pool.batches(dataset, batch_size)`` returns an iterable of the slide's ``(B, H, W, 3)`` uint8
    batches in grid order, read by the same workers as the previous slide's. Consume it fully
    before the next call; after an error, :meth:`close` the pool (a worker may be gone) and make a
    new one. Workers start on the first slide and stop at :meth:`close` (or garbage collection).
    """

    def __init__(self, num_workers: int, *, pin_memory: bool = False, prefetch_factor: int = 4) -> None:
        if num_workers < 1:
            raise ValueError("TileLoaderPool needs at least one worker (read in-process otherwise)")
        self.num_workers = int(num_workers)
        self._plan = _BatchPlan()
        self._token = 0
        self._loader: DataLoader | None = DataLoader(
            _PooledTiles(),
            batch_sampler=self._plan,
            num_workers=self.num_workers,
            collate_fn=collate_tiles,
            pin_memory=pin_memory,
            worker_init_fn=_worker_init,
            multiprocessing_context=worker_context(),
            prefetch_factor=prefetch_factor,
            persistent_workers=True,
        )

    def batches(self, dataset: TileDataset, batch_size: int) -> DataLoader:
        if self._loader is None:
            raise RuntimeError("the tile loader pool is closed")
        self._token += 1
        size = max(1, int(batch_size))
        self._plan.batches = [
            _SlideBatch(self._token, dataset.subset(i, i + size)) for i in range(0, len(dataset), size)
        ]
        return self._loader

    @property
    def worker_pids(self) -> list[int]:
        """PIDs of the live workers (empty before the first slide and after :meth:`close`)."""
        return [int(w.pid) for w in _loader_workers(self._loader) if getattr(w, "pid", None) is not None]

    def close(self) -> None:
        """Stop the workers now (idempotent).

        DataLoader has no public way to stop persistent workers before garbage collection, so this
        uses its private ``_iterator`` / ``_iterator._shutdown_workers()`` / ``._workers`` (see
        :data:`TESTED_TORCH`). Where a torch release renames them it falls back: terminate the
        worker processes it can find, then drop the iterator and collect it (its ``__del__`` stops
        the workers in every torch release so far) — never an ``AttributeError`` from ``close``.
        """
        loader, self._loader = self._loader, None
        self._plan.batches = []
        if loader is None:
            return
        it = getattr(loader, "_iterator", None)
        shutdown = getattr(it, "_shutdown_workers", None)
        if callable(shutdown):
            shutdown()  # what the iterator's __del__ does; done now, not at GC time
        else:
            if it is not None:
                log.debug("DataLoader internals changed (no _shutdown_workers): terminating workers")
            for worker in _loader_workers(loader):
                with contextlib.suppress(Exception):
                    worker.terminate()
                    worker.join(timeout=5)
        with contextlib.suppress(Exception):
            loader._iterator = None  # type: ignore[attr-defined]
        del it, loader
        gc.collect()


# DataLoader internals TileLoaderPool relies on (private API, unchanged since persistent workers
# came in torch 1.7): checked on torch 2.14.1, the top of the range pyproject.toml allows
# (torch>=2.4,<2.15, capped there partly for this). The fallbacks in close() cover a release that
# renames them; tests/test_features_loading.py checks both paths.
TESTED_TORCH = "2.14.1"


def _loader_workers(loader: DataLoader | None) -> list:
    """The worker processes of a loader's live iterator, or [] (no iterator, or internals renamed)."""
    it = getattr(loader, "_iterator", None)
    workers = getattr(it, "_workers", None)
    return list(workers) if isinstance(workers, (list, tuple)) else []


class Preprocess(nn.Module):
    """A batch as the model wants it: ``(B, H, W, 3)`` → float ``(B, 3, h, w)``, normalised.

    The uint8 batch is resized to ``size`` (``(w, h)``, anti-aliased, when it differs) and
    normalised — on the GPU for GPU runs. The result is channels-last strided, which
    convolutions and patch embeddings take as is (the fast layout for CNNs on GPU); no
    transposing copy is made.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], interpolation: str = "bicubic") -> None:
        super().__init__()
        scale, shift = _affine(mean, std)
        self._np = (scale, shift)
        self.interpolation = interpolation
        self.register_buffer("scale", torch.from_numpy(scale).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", torch.from_numpy(shift).view(1, 3, 1, 1), persistent=False)

    def forward(self, tiles: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        resize = size is not None and tuple(size) != (tiles.shape[2], tiles.shape[1])
        if tiles.device.type == "cpu" and not resize:
            # row-tiled NumPy kernel: ~4× faster than broadcasting over a length-3 axis on the CPU
            return torch.from_numpy(normalize_nhwc(tiles.numpy(), *self._np)).permute(0, 3, 1, 2)
        x = tiles.permute(0, 3, 1, 2).to(torch.float32)
        if resize:
            assert size is not None
            x = resize_batch(x, size, self.interpolation).clamp_(0.0, 255.0)  # as uint8 would
        return torch.addcmul(self.shift, x, self.scale)
