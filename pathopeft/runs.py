"""Run folders and Lightning trainers shared by ``train`` and ``segment train``.

A run folder ``runs/<name>/`` holds everything needed to understand and reproduce a run:
``config.yaml`` (resolved), ``best.ckpt`` / ``last.ckpt``, ``metrics.csv`` (one row per logged
step/epoch), ``plots/learning_curves.png`` and ``test_metrics.json``. Checkpoints sit at the top of
the folder so ``pathopeft add-task runs/<name>/last.ckpt`` works as documented.
"""

from __future__ import annotations

import inspect
import math
import shutil
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from pathopeft.config import ConfigError
from pathopeft.files import atomic_path

__all__ = [
    "LearningCurves",
    "build_trainer",
    "load_checkpoint",
    "plot_learning_curves",
    "prepare_run_dir",
    "validate_trainer_kwargs",
]

# Keys of the ``trainer:`` section that this module sets itself (the run folder decides them).
_RESERVED_TRAINER_KEYS = {"logger", "callbacks", "default_root_dir", "enable_checkpointing"}


def validate_trainer_kwargs(kwargs: Mapping[str, Any], source: str = "trainer") -> dict[str, Any]:
    """Check a ``trainer:`` section against ``lightning.Trainer``'s own signature.

    The section is passed to Lightning unchanged, so a misspelt key must fail here, with its name,
    rather than deep inside Lightning (or not at all).
    """
    allowed = set(inspect.signature(lightning.Trainer.__init__).parameters) - {"self"}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ConfigError(f"{source}: unknown lightning.Trainer argument(s): {', '.join(unknown)}")
    reserved = sorted(set(kwargs) & _RESERVED_TRAINER_KEYS)
    if reserved:
        raise ConfigError(f"{source}: {', '.join(reserved)} are set by pathopeft from the run folder")
    return dict(kwargs)


def prepare_run_dir(root: str | Path, name: str, *, overwrite: bool = False) -> Path:
    """Create ``root/name``; refuse to mix a new run into a folder that holds a finished one."""
    if not name or Path(name).name != name:
        raise ConfigError(f"run name {name!r} must be a plain folder name")
    run_dir = Path(root) / name
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise ConfigError(
                f"{run_dir} already holds a run; choose another name (--set run.name=...) "
                "or replace it (--set run.overwrite=true)"
            )
        shutil.rmtree(run_dir)
    (run_dir / "plots").mkdir(parents=True, exist_ok=True)
    return run_dir


def build_trainer(
    trainer_kwargs: Mapping[str, Any],
    run_dir: str | Path,
    *,
    monitor: str,
    mode: str = "max",
    callbacks: Sequence[Any] = (),
    enable_checkpointing: bool = True,
) -> lightning.Trainer:
    """A ``lightning.Trainer`` whose logs and checkpoints land in ``run_dir``.

    ``metrics.csv`` comes from Lightning's CSVLogger; ``best.ckpt`` follows ``monitor``;
    ``last.ckpt`` is always written; a learning-curve PNG is redrawn after each validation.
    """
    run_dir = Path(run_dir)
    kwargs = validate_trainer_kwargs(trainer_kwargs)
    # prepare_run_dir already wrote config.yaml and plots/ there on purpose; Lightning's
    # "exists and is not empty" warnings would only alarm users about files it never deletes.
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
    all_callbacks: list[Any] = list(callbacks)
    if enable_checkpointing:
        checkpoint = ModelCheckpoint(
            dirpath=run_dir, filename="best", monitor=monitor, mode=mode, save_last=True, save_top_k=1
        )
        checkpoint.CHECKPOINT_NAME_LAST = "last"
        all_callbacks.append(checkpoint)
    all_callbacks.append(LearningCurves(run_dir))
    logger = CSVLogger(save_dir=str(run_dir), name="", version="")
    return lightning.Trainer(
        **kwargs,
        logger=logger,
        callbacks=all_callbacks,
        default_root_dir=str(run_dir),
        enable_checkpointing=enable_checkpointing,
    )


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a Lightning checkpoint without unpickling arbitrary objects (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: not a loadable checkpoint ({type(exc).__name__}: {exc})") from exc


def plot_learning_curves(metrics_csv: str | Path, out_png: str | Path) -> Path | None:
    """Draw every logged metric against epoch: losses on one panel, each other metric on its own.

    Returns the PNG path, or ``None`` when there is nothing to draw yet.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    metrics_csv = Path(metrics_csv)
    if not metrics_csv.is_file():
        return None
    frame = pd.read_csv(metrics_csv)
    if "epoch" not in frame.columns or frame.empty:
        return None
    columns = [c for c in frame.columns if c not in {"epoch", "step"} and frame[c].notna().any()]
    # learning rates are not curves of quality; test metrics are one point after training
    columns = [c for c in columns if not c.startswith(("lr", "test/", "test_"))]
    if not columns:
        return None
    # One panel per metric, its splits overlaid: train/loss and val/loss share the "loss" panel.
    panels: dict[str, list[str]] = {}
    for column in columns:
        panels.setdefault(column.split("/", 1)[-1], []).append(column)
    n = len(panels)
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), squeeze=False)
    for ax, (title, group) in zip(axes.flat, sorted(panels.items(), key=lambda kv: "loss" not in kv[0])):
        for column in group:
            series = frame[["epoch", column]].dropna().groupby("epoch")[column].mean()
            ax.plot(series.index, series.values, marker="o", markersize=3, label=column)
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return out_png


class LearningCurves(Callback):
    """Redraws ``plots/learning_curves.png`` after validations (throttled) and at the end (rank 0 only)."""

    def __init__(self, run_dir: str | Path, min_interval_s: float = 60.0) -> None:
        self.run_dir = Path(run_dir)
        # Drawing a dozen panels costs seconds; on short epochs redraw at most this often.
        self.min_interval_s = min_interval_s
        self._last_draw = -math.inf

    def _draw(self, trainer: lightning.Trainer, *, force: bool) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking or trainer.logger is None:
            return
        now = time.monotonic()
        if not force and now - self._last_draw < self.min_interval_s:
            return
        self._last_draw = now
        trainer.logger.save()
        plot_learning_curves(self.run_dir / "metrics.csv", self.run_dir / "plots" / "learning_curves.png")

    def on_validation_end(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        self._draw(trainer, force=False)

    def on_train_end(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        self._draw(trainer, force=True)
