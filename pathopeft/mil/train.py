"""``pathopeft train``: the stage entry point — config in, run folder out.

``runs/<name>/`` receives ``config.yaml`` (resolved, with the inferred ``model.in_dim``),
``splits.csv`` (slide_id, label, split actually used), ``best.ckpt`` / ``last.ckpt``,
``metrics.csv``, ``plots/learning_curves.png``, ``test_metrics.json`` and ``predictions/``.

DDP: Lightning relaunches the command for ranks > 0; those processes find the run folder prepared
by rank 0 and write nothing outside Lightning's own (rank-aware) logging and checkpointing, apart
from their own slides' prediction CSVs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from pathopeft.config import dump_config
from pathopeft.config.train import TrainConfig
from pathopeft.files import atomic_write_json, atomic_write_text
from pathopeft.mil.base import Task
from pathopeft.mil.data import MILDataModule
from pathopeft.mil.module import MILModule
from pathopeft.runs import build_trainer, prepare_run_dir

__all__ = ["build_module", "train"]

log = logging.getLogger(__name__)


def build_module(config: TrainConfig, in_dim: int) -> MILModule:
    """The Lightning module for ``config`` with the feature size read from the bags."""
    task = Task(config.data.task, tuple(config.data.classes))
    return MILModule(
        model={"name": config.model.name, "in_dim": in_dim, **config.model.options()},
        tasks=[task.to_dict()],
        optimizer=config.optimizer.model_dump(),
        schedule=config.schedule.model_dump(),
        bppl=config.bppl.model_dump(),
        evaluation=config.evaluation.model_dump(),
        negative_class=config.data.negative_index(),
    )


def train(config: TrainConfig) -> Path:
    """Train, pick the best checkpoint on validation, evaluate it on the test split; return the run folder."""
    lightning.seed_everything(config.seed, workers=True, verbose=False)
    run_dir = Path(config.run.root) / config.run.name
    if rank_zero_only.rank == 0 and not config.run.overwrite and run_dir.is_dir() and any(run_dir.iterdir()):
        prepare_run_dir(config.run.root, config.run.name)  # fails now, not after reading every bag
    data = MILDataModule(config.data, in_dim=config.model.in_dim, seed=config.seed)
    data.prepare()
    assert data.in_dim is not None and data.splits is not None
    if rank_zero_only.rank == 0:
        run_dir = prepare_run_dir(config.run.root, config.run.name, overwrite=config.run.overwrite)
        resolved = config.model_copy(deep=True)
        resolved.model.in_dim = data.in_dim
        dump_config(resolved, run_dir / "config.yaml")
        atomic_write_text(run_dir / "splits.csv", data.splits.to_csv(index=False))
    module = build_module(config, data.in_dim)
    module.predictions_dir = run_dir / "predictions"
    trainer = build_trainer(config.trainer, run_dir, monitor=config.run.monitor, mode=config.run.monitor_mode)
    trainer.fit(module, datamodule=data)
    checkpoint = "best" if (run_dir / "best.ckpt").is_file() else "last"
    trainer.test(module, datamodule=data, ckpt_path=checkpoint, verbose=False)
    if trainer.is_global_zero:
        report: dict[str, Any] = {
            "task": config.data.task,
            "split": data.test_split,
            "n_slides": len(data.split_items(data.test_split)),
            "checkpoint": f"{checkpoint}.ckpt",
            "model": config.model.name,
            **module.test_results,
        }
        atomic_write_json(run_dir / "test_metrics.json", report)
    return run_dir
