"""Devices, processes and precision for the tile command: plain torch on one device, Fabric for many.

One device (the common case, and every quick ``--no-features`` run) needs nothing but a
``torch.device`` and ``torch.autocast``: :class:`Runtime` does that in plain torch. Importing
Lightning Fabric costs seconds (it pulls in torchmetrics, torchvision's model zoo and, through
them, transformers when installed — measured 6.6 s of an 11.6 s one-slide run here), so it is
imported only for multi-device / multi-node runs (:class:`FabricRuntime`, chosen by
:func:`make_runtime`).

Fabric is used for what it is good at — choosing the accelerator, launching one process per device
on one or many nodes (DDP, SLURM/torchrun environments), autocast — and NOT for wrapping the model:
feature extraction is embarrassingly parallel (each rank encodes whole slides on its own), so
there is no gradient to synchronise and no DDP wrapper to pay for. Ranks meet once, at the start
(the run id and the set-up barrier); at the end rank 0 reads the other ranks' rows from their
journals on disk (:mod:`pathopeft.features.manifest`), never through a collective, so a rank that
finishes hours after the others cannot trip a collective timeout.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from pathopeft.config import ConfigError

if TYPE_CHECKING:
    import torch

__all__ = [
    "MAX_AUTO_WORKERS",
    "FabricRuntime",
    "Runtime",
    "auto_workers",
    "make_runtime",
    "resolve_precision",
]

log = logging.getLogger(__name__)

# precisions the plain runtime implements with torch.autocast (anything else goes through Fabric)
_AUTOCAST = {"32-true": None, "32": None, "bf16-mixed": "bfloat16", "16-mixed": "float16"}


# One worker reads ≈ 1,400 tiles/s (benchmarks/RESULTS.md): 8 feed ≈ 11,000 tiles/s, more than one
# GPU encodes; more workers would only cost memory and start-up time.
MAX_AUTO_WORKERS = 8


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask: a batch job's share, not the node's)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def auto_workers(devices_per_node: int = 1, cores: int | None = None) -> int:
    """Tile-reading workers per device when ``features.num_workers`` is null: the usable cores split
    across this node's devices, between 1 and :data:`MAX_AUTO_WORKERS`."""
    cores = usable_cores() if cores is None else int(cores)
    return max(1, min(MAX_AUTO_WORKERS, cores // max(1, int(devices_per_node))))


def resolve_precision(precision: str, accelerator: str) -> str:
    """``auto`` → ``bf16-mixed`` on CUDA with bf16 support, else ``32-true`` (CPU autocast is slow)."""
    if precision != "auto":
        return precision
    import torch

    wants_cuda = accelerator in ("cuda", "gpu") or (accelerator == "auto" and torch.cuda.is_available())
    if wants_cuda and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def make_runtime(
    accelerator: str = "auto",
    devices: int | str = 1,
    num_nodes: int = 1,
    strategy: str = "auto",
    precision: str = "auto",
    *,
    device_needed: bool = True,
) -> Runtime:
    """The plain-torch :class:`Runtime` for one local device, else a :class:`FabricRuntime`.

    Fabric is also used for one device when the process was started by an external launcher
    (``WORLD_SIZE`` > 1: torchrun), for a strategy other than ``auto``, or for a precision that
    is not a plain autocast (``64-true``). ``device_needed=False`` (a ``--no-features`` run on one
    device) sets nothing up, so not even torch is imported.
    """
    plain_settings = (
        str(devices) == "1"
        and int(num_nodes) == 1
        and strategy in ("auto", "single_device")
        and accelerator in ("auto", "cpu", "cuda", "gpu", "mps")
        and int(os.environ.get("WORLD_SIZE", "1") or 1) == 1
    )
    if plain_settings and not device_needed:
        return Runtime(accelerator, precision=precision, device_needed=False)
    resolved = resolve_precision(precision, accelerator)
    if plain_settings and resolved in _AUTOCAST:
        return Runtime(accelerator, precision=resolved)
    return FabricRuntime(accelerator, devices, num_nodes, strategy, resolved)


class Runtime:
    """One process, one device, plain torch: rank 0 of 1, ``torch.autocast`` for mixed precision.

    Bad settings (a CUDA run without a GPU, fp16 autocast on the CPU) are a
    :class:`~pathopeft.config.ConfigError` naming the ``run:`` keys, as Fabric's would be.
    """

    def __init__(
        self,
        accelerator: str = "auto",
        devices: int | str = 1,
        precision: str = "auto",
        *,
        device_needed: bool = True,
    ) -> None:
        self._launched = False
        if str(devices) != "1":
            raise ConfigError(f"run: the single-device runtime got devices={devices!r}; use make_runtime()")
        self._device: torch.device | None = None
        self._dtype: torch.dtype | None = None
        if not device_needed:  # nothing runs on a device: no torch import, no device checks
            self.precision = precision
            return
        import torch

        self.precision = resolve_precision(precision, accelerator)
        self._device = self._pick_device(accelerator)
        if self.precision not in _AUTOCAST:
            raise ConfigError(
                f"run: precision={self.precision!r} needs the Fabric runtime (make_runtime picks it)"
            )
        name = _AUTOCAST[self.precision]
        self._dtype = getattr(torch, name) if name else None
        if self._dtype is torch.float16 and self._device.type == "cpu":
            raise ConfigError(
                "run: cannot set up precision='16-mixed' on the CPU (no fp16 autocast there); "
                "use precision=bf16-mixed or 32-true"
            )

    def _pick_device(self, accelerator: str) -> torch.device:
        import torch

        mps = getattr(torch.backends, "mps", None)
        has_mps = bool(mps is not None and mps.is_available())
        if accelerator == "cpu":
            return torch.device("cpu")
        if accelerator in ("cuda", "gpu") or (accelerator == "auto" and torch.cuda.is_available()):
            if not torch.cuda.is_available():
                raise ConfigError(
                    f"run: cannot set up accelerator={accelerator!r} devices=1: no CUDA GPU is visible "
                    "(torch.cuda.is_available() is false); use --accelerator cpu"
                )
            torch.cuda.set_device(0)
            return torch.device("cuda", 0)
        if accelerator == "mps" or (accelerator == "auto" and has_mps):
            if not has_mps:
                raise ConfigError("run: cannot set up accelerator='mps': MPS is not available here")
            return torch.device("mps")
        if accelerator == "auto":
            return torch.device("cpu")
        raise ConfigError(f"run: cannot set up accelerator={accelerator!r} (auto | cpu | cuda | gpu | mps)")

    def launch(self) -> None:
        """Start the other local ranks (nothing to start for one device)."""
        self._launched = True

    @property
    def rank(self) -> int:
        return 0

    @property
    def world_size(self) -> int:
        return 1

    @property
    def is_zero(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        if self._device is None:  # set up without a device (device_needed=False)
            import torch

            return torch.device("cpu")
        return self._device

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        if self._dtype is None or self._device is None:
            yield
            return
        import torch

        with torch.autocast(device_type=self._device.type, dtype=self._dtype):
            yield

    def barrier(self, name: str | None = None) -> None:
        """No other rank to wait for."""

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (here: ``obj``)."""
        return obj

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order."""
        return [obj]

    def shard(self, items: list[Any]) -> list[Any]:
        """This rank's share: items ``rank::world_size`` (deterministic on every rank)."""
        return items[self.rank :: self.world_size]


class FabricRuntime(Runtime):
    """Several processes (devices / nodes) through Lightning Fabric (imported here only)."""

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
    def device(self) -> torch.device:
        return self.fabric.device

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        with self.fabric.autocast():
            yield

    def barrier(self, name: str | None = None) -> None:
        """Only at the start of a run, when every rank arrives within seconds of the others."""
        if self.world_size > 1:
            self.fabric.barrier(name)

    def broadcast(self, obj: Any) -> Any:
        if self.world_size == 1:
            return obj
        return self.fabric.broadcast(obj, src=0)

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (on every rank). A collective under the process
        group's timeout: the tile pipeline does not use it at the end of a run (journals instead)."""
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out
