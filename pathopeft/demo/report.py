"""The demo's summary: read what the commands wrote, build the task result matrix, print a table.

Every number comes from a file a command wrote (``runs/<task>/test_metrics.json`` when a task was
trained, ``runs/<last task>/evaluation.json`` after the last one, ``runs/segment/test_metrics.json``);
nothing is recomputed here. Paths in the summary are relative to the demo folder, so two demo
folders made with the same seed have identical summaries.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from pathopeft.demo.run import TASKS, DemoSettings

__all__ = ["HONESTY_NOTE", "format_table", "summarize"]

METRICS = ("bag_auc", "instance_auc")
MODES = ("task_aware", "class_incremental")

HONESTY_NOTE = (
    "The tile features come from a randomly initialised {backbone} (--no-pretrained, so the demo "
    "runs offline) and each task has {n} small synthetic slides with a test split of a few: these "
    "numbers show that every stage runs and connects, not how well the method works. Random-init "
    "features may land anywhere from chance (AUC 0.5) to perfect on these easy synthetic textures, "
    "AUCs over a few test slides move in large steps, and none of it carries over to real slides. "
    "For meaningful metrics run on real slides with a pretrained encoder (README: Real data)."
)


def _number(value: Any) -> float | None:
    """JSON-safe metric: NaN and missing become None (undefined, e.g. one class in the test split)."""
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else round(value, 6)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (the stage that writes it has not finished)")
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def _matrices(out: Path) -> dict[str, dict[str, list[list[float | None]]]]:
    """R[t][i]: metric of task i after training task t (rows: after task 1, after task 2)."""
    n = len(TASKS)
    mats = {m: {k: np.full((n, n), np.nan) for k in METRICS} for m in MODES}
    first = _read_json(out / "runs" / TASKS[0].name / "test_metrics.json")
    for mode in MODES:  # one task, no adapters: both modes are the plain model
        for k in METRICS:
            mats[mode][k][0, 0] = first.get(k) if first.get(k) is not None else np.nan
    after = _read_json(out / "runs" / TASKS[-1].name / "evaluation.json")["results"]
    for i, task in enumerate(TASKS):
        result = after.get(task.name, {})
        for mode in MODES:
            for k in METRICS:
                value = result.get(mode, {}).get(k)
                mats[mode][k][n - 1, i] = np.nan if value is None else value
    return {m: {k: [[_number(v) for v in row] for row in mats[m][k]] for k in METRICS} for m in MODES}


def _bwt(matrix: list[list[float | None]]) -> float | None:
    from pathopeft.mil.continual.pipeline import transfer_metrics

    r = np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float)
    with warnings.catch_warnings():  # an undefined metric (NaN) makes BWT undefined: say n/a, no warning
        warnings.simplefilter("ignore", RuntimeWarning)
        return _number(transfer_metrics(r)["BWT"])


def _files(out: Path, pattern: str) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.glob(pattern))


def summarize(out: str | Path, settings: DemoSettings) -> dict[str, Any]:
    """The demo's results as a JSON-ready dict (written to ``demo_summary.json``)."""
    out = Path(out)
    matrices = _matrices(out)
    last = len(TASKS) - 1
    tasks = []
    for i, task in enumerate(TASKS):
        tasks.append(
            {
                "task": task.name,
                "lesion": task.lesion,
                "classes": list(task.classes),
                "order": i + 1,
                "when_trained": {k: matrices["task_aware"][k][i][i] for k in METRICS},  # R[i][i]
                "after_last_task": {m: {k: matrices[m][k][last][i] for k in METRICS} for m in MODES},
            }
        )
    segment = _read_json(out / "runs" / "segment" / "test_metrics.json")
    return {
        "settings": settings.describe(),
        "tasks": tasks,
        "matrices": {
            "rows": [f"after {t.name}" for t in TASKS],
            "columns": [t.name for t in TASKS],
            **matrices,
        },
        "backward_transfer": {m: {k: _bwt(matrices[m][k]) for k in METRICS} for m in MODES},
        "segmentation": {k: _number(segment.get(k)) for k in ("dice", "iou", "hd95")},
        "outputs": {
            "heatmaps": [f"heatmaps/{t.name}" for t in TASKS],
            "geojson": _files(out, "heatmaps/*/*.geojson"),
            "tiff": _files(out, "heatmaps/*/*.tiff"),
            "png": _files(out, "heatmaps/*/*.png"),
            "learning_curves": _files(out, "runs/*/plots/learning_curves.png"),
            "result_matrix": "demo_summary.json (matrices)",
            "segmentation": _files(out, "segmentation/*_overlay.png"),
            "logs": "logs/",
        },
        "view": "pathopeft view heatmaps",  # from inside the demo folder
        "note": HONESTY_NOTE.format(backbone=settings.backbone, n=settings.n_slides),
    }


def _fmt(value: float | None) -> str:
    return "  n/a" if value is None else f"{value:5.3f}"


def _signed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.3f}"


def format_table(summary: dict[str, Any], out: str | Path) -> str:
    """The printed table: per task AUCs when trained and after the last task, BWT, where files are."""
    out = Path(out)
    last = TASKS[-1].name
    lines = [
        "",
        f"{'':<22}{'when trained':^22}{f'after {last} (task-aware)':^28}{'class-incr.':>14}",
        f"{'task':<11}{'lesion':<11}{'bag AUC':>11}{'inst AUC':>11}"
        f"{'bag AUC':>14}{'inst AUC':>14}{'bag AUC':>14}",
    ]
    for t in summary["tasks"]:
        w, ta, ci = (
            t["when_trained"],
            t["after_last_task"]["task_aware"],
            t["after_last_task"]["class_incremental"],
        )
        lines.append(
            f"{t['task']:<11}{t['lesion']:<11}{_fmt(w['bag_auc']):>11}{_fmt(w['instance_auc']):>11}"
            f"{_fmt(ta['bag_auc']):>14}{_fmt(ta['instance_auc']):>14}{_fmt(ci['bag_auc']):>14}"
        )
    bwt = summary["backward_transfer"]
    lines += [
        "",
        "backward transfer (earlier tasks after the last minus when trained): "
        f"task-aware bag AUC {_signed(bwt['task_aware']['bag_auc'])}, instance AUC "
        f"{_signed(bwt['task_aware']['instance_auc'])}; class-incremental bag AUC "
        f"{_signed(bwt['class_incremental']['bag_auc'])}",
        "segmentation (LoRA ViT, synthetic shapes, test): "
        + ", ".join(f"{k} {_fmt(v).strip()}" for k, v in summary["segmentation"].items()),
        "",
        f"heatmaps:        {out / 'heatmaps'}/<task>/<slide>.{{png,geojson,tiff,csv,json}} "
        f"({len(summary['outputs']['geojson'])} GeoJSON, {len(summary['outputs']['tiff'])} TIFF)",
        f"learning curves: {', '.join(str(out / p) for p in summary['outputs']['learning_curves'])}",
        f"segmentation:    {out / 'segmentation'}/ (masks and *_overlay.png)",
        f"summary:         {out / 'demo_summary.json'}; every command and its output: {out / 'logs'}/",
        "",
        "note: " + summary["note"],
        "",
        f"open the heatmaps in a browser:  pathopeft view {out / 'heatmaps'}",
    ]
    return "\n".join(lines)
