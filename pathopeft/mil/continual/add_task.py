"""``pathopeft add-task CHECKPOINT CONFIG``: add a task to a trained MIL model without retraining it.

The input checkpoint is only read (``torch.load(weights_only=True)``), never written: the new run
folder gets a checkpoint that holds every task. Everything that can be wrong with the request is
checked before a file is written or a step trained: the task name and class names are new, the
model type, feature size and backbone are the checkpoint's, the manifest's bags exist.

After training, every earlier task whose bags are still readable is evaluated again (every mode,
:mod:`pathopeft.mil.continual.evaluation`), and the checkpoint's history records it, so
``pathopeft tasks`` shows how each task fared after each later one.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import lightning
import torch

from pathopeft.config import ConfigError
from pathopeft.config.train import DataConfig, TrainConfig
from pathopeft.files import atomic_path, atomic_write_json
from pathopeft.mil.base import Task
from pathopeft.mil.continual.evaluation import evaluate_task
from pathopeft.mil.continual.router import ROUTER_KEY, TaskRouter
from pathopeft.mil.data import MILDataModule
from pathopeft.mil.module import MILModule
from pathopeft.mil.train import bag_identity, check_run_dir, fit_and_test, module_for, task_provenance
from pathopeft.runs import load_checkpoint

__all__ = ["add_task", "data_config_for", "evaluate_all", "extend_module", "record_history"]

log = logging.getLogger(__name__)


def _read(checkpoint: Path) -> dict[str, Any]:
    try:
        ckpt = load_checkpoint(checkpoint)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    if "hyper_parameters" not in ckpt or "state_dict" not in ckpt or "tasks" not in ckpt["hyper_parameters"]:
        raise ConfigError(f"{checkpoint}: not a pathopeft MIL checkpoint (no hyper_parameters/tasks)")
    return ckpt


def check_request(ckpt: dict[str, Any], checkpoint: Path, config: TrainConfig) -> None:
    """Refuse a task that cannot be added, naming the key (nothing is written yet)."""
    hp = ckpt["hyper_parameters"]
    model_name = hp["model"]["name"]
    if config.model.name != model_name:
        raise ConfigError(
            f"model.name={config.model.name!r}, but {checkpoint} holds a {model_name!r} model; "
            f"a task is added to the checkpoint's model: set model.name={model_name}"
        )
    names = [t["name"] for t in hp["tasks"]]
    if config.data.task in names:
        raise ConfigError(
            f"data.task={config.data.task!r}: {checkpoint} already has a task of that name ({names})"
        )
    Task(config.data.task, tuple(config.data.classes))  # the name rule, with its message
    earlier = {c.lower(): t["name"] for t in hp["tasks"] for c in t["classes"]}
    clash = [f"{c!r} (task {earlier[c.lower()]!r})" for c in config.data.classes if c.lower() in earlier]
    if clash:
        raise ConfigError(
            f"data.classes: {', '.join(clash)} already name classes of earlier tasks; class-incremental "
            "prediction needs every class name once (e.g. prefix them with the organ: liver_tumor)"
        )


def check_features(ckpt: dict[str, Any], checkpoint: Path, data: MILDataModule) -> None:
    hp = ckpt["hyper_parameters"]
    in_dim = int(hp["model"]["in_dim"])
    if data.in_dim != in_dim:
        raise ConfigError(
            f"data.features_dir: the new task's bags have {data.in_dim}-dimensional features but "
            f"{checkpoint} "
            f"was trained on {in_dim}-dimensional ones; tile its slides with the same backbone"
        )
    first = hp["tasks"][0].get("backbone")
    mine = data.features_dir.name if data.features_dir is not None else None
    if first and mine and first != mine and data.cfg.backbone is not None:
        raise ConfigError(
            f"data.backbone={mine!r}, but {checkpoint} was trained on features of {first!r}; "
            "tasks of one model must share the backbone"
        )
    recorded = hp["tasks"][0].get("features_identity") or {}
    current = bag_identity(data.items[0].bag) if data.items else {}
    differs = {k for k in recorded.keys() & current.keys() if recorded[k] != current[k]}
    if differs:
        theirs = ", ".join(f"{k}={recorded[k]!r}" for k in sorted(differs))
        mine = ", ".join(f"{k}={current[k]!r}" for k in sorted(differs))
        raise ConfigError(
            f"data.features_dir: the new task's bags ({data.items[0].bag}) were made with {mine}, but "
            f"{checkpoint} was trained on bags made with {theirs}; tasks of one model must share the "
            "encoder (tile the new slides with the same backbone and weights)"
        )


def data_config_for(record: dict[str, Any], template: DataConfig) -> DataConfig | None:
    """The data section that reads an earlier task's bags again (None when the checkpoint lacks it)."""
    if not record.get("manifest") or not record.get("features_dir"):
        return None
    return template.model_copy(
        update={
            "manifest": list(record["manifest"]),
            "features_dir": record["features_dir"],
            "backbone": record.get("backbone"),
            "coords_dir": record.get("coords_dir"),
            "annotations": record.get("annotations"),
            "classes": list(record["classes"]),
            "task": record["name"],
            "negative_class": record.get("negative_class"),
        }
    )


def _remap(state: dict[str, torch.Tensor], wanted: set[str]) -> dict[str, torch.Tensor]:
    """Old keys → the new module's, where a plain layer became an adapter wrapper (``.base_layer``)."""
    out = {}
    for key, value in state.items():
        if key not in wanted:
            stem, _, leaf = key.rpartition(".")
            wrapped = f"{stem}.base_layer.{leaf}"
            key = wrapped if wrapped in wanted else key
        out[key] = value
    return out


def extend_module(ckpt: dict[str, Any], config: TrainConfig, data: MILDataModule) -> MILModule:
    """The checkpoint's module plus a new head (and adapters) for ``config``'s task, weights loaded."""
    hp = dict(ckpt["hyper_parameters"])
    old = MILModule(**hp)
    old.load_state_dict(ckpt["state_dict"])
    method = config.continual.method
    strategy = config.continual.strategy(config.seed)
    task = {**Task(config.data.task, tuple(config.data.classes)).to_dict(), **task_provenance(config, data)}
    from pathopeft.mil.continual.strategies import create_strategy

    adapters = list(hp.get("adapters") or []) + create_strategy(strategy).adapter_records(
        old, config.data.task
    )
    module = module_for(config, hp["model"], [*hp["tasks"], task], adapters=adapters, strategy=strategy)
    wanted = set(module.state_dict())
    state = {
        k: v for k, v in _remap(ckpt["state_dict"], wanted).items() if k not in ("tau2", "val_threshold")
    }
    result = module.load_state_dict(state, strict=False)
    new_prefixes = [f"model.heads.{config.data.task}."] + [
        f".adapters.{a['name']}." for a in adapters[len(hp.get("adapters") or []) :]
    ]
    missing = [
        k
        for k in result.missing_keys
        if k not in ("tau2", "val_threshold") and not any(p in k for p in new_prefixes)
    ]
    if missing or result.unexpected_keys:
        raise ConfigError(
            f"the checkpoint's weights do not fit its own model (missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]})"
        )
    previous = (hp.get("strategy") or {}).get("name")
    if previous == method:
        module.strategy.state = dict(ckpt.get("pathopeft_strategy", {}))
    module.history = list(ckpt.get("pathopeft_history", []))
    module.router = TaskRouter.from_state(ckpt.get(ROUTER_KEY))
    module.strategy.after_load(module)
    log.info("added task %r with %s: %s", config.data.task, method, trainable_summary(module))
    return module


def trainable_summary(module: MILModule) -> str:
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return f"{trainable:,} of {total:,} parameters train ({100 * trainable / max(total, 1):.2f} %)"


def prepare_earlier(module: MILModule, config: TrainConfig) -> None:
    """Give strategies that keep something of earlier tasks (EWC, replay) what they need."""
    done = set(module.strategy.state.get("tasks_done", []))
    for index, record in enumerate(module.records[:-1]):
        if record["name"] in done:
            continue
        if module.strategy.remembers:
            cfg = data_config_for(record, config.data)
            if cfg is None:
                raise ConfigError(f"task {record['name']!r}: the checkpoint does not say where its bags are")
            earlier = MILDataModule(cfg, in_dim=module.model.in_dim, seed=config.seed, task=index)
            earlier.prepare()
            with _as_task(module, index):
                module.strategy.after_task(module, earlier.train_dataloader(), _train_items(earlier, index))
        done.add(record["name"])
    module.strategy.state["tasks_done"] = sorted(done)


class _as_task:
    """Temporarily make an earlier task the module's training task (EWC's Fisher uses its head)."""

    def __init__(self, module: MILModule, index: int) -> None:
        self.module, self.index = module, index

    def __enter__(self) -> None:
        self.saved = self.module.task
        self.module.task = self.module.model.tasks[self.index]

    def __exit__(self, *exc: Any) -> None:
        self.module.task = self.saved


def replay_datasets(module: MILModule, config: TrainConfig) -> list[Any]:
    """BagDatasets of the replay buffer, one per earlier task (tile labels not needed)."""
    from pathopeft.mil.data import BagDataset, SlideItem

    buffer = module.strategy.state.get("buffer", [])
    by_task: dict[int, list[SlideItem]] = {}
    for b in buffer:
        by_task.setdefault(int(b["task"]), []).append(
            SlideItem(b["slide_id"], int(b["label"]), "train", Path(b["bag"]), int(b["n_tiles"]))
        )
    return [
        BagDataset(items, coords_dir=config.data.coords_dir, task=t) for t, items in sorted(by_task.items())
    ]


def evaluate_all(module: MILModule, config: TrainConfig, current: MILDataModule) -> dict[str, dict[str, Any]]:
    """Every task's test metrics in every mode; tasks whose bags are gone are reported as such."""
    results: dict[str, dict[str, Any]] = {}
    for index, record in enumerate(module.records):
        if index == len(module.records) - 1:
            data = current
        else:
            cfg = data_config_for(record, config.data)
            if cfg is None:
                results[record["name"]] = {"error": "the checkpoint does not record this task's data"}
                continue
            try:
                data = MILDataModule(cfg, in_dim=module.model.in_dim, seed=config.seed, task=index)
                data.prepare()
            except Exception as exc:  # bags moved or deleted: say so, evaluate the rest
                results[record["name"]] = {"error": f"{type(exc).__name__}: {exc}"}
                continue
        results[record["name"]] = evaluate_task(module, record["name"], data.test_dataloader())
    return results


def record_history(module: MILModule, results: dict[str, dict[str, Any]], checkpoints: list[Path]) -> None:
    """Append ``results`` (after the newest task) to the history; write it and the strategy's memory
    into the checkpoints (one atomic rewrite each)."""
    after = module.task.name
    for task, modes in results.items():
        module.history.append({"after": after, "task": task, **_flatten(modes)})
    for path in checkpoints:
        if not path.is_file():
            continue
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        ckpt["pathopeft_history"] = list(module.history)
        ckpt["pathopeft_strategy"] = dict(module.strategy.state)
        with atomic_path(path) as tmp:
            torch.save(ckpt, tmp)


def _train_items(data: MILDataModule, index: int) -> list[dict[str, Any]]:
    """A task's training bags as the plain records the strategies keep (the replay buffer)."""
    return [
        {"task": index, "slide_id": i.slide_id, "label": i.label, "bag": str(i.bag), "n_tiles": i.n_tiles}
        for i in data.split_items("train")
    ]


REPLAY_DIR = "replay"


def _store_buffer(module: MILModule, run_dir: Path) -> None:
    """Copy the replay buffer's bags into ``run_dir/replay/`` and keep them by relative path, so a
    run folder holds everything its next task needs: the earlier tasks' slides and feature folders
    may then be deleted (the point of continual learning), and the folder may move."""
    buffer = module.strategy.state.get("buffer")
    if not buffer:
        return
    folder = run_dir / REPLAY_DIR
    folder.mkdir(exist_ok=True)
    kept = []
    for entry in buffer:
        source = Path(entry["bag"])
        if not source.is_absolute():
            source = run_dir / source
        name = f"task{int(entry['task'])}_{entry['slide_id']}.h5"
        target = folder / name
        if source.resolve() != target.resolve():
            if not source.is_file():
                raise FileNotFoundError(f"replay buffer: bag {source} of slide {entry['slide_id']!r} is gone")
            with atomic_path(target) as tmp:
                shutil.copyfile(source, tmp)
        kept.append(name)
        entry["bag"] = f"{REPLAY_DIR}/{name}"
    for stale in folder.glob("*.h5"):  # bags the reservoir replaced
        if stale.name not in kept:
            stale.unlink()


def _resolve_buffer(module: MILModule, folder: Path) -> None:
    """Buffer paths are relative to the checkpoint's folder (see :func:`_store_buffer`)."""
    for entry in module.strategy.state.get("buffer", []):
        path = Path(entry["bag"])
        if not path.is_absolute():
            entry["bag"] = str((folder / path).resolve())


def _flatten(modes: dict[str, Any]) -> dict[str, Any]:
    if "error" in modes:
        return {"error": modes["error"]}
    return {f"{mode}/{k}": v for mode, metrics in modes.items() for k, v in metrics.items()}


def add_task(checkpoint: str | Path, config: TrainConfig, *, resume: bool = False) -> Path:
    """Add ``config``'s task to the model in ``checkpoint``; returns the new run folder."""
    checkpoint = Path(checkpoint)
    ckpt = _read(checkpoint)
    check_request(ckpt, checkpoint, config)
    if config.continual.method == "joint":
        raise ConfigError(
            "continual.method=joint trains every task at once: use a pipeline (pathopeft train PIPELINE)"
        )
    lightning.seed_everything(config.seed, workers=True, verbose=False)
    run_dir = check_run_dir(config, resume)
    if (run_dir.resolve() / "best.ckpt") == checkpoint.resolve() or (
        run_dir / "last.ckpt"
    ).resolve() == checkpoint.resolve():
        raise ConfigError(f"run.name={config.run.name!r} would write over the input checkpoint {checkpoint}")
    index = len(ckpt["hyper_parameters"]["tasks"])
    data = MILDataModule(config.data, in_dim=None, seed=config.seed, task=index)
    data.prepare()
    check_features(ckpt, checkpoint, data)
    module = extend_module(ckpt, config, data)
    _resolve_buffer(module, checkpoint.parent)
    prepare_earlier(module, config)
    data.extra_train = replay_datasets(module, config)  # empty unless the strategy replays
    report = {"added_to": str(checkpoint.resolve()), "method": config.continual.method,
              "trainable": trainable_summary(module)}  # fmt: skip
    run_dir = fit_and_test(config, module, data, run_dir, resume=resume, report=report)
    finish_task(module, config, data, run_dir)
    return run_dir


def finish_task(module: MILModule, config: TrainConfig, data: MILDataModule, run_dir: Path) -> None:
    """Load the chosen checkpoint, evaluate every task, update the strategy's memory, save both."""
    best = getattr(module, "best_checkpoint", run_dir / "last.ckpt")
    chosen = MILModule.from_checkpoint(best)
    chosen.strategy.state = dict(module.strategy.state)
    results = evaluate_all(chosen, config, data) if config.continual.evaluate_earlier else {}
    if chosen.strategy.remembers:
        items = _train_items(data, len(chosen.records) - 1)
        chosen.strategy.after_task(chosen, data.train_dataloader(), items)
        _store_buffer(chosen, run_dir)
    chosen.strategy.state["tasks_done"] = sorted(
        {*chosen.strategy.state.get("tasks_done", []), chosen.task.name}
    )
    record_history(chosen, results, [run_dir / "best.ckpt", run_dir / "last.ckpt"])
    atomic_write_json(run_dir / "evaluation.json", {"after": chosen.task.name, "results": results})
