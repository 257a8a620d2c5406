"""``pathopeft segment train``: one config → one run folder.

``runs/<name>/`` receives ``config.yaml`` (resolved), ``best.ckpt`` / ``last.ckpt`` (adapter +
decoder only), ``metrics.csv``, ``plots/learning_curves.png``, ``trainable_parameters.json``,
``summary.json`` (best validation scores, timing, trainable share), ``test_metrics.json``
(the best checkpoint on the test split, which no choice was made on) and, in adapter mode,
``adapter/`` (the best adapter alone, ``pathopeft.adapters.save`` format).

Under multi-process DDP the validation and test images are sharded without padding (each image is
scored exactly once) and the per-image scores of all ranks are gathered before averaging, so the
metrics equal a one-device run's.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any

import lightning
from lightning.fabric.utilities.rank_zero import _get_rank
from lightning.pytorch.callbacks import Callback, LearningRateMonitor

from pathopeft.config import dump_config
from pathopeft.config.segment import SegmentTrainConfig
from pathopeft.files import atomic_write_json
from pathopeft.runs import build_trainer, prepare_run_dir
from pathopeft.seg.data import LabelMap, Sample, check_samples, discover_samples, split_samples
from pathopeft.seg.datamodule import SegDataModule
from pathopeft.seg.model import SegmentationModel, build_model, trainable_summary
from pathopeft.seg.module import SegmentationModule

__all__ = [
    "EpochTimer",
    "describe_trainable",
    "evaluate",
    "is_global_zero_env",
    "load_splits",
    "train_segmentation",
]

log = logging.getLogger(__name__)


class EpochTimer(Callback):
    """Wall time of each training epoch's batches (validation excluded)."""

    def __init__(self) -> None:
        self.durations: list[float] = []
        self._start: float | None = None
        self._last: float | None = None

    def on_train_epoch_start(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        self._start, self._last = time.perf_counter(), None

    def on_train_batch_end(self, trainer: lightning.Trainer, *args: Any) -> None:
        self._last = time.perf_counter()

    def on_train_epoch_end(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        if self._start is not None and self._last is not None:
            self.durations.append(self._last - self._start)
        self._start = None

    @property
    def seconds_per_epoch(self) -> float:
        """Median over epochs (the first one carries start-up costs)."""
        return statistics.median(self.durations) if self.durations else float("nan")


def load_splits(cfg: SegmentTrainConfig) -> dict[str, list[Sample]]:
    """Discover, check (every file, before training starts) and split the samples."""
    d = cfg.data
    samples = discover_samples(
        d.root, d.csv, images_dir=d.images_dir, masks_dir=d.masks_dir, mask_suffix=d.mask_suffix
    )
    check_samples(samples, LabelMap(d.num_classes, tuple(d.label_values) if d.label_values else None))
    seed = cfg.seed if d.split_seed is None else d.split_seed
    return split_samples(samples, val_fraction=d.val_fraction, test_fraction=d.test_fraction, seed=seed)


def describe_trainable(summary: dict[str, Any]) -> str:
    return (
        f"trainable parameters: {summary['trainable']:,} of {summary['total']:,} "
        f"({100 * summary['share']:.2f}%; encoder {summary['encoder_trainable']:,}, "
        f"decoder {summary['decoder']:,})"
    )


def is_global_zero_env() -> bool:
    """Rank from the launcher's environment (a DDP child re-runs this command with its rank set)."""
    node = int(os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", "0")))
    return (_get_rank() or 0) == 0 and node == 0


def train_segmentation(
    cfg: SegmentTrainConfig, *, run_test: bool = True, splits: dict[str, list[Sample]] | None = None
) -> dict[str, Any]:
    """Train, keep the best checkpoint by validation Dice, optionally test it; return the summary."""
    lightning.seed_everything(cfg.seed, workers=True, verbose=False)
    # data and model first: a bad file or encoder name must not leave a half-made run folder
    run_dir = Path(cfg.run.root) / cfg.run.name
    if is_global_zero_env() and not cfg.run.overwrite and run_dir.is_dir() and any(run_dir.iterdir()):
        prepare_run_dir(cfg.run.root, cfg.run.name)  # raises its "already holds a run" error now
    splits = splits or load_splits(cfg)
    log.info("data: %s", ", ".join(f"{name} {len(items)} image(s)" for name, items in splits.items()))
    model = build_model(cfg)
    trainable = trainable_summary(model)
    log.info("%s", describe_trainable(trainable))
    if is_global_zero_env():
        run_dir = prepare_run_dir(cfg.run.root, cfg.run.name, overwrite=cfg.run.overwrite)
        dump_config(cfg, run_dir / "config.yaml")
    module = SegmentationModule(model, cfg)
    datamodule = _datamodule(cfg, splits, model)
    timer = EpochTimer()
    trainer = build_trainer(
        cfg.trainer,
        run_dir,
        monitor="val_dice",
        mode="max",
        callbacks=[timer, LearningRateMonitor(logging_interval="epoch")],
    )
    trainer.logger.log_hyperparams(
        {"trainable": trainable["trainable"], "trainable_share": trainable["share"]}
    )
    trainer.fit(module, datamodule=datamodule)
    checkpoint_cb = trainer.checkpoint_callback
    best_path = getattr(checkpoint_cb, "best_model_path", "") or str(run_dir / "last.ckpt")
    best_score = getattr(checkpoint_cb, "best_model_score", None)
    summary: dict[str, Any] = {
        "run_dir": str(run_dir),
        "best_checkpoint": best_path,
        "best_val_dice": float(best_score) if best_score is not None else float("nan"),
        "val": module.results.get("val", {}),
        "trainable": trainable,
        "seconds_per_epoch": timer.seconds_per_epoch,
        "epochs": len(timer.durations),
        "adapter": cfg.adapter.model_dump(mode="json"),
        "lr": cfg.optimizer.lr,
    }
    if trainer.is_global_zero:
        atomic_write_json(run_dir / "trainable_parameters.json", trainable)
    if run_test:
        summary["test"] = evaluate(trainer, module, datamodule, best_path, run_dir)
        if cfg.adapter.mode == "adapter" and trainer.is_global_zero:
            # the best adapter alone, in pathopeft.adapters' PEFT-style folder (usable without
            # pathopeft.seg); trained norms/extras and the decoder live in the checkpoint only
            import pathopeft.adapters as pa

            pa.save(module.model.encoder.model, run_dir / "adapter", name="default")
    if trainer.is_global_zero:
        atomic_write_json(run_dir / "summary.json", summary)
    return summary


def evaluate(
    trainer: lightning.Trainer,
    module: SegmentationModule,
    datamodule: SegDataModule,
    checkpoint: str,
    run_dir: Path,
) -> dict[str, Any]:
    """Test the given checkpoint; write ``test_metrics.json``; return its content."""
    trainer.test(module, datamodule=datamodule, ckpt_path=checkpoint, verbose=False)
    result = dict(module.results.get("test", {}))
    result["checkpoint"] = checkpoint
    if trainer.is_global_zero:
        atomic_write_json(run_dir / "test_metrics.json", result)
    return result


def _datamodule(
    cfg: SegmentTrainConfig, splits: dict[str, list[Sample]], model: SegmentationModel
) -> SegDataModule:
    return SegDataModule(
        cfg.data,
        splits,
        img_size=cfg.model.img_size,
        mean=model.encoder.mean,
        std=model.encoder.std,
        seed=cfg.seed,
    )
