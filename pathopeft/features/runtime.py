"""Devices, processes and precision for the tile command, through Lightning Fabric.

Fabric is used for what it is good at — choosing the accelerator, launching one process per device
on one or many nodes (DDP, SLURM/torchrun environments), autocast — and NOT for wrapping the model:
feature extraction is embarrassingly parallel (each rank encodes whole slides on its own), so
there is no gradient to synchronise and no DDP wrapper to pay for. Ranks meet only to gather the
per-slide manifest rows on rank 0.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch

from pathopeft.config import ConfigError

__all__ = ["Runtime", "resolve_precision"]

log = logging.getLogger(__name__)


def resolve_precision(precision: str, accelerator: str) -> str:
    """``auto`` → ``bf16-mixed`` on CUDA with bf16 support, else ``32-true`` (CPU autocast is slow)."""
    if precision != "auto":
        return precision
    wants_cuda = accelerator in ("cuda", "gpu") or (accelerator == "auto" and torch.cuda.is_available())
    if wants_cuda and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


class Runtime:
    """One process's view of the run: rank, world size, device, autocast, collectives."""

    def __init__(
        self,
        accelerator: str = "auto",
        devices: int | str = 1,
        num_nodes: int = 1,
        strategy: str = "auto",
        precision: str = "auto",
    ) -> None:
        from lightning.fabric import Fabric

        self.precision = resolve_precision(precision, accelerator)
        try:
            self.fabric = Fabric(
                accelerator=accelerator,
                devices=devices,
                num_nodes=num_nodes,
                strategy=strategy,
                precision=self.precision,  # type: ignore[arg-type]
            )
        except Exception as exc:  # MisconfigurationException, ValueError: a usage problem
            raise ConfigError(
                f"run: cannot set up accelerator={accelerator!r} devices={devices!r} num_nodes={num_nodes} "
                f"strategy={strategy!r} precision={self.precision!r}: {exc}"
            ) from None
        self._launched = False

    def launch(self) -> None:
        """Start the other local ranks (no-op for one device: nothing is spawned)."""
        if not self._launched:
            if self.fabric.world_size > 1:
                self.fabric.launch()
            self._launched = True

    @property
    def rank(self) -> int:
        return int(self.fabric.global_rank)

    @property
    def world_size(self) -> int:
        return int(self.fabric.world_size)

    @property
    def is_zero(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        return self.fabric.device

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        with self.fabric.autocast():
            yield

    def barrier(self, name: str | None = None) -> None:
        if self.world_size > 1:
            self.fabric.barrier(name)

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (on every rank)."""
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def shard(self, items: list[Any]) -> list[Any]:
        """This rank's share: items ``rank::world_size`` (deterministic on every rank)."""
        return items[self.rank :: self.world_size]
