"""``pathopeft train PIPELINE.yaml``: a task sequence trained with one continual method, evaluated after
every task, with the result matrices a reviewer asks for.

    method: owlora            # owlora | lora | finetune | ewc | replay | joint
    seed: 0
    set: [trainer.max_epochs=20]          # overrides for every task
    run: {name: camelyon_paip, root: runs}
    tasks:
      - {config: configs/camelyon_comel.yaml}
      - {config: configs/paip_liver.yaml, set: [data.task=paip_liver]}

``runs/<name>/`` receives ``task<i>_<task>/`` (ordinary run folders; each checkpoint holds every
task so far), ``pipeline.json`` (progress: a task is complete once its ``evaluation.json`` exists)
and ``results/``: per mode and metric the matrix ``R[t, i]`` (task i after training task t) as CSV
and an annotated PNG, and ``summary.csv`` / ``summary.md`` (ACC, BWT, forgetting, forward
transfer). ``--resume`` skips complete tasks and redoes an interrupted one from its start, with the
same seed, so a resumed pipeline equals an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field

from pathopeft.config import ConfigError, load_config, read_yaml
from pathopeft.config.base import StrictModel
from pathopeft.config.train import TrainConfig
from pathopeft.files import atomic_write_json, atomic_write_text
from pathopeft.mil.continual.evaluation import matrix_keys

__all__ = ["PipelineConfig", "is_pipeline", "run_pipeline", "summarise", "task_costs", "transfer_metrics"]

log = logging.getLogger(__name__)


class PipelineTask(StrictModel):
    config: str = Field(description="a `pathopeft train` config file (relative to the pipeline file)")
    set: list[str] = Field(default_factory=list, description="key=value overrides for this task")


class PipelineRun(StrictModel):
    # Pipeline folder name: <root>/<name>/ holds one run per task and results/.
    name: str = "pipeline"
    # Folder holding pipeline folders.
    root: str = "runs"
    # Replace an existing pipeline folder (--resume continues one instead).
    overwrite: bool = False


class PipelineConfig(StrictModel):
    """A task sequence for continual training (see the module docstring)."""

    # How tasks 2.. are added: owlora, lora, finetune, ewc, replay, or joint (every task at once).
    method: Literal["owlora", "lora", "finetune", "ewc", "replay", "joint"] = "owlora"
    # Seed given to every task (overrides the tasks' own seed).
    seed: int = 0
    set: list[str] = Field(default_factory=list, description="key=value overrides for every task")
    # The task sequence, in training order: each a train config and its overrides.
    tasks: list[PipelineTask] = Field(min_length=1)
    run: PipelineRun = Field(default_factory=PipelineRun)
    forward_transfer: bool = Field(
        False,
        description="also train every task after the first alone, from scratch (reference/), so that "
        "forward transfer FWT = mean over i ≥ 1 of R[i, i] − R_scratch[i] is defined; costs one extra "
        "training per added task",
    )


def is_pipeline(path: str | Path) -> bool:
    """A YAML file with a top-level ``tasks:`` list is a pipeline, anything else a train config."""
    data = read_yaml(path)
    return isinstance(data, dict) and isinstance(data.get("tasks"), list)


def task_configs(pipeline: PipelineConfig, source: Path, out: Path) -> list[TrainConfig]:
    """Every task's resolved train config, all checked before anything is trained."""
    configs = []
    for i, task in enumerate(pipeline.tasks):
        path = Path(task.config)
        path = path if path.is_absolute() or path.is_file() else source.parent / path
        if not path.is_file():
            raise ConfigError(f"{source}: tasks[{i}].config: {task.config} not found")
        sets = [*pipeline.set, *task.set, f"continual.method={pipeline.method}", f"seed={pipeline.seed}",
                f"run.root={out}"]  # fmt: skip
        cfg = load_config(TrainConfig, path, sets)
        cfg.run.name = f"task{i}_{cfg.data.task}"
        configs.append(cfg)
    names = [c.data.task for c in configs]
    if len(set(names)) != len(names):
        raise ConfigError(f"{source}: two tasks share a name (data.task): {names}")
    seen: dict[str, str] = {}
    for cfg in configs:
        for c in cfg.data.classes:
            if c.lower() in seen:
                raise ConfigError(
                    f"{source}: task {cfg.data.task!r} class {c!r} is also a class of task "
                    f"{seen[c.lower()]!r}; "
                    "class names must differ across tasks"
                )
            seen[c.lower()] = cfg.data.task
    return configs


def run_pipeline(path: str | Path, overrides: tuple[str, ...] = (), *, resume: bool = False) -> Path:
    """Train the sequence in ``path``; returns the pipeline's run folder."""
    source = Path(path)
    pipeline = load_config(PipelineConfig, source, overrides)
    out = Path(pipeline.run.root) / pipeline.run.name
    configs = task_configs(pipeline, source, out)
    if out.is_dir() and any(out.iterdir()) and not resume:
        if not pipeline.run.overwrite:
            raise ConfigError(
                f"{out} already holds a pipeline; --resume continues it, run.overwrite=true replaces it"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {"method": pipeline.method, "tasks": [c.data.task for c in configs], "done": []}
    atomic_write_json(out / "pipeline.json", state)
    if pipeline.method == "joint":
        _run_joint(configs, out, resume)
    else:
        _run_sequence(configs, out, state)
        if pipeline.forward_transfer:
            _run_references(configs, out)
    summarise(out)
    return out


def _complete(run_dir: Path) -> bool:
    return (run_dir / "evaluation.json").is_file() and (run_dir / "best.ckpt").is_file()


def _fresh(cfg: TrainConfig) -> TrainConfig:
    """An interrupted task is redone from its start (same seed: the same result as without the stop)."""
    cfg = cfg.model_copy(deep=True)
    cfg.run.overwrite = True
    return cfg


def _run_sequence(configs: list[TrainConfig], out: Path, state: dict[str, Any]) -> None:
    from pathopeft.mil.continual.add_task import add_task

    previous: Path | None = None
    for i, cfg in enumerate(configs):
        run_dir = out / cfg.run.name
        if _complete(run_dir):
            log.info("task %d (%s) is complete: skipped", i, cfg.data.task)
        elif i == 0:
            _train_alone(cfg, run_dir, i)
        else:
            assert previous is not None
            add_task(previous / "best.ckpt", _fresh(cfg))
        previous = run_dir
        state["done"] = [c.data.task for c in configs[: i + 1]]
        atomic_write_json(out / "pipeline.json", state)
        log.info("pipeline: %d/%d tasks done", i + 1, len(configs))


def _train_alone(cfg: TrainConfig, run_dir: Path, index: int) -> None:
    """One task trained from scratch as the first task of a sequence (task 0's code path)."""
    import lightning

    from pathopeft.mil.continual.add_task import finish_task
    from pathopeft.mil.data import MILDataModule
    from pathopeft.mil.train import build_module, fit_and_test

    lightning.seed_everything(cfg.seed, workers=True, verbose=False)
    data = MILDataModule(cfg.data, in_dim=cfg.model.in_dim, seed=cfg.seed, task=0)
    data.prepare()
    assert data.in_dim is not None
    module = build_module(cfg, data.in_dim, data, strategy=cfg.continual.strategy(cfg.seed))
    cfg = _fresh(cfg)
    cfg.run.root, cfg.run.name = str(run_dir.parent), run_dir.name
    fit_and_test(cfg, module, data, run_dir)
    finish_task(module, cfg, data, run_dir)
    log.info("reference %d (%s) trained alone", index, cfg.data.task)


def _run_references(configs: list[TrainConfig], out: Path) -> None:
    """Forward transfer needs each added task's score without the earlier tasks: train it alone."""
    for i, cfg in enumerate(configs[1:], start=1):
        run_dir = out / "reference" / cfg.run.name
        if not _complete(run_dir):
            _train_alone(cfg, run_dir, i)


def _run_joint(configs: list[TrainConfig], out: Path, resume: bool) -> None:
    """Every task at once: the upper bound (one model, every head, every task's training bags)."""
    import lightning

    from pathopeft.mil.base import Task
    from pathopeft.mil.continual.add_task import finish_task
    from pathopeft.mil.data import MILDataModule
    from pathopeft.mil.train import fit_and_test, module_for, task_provenance

    last = configs[-1]
    run_dir = out / "joint"
    if resume and _complete(run_dir):
        return
    lightning.seed_everything(last.seed, workers=True, verbose=False)
    datas = []
    for i, cfg in enumerate(configs):
        data = MILDataModule(cfg.data, in_dim=cfg.model.in_dim, seed=cfg.seed, task=i)
        data.prepare()
        datas.append(data)
    dims = {d.in_dim for d in datas}
    if len(dims) != 1:
        raise ConfigError(f"joint training needs one feature size across tasks, got {sorted(dims)}")
    current = datas[-1]
    current.extra_train = [d._dataset("train", train=True) for d in datas[:-1]]
    tasks = [
        {**Task(c.data.task, tuple(c.data.classes)).to_dict(), **task_provenance(c, d)}
        for c, d in zip(configs, datas)
    ]
    model = {"name": last.model.name, "in_dim": current.in_dim, **last.model.options()}
    module = module_for(last, model, tasks, strategy={"name": "joint"})
    cfg = _fresh(last)
    cfg.run.name = "joint"
    fit_and_test(cfg, module, current, run_dir)
    finish_task(module, cfg, current, run_dir)


def _matrices(out: Path) -> tuple[list[str], dict[tuple[str, str], np.ndarray], list[str]]:
    state = json.loads((out / "pipeline.json").read_text())
    names: list[str] = state["tasks"]
    folders = (
        [out / "joint"] if state["method"] == "joint" else [out / f"task{i}_{n}" for i, n in enumerate(names)]
    )
    rows = len(folders)
    mats = {key: np.full((rows, len(names)), np.nan) for key in matrix_keys()}
    after = []
    for t, folder in enumerate(folders):
        if not (folder / "evaluation.json").is_file():
            continue
        evaluation = json.loads((folder / "evaluation.json").read_text())
        after.append(evaluation["after"])
        for i, name in enumerate(names):
            result = evaluation["results"].get(name)
            if not result or "error" in result:
                continue
            for m, k in mats:
                mats[(m, k)][t, i] = result.get(m, {}).get(k, np.nan)
    return names, mats, after


def transfer_metrics(r: np.ndarray, scratch: np.ndarray | None = None) -> dict[str, float]:
    """ACC, BWT, forgetting and forward transfer of a square result matrix R[t, i] (NaN where undefined).

    ``scratch[i]`` is task i's score when trained alone from scratch (NaN for task 0 or when not
    measured): FWT = mean over i ≥ 1 of R[i, i] − scratch[i], how much the earlier tasks helped (> 0)
    or hindered (< 0) learning task i. With per-task heads the "R[i−1, i] − random" form of FWT is
    undefined (task i has no head before it is trained), hence the from-scratch reference.
    """
    t = r.shape[0] - 1
    final = r[t]
    acc = float(np.nanmean(final)) if np.isfinite(final).any() else float("nan")
    out = {"ACC": acc, "BWT": float("nan"), "forgetting": float("nan"), "FWT": float("nan")}
    if r.shape[0] != r.shape[1] or t == 0:
        return out
    bwt = [r[t, i] - r[i, i] for i in range(t)]
    forget = [np.nanmax(r[i:t, i]) - r[t, i] for i in range(t)]
    out.update(BWT=float(np.nanmean(bwt)), forgetting=float(np.nanmean(forget)))
    if scratch is not None:
        fwt = [r[i, i] - scratch[i] for i in range(1, r.shape[0]) if np.isfinite(scratch[i])]
        if fwt and np.isfinite(fwt).any():
            out["FWT"] = float(np.nanmean(fwt))
    return out


def _scratch(out: Path, names: list[str]) -> dict[tuple[str, str], np.ndarray]:
    """Per mode and metric, each task's from-scratch score (reference/ runs; NaN where absent)."""
    refs = {key: np.full(len(names), np.nan) for key in matrix_keys()}
    for i, name in enumerate(names):
        path = out / "reference" / f"task{i}_{name}" / "evaluation.json"
        if not path.is_file():
            continue
        result = json.loads(path.read_text())["results"].get(name)
        if not result or "error" in result:
            continue
        for m, k in refs:
            refs[(m, k)][i] = result.get(m, {}).get(k, np.nan)
    return refs


def task_costs(out: str | Path) -> pd.DataFrame:
    """Per trained task: training seconds, trainable parameters and checkpoint size (the cost of
    adding a task, against retraining everything in ``joint``)."""
    out = Path(out)
    rows = []
    for folder in sorted([*out.glob("task*_*"), *out.glob("joint"), *out.glob("reference/task*_*")]):
        path = folder / "test_metrics.json"
        if not path.is_file():
            continue
        test = json.loads(path.read_text())
        ckpt = folder / "best.ckpt"
        rows.append(
            {
                "run": str(folder.relative_to(out)),
                "fit_seconds": test.get("fit_seconds", float("nan")),
                "trainable": test.get("trainable", ""),
                "checkpoint_mb": ckpt.stat().st_size / 2**20 if ckpt.is_file() else float("nan"),
            }
        )
    return pd.DataFrame(rows, columns=["run", "fit_seconds", "trainable", "checkpoint_mb"])


def summarise(out: str | Path) -> pd.DataFrame:
    """Write results/ (matrices as CSV + PNG, summary.csv/.md); returns the summary table."""
    out = Path(out)
    names, mats, _ = _matrices(out)
    refs = _scratch(out, names)
    method = json.loads((out / "pipeline.json").read_text())["method"]
    results = out / "results"
    results.mkdir(exist_ok=True)
    rows = []
    for (mode, metric), r in mats.items():
        index = ["joint"] if method == "joint" else [f"after {n}" for n in names]
        frame = pd.DataFrame(r, index=index, columns=names)
        atomic_write_text(results / f"{mode}_{metric}.csv", frame.to_csv(float_format="%.4f"))
        _plot_matrix(
            frame, f"{method}: {metric} ({mode.replace('_', '-')})", results / f"{mode}_{metric}.png"
        )
        transfer = transfer_metrics(r, refs[(mode, metric)])
        rows.append({"method": method, "mode": mode, "metric": metric, **transfer})
    summary = pd.DataFrame(rows)
    atomic_write_text(results / "summary.csv", summary.to_csv(index=False, float_format="%.4f"))
    lines = [f"# {out.name}: {method}, tasks {' → '.join(names)}", "",
             "| mode | metric | ACC | BWT | forgetting | FWT |", "|---|---|---:|---:|---:|---:|"]  # fmt: skip
    for row in rows:
        lines.append(
            f"| {row['mode']} | {row['metric']} | {row['ACC']:.3f} | {row['BWT']:.3f} "
            f"| {row['forgetting']:.3f} | {row['FWT']:.3f} |"
        )
    lines += ["", "ACC: mean over tasks after the last one; BWT: mean of R[T,i] − R[i,i] over earlier tasks; "
              "forgetting: mean over earlier tasks of the largest drop from an earlier "
              "evaluation; FWT: mean over added tasks of R[i,i] − the task trained alone (NaN unless the "
              "pipeline sets forward_transfer: true)."]  # fmt: skip
    costs = task_costs(out)
    atomic_write_text(results / "task_costs.csv", costs.to_csv(index=False, float_format="%.3f"))
    lines += ["", "| run | training s | trainable | checkpoint MB |", "|---|---:|---|---:|"]
    for c in costs.itertuples():
        lines.append(f"| {c.run} | {c.fit_seconds:.1f} | {c.trainable} | {c.checkpoint_mb:.2f} |")
    atomic_write_text(results / "summary.md", "\n".join(lines) + "\n")
    return summary


def _plot_matrix(frame: pd.DataFrame, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pathopeft.files import atomic_path

    fig, ax = plt.subplots(figsize=(1.4 + 1.1 * frame.shape[1], 1.0 + 0.7 * frame.shape[0]))
    ax.imshow(frame.to_numpy(dtype=float), vmin=0, vmax=1, cmap="viridis")
    for (y, x), v in np.ndenumerate(frame.to_numpy(dtype=float)):
        if np.isfinite(v):
            ax.text(x, y, f"{v:.2f}", ha="center", va="center", color="white" if v < 0.6 else "black")
    ax.set_xticks(range(frame.shape[1]), frame.columns, rotation=30, ha="right")
    ax.set_yticks(range(frame.shape[0]), frame.index)
    ax.set_xlabel("evaluated task")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
