"""``pathopeft train``: the stage entry point — config in, run folder out.

``runs/<name>/`` receives ``config.yaml`` (resolved, with the inferred ``model.in_dim``),
``splits.csv`` (slide_id, case_id, label, split actually used), ``best.ckpt`` / ``last.ckpt``,
``metrics.csv``, ``plots/learning_curves.png``, ``test_metrics.json`` and ``predictions/``.

DDP: Lightning relaunches the command for ranks > 0; those processes find the run folder prepared
by rank 0 and write nothing outside Lightning's own (rank-aware) logging and checkpointing, apart
from their own slides' prediction CSVs.
"""

from __future__ import annotations

import logging
import time
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

__all__ = ["bag_identity", "build_module", "module_for", "task_provenance", "train"]

log = logging.getLogger(__name__)


def task_provenance(config: TrainConfig, data: MILDataModule | None = None) -> dict[str, Any]:
    """What a checkpoint records of a task's data (plain types): where to find it again, and which
    features it was trained on (a later task must use the same backbone and feature size)."""
    features = data.features_dir if data is not None and data.features_dir is not None else None
    return {
        "negative_class": config.data.negative_index(),
        "manifest": [str(Path(m).resolve()) for m in config.data.manifest],
        "features_dir": str(Path(config.data.features_dir).resolve()),
        "backbone": features.name if features is not None else config.data.backbone,
        "coords_dir": None if config.data.coords_dir is None else str(Path(config.data.coords_dir).resolve()),
        "annotations": None
        if config.data.annotations is None
        else str(Path(config.data.annotations).resolve()),
        "in_dim": data.in_dim if data is not None else config.model.in_dim,
        "features_identity": bag_identity(data.items[0].bag) if data is not None and data.items else {},
    }


def bag_identity(path: str | Path) -> dict[str, str]:
    """Which encoder made a bag, from the attributes ``pathopeft tile`` writes (backbone name and
    the resolved weights tag); empty for bags from elsewhere. Folder names can be anything, so a
    later task's bags are compared by this, not by their folder's name."""
    import h5py

    try:
        with h5py.File(path, "r") as h5:
            values = {key: h5.attrs.get(key) for key in ("backbone", "weights")}
    except OSError:
        return {}
    return {k: (v.decode() if isinstance(v, bytes) else str(v)) for k, v in values.items() if v is not None}


def module_for(
    config: TrainConfig,
    model: dict[str, Any],
    tasks: list[dict[str, Any]],
    *,
    adapters: list[dict[str, Any]] | None = None,
    strategy: dict[str, Any] | None = None,
) -> MILModule:
    """A Lightning module with ``config``'s optimisation, BPPL and evaluation settings: the one
    construction behind a first task (:func:`build_module`), an added task and joint training."""
    return MILModule(
        model=model,
        tasks=tasks,
        optimizer=config.optimizer.model_dump(),
        schedule=config.schedule.model_dump(),
        bppl=config.bppl.effective(),
        evaluation=config.evaluation.model_dump(),
        negative_class=config.data.negative_index(),
        adapters=adapters,
        strategy=strategy,
    )


def build_module(
    config: TrainConfig,
    in_dim: int,
    data: MILDataModule | None = None,
    strategy: dict[str, Any] | None = None,
) -> MILModule:
    """The Lightning module for ``config`` with the feature size read from the bags."""
    task = Task(config.data.task, tuple(config.data.classes))
    model = {"name": config.model.name, "in_dim": in_dim, **config.model.options()}
    return module_for(config, model, [{**task.to_dict(), **task_provenance(config, data)}], strategy=strategy)


def train(config: TrainConfig, *, resume: bool = False) -> Path:
    """Train, pick the best checkpoint on validation, evaluate it on the test split; return the run folder.

    ``resume`` continues an interrupted run in the same folder from its ``last.ckpt`` (a finished
    run, one with ``test_metrics.json``, is left as it is).
    """
    lightning.seed_everything(config.seed, workers=True, verbose=False)
    run_dir = check_run_dir(config, resume)
    data = MILDataModule(config.data, in_dim=config.model.in_dim, seed=config.seed)
    data.prepare()
    assert data.in_dim is not None
    module = build_module(config, data.in_dim, data)
    return fit_and_test(config, module, data, run_dir, resume=resume)


def check_run_dir(config: TrainConfig, resume: bool) -> Path:
    """Fail before any bag is read when the run folder holds another run (and resuming is not asked)."""
    run_dir = Path(config.run.root) / config.run.name
    busy = run_dir.is_dir() and any(run_dir.iterdir())
    if rank_zero_only.rank == 0 and busy and not config.run.overwrite and not resume:
        prepare_run_dir(config.run.root, config.run.name)  # raises the "already holds a run" error
    return run_dir


def fit_and_test(
    config: TrainConfig,
    module: MILModule,
    data: MILDataModule,
    run_dir: Path,
    *,
    resume: bool = False,
    report: dict[str, Any] | None = None,
) -> Path:
    """The shared tail of ``train`` and ``add-task``: run folder, fit, test on the best checkpoint."""
    assert data.splits is not None
    last = run_dir / "last.ckpt"
    resuming = resume and last.is_file()
    if resume and (run_dir / "test_metrics.json").is_file():
        log.info("%s is complete; nothing to resume", run_dir)
        return run_dir
    if rank_zero_only.rank == 0:
        if not resuming:
            run_dir = prepare_run_dir(
                config.run.root, config.run.name, overwrite=config.run.overwrite or resume
            )
        resolved = config.model_copy(deep=True)
        resolved.model.in_dim = data.in_dim
        dump_config(resolved, run_dir / "config.yaml")
        atomic_write_text(run_dir / "splits.csv", data.splits.to_csv(index=False))
    module.predictions_dir = run_dir / "predictions"
    trainer = build_trainer(config.trainer, run_dir, monitor=config.run.monitor, mode=config.run.monitor_mode)
    started = time.perf_counter()
    trainer.fit(module, datamodule=data, ckpt_path=str(last) if resuming else None)
    fit_seconds = time.perf_counter() - started
    checkpoint = "best" if (run_dir / "best.ckpt").is_file() else "last"
    trainer.test(module, datamodule=data, ckpt_path=checkpoint, verbose=False)
    module.best_checkpoint = run_dir / f"{checkpoint}.ckpt"
    if trainer.is_global_zero:
        _fit_router(module, data, run_dir)
        summary: dict[str, Any] = {
            "task": config.data.task,
            "split": data.test_split,
            "n_slides": len(data.split_items(data.test_split)),
            "checkpoint": f"{checkpoint}.ckpt",
            "model": config.model.name,
            "fit_seconds": round(fit_seconds, 2),
            **(report or {}),
            **module.test_results,
        }
        atomic_write_json(run_dir / "test_metrics.json", summary)
    return run_dir


def _fit_router(module: MILModule, data: MILDataModule, run_dir: Path) -> None:
    """Fit the task router on the new task's training bags (every task's, for joint training) and
    store it in the run's checkpoints, so the model can be asked without a task id."""
    from pathopeft.mil.continual.router import fit_router, write_router

    names = [r["name"] for r in module.records]
    default = len(names) - 1 if data.task is None else data.task
    fitted = fit_router(
        module.router, names, [data._dataset("train", train=False), *data.extra_train], default
    )
    if fitted:
        write_router(module.router, [run_dir / "best.ckpt", run_dir / "last.ckpt"])
