"""Evaluate every task a continual model has seen, in class-incremental and task-aware modes.

* **task-aware**: the task's own head, with only that task's and earlier adapters active — an
  earlier task's outputs are then bit-identical before and after later tasks (OWLoRA/LoRA).
* **class-incremental**: every adapter active, every head's logits concatenated, the prediction is
  the argmax over every class seen. A task's bag AUC is computed over *its own* classes (the
  class-incremental probabilities of those columns, renormalised), never over all seen classes
  (undefined as soon as a class has no bag in the split: the authors' code gets NaN from task 2).

Tile metrics (instance AUC, Dice) use the shared attention of the mode's active adapters; Dice is
averaged over slides with tumour tiles only (a tumour-free slide's Dice is 0 by construction).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

import pathopeft.adapters as pa
from pathopeft.mil.metrics import BagMetrics, InstanceMetrics

if TYPE_CHECKING:
    from pathopeft.mil.module import MILModule

__all__ = ["MODES", "evaluate_task", "task_mode"]

MODES = ("class_incremental", "task_aware")
METRICS = ("bag_accuracy", "bag_auc", "instance_auc", "tile_dice")


@contextmanager
def task_mode(module: MILModule, task: str | None):
    """Activate the adapters of ``task`` and earlier ones (``None``: every adapter) for a block."""
    model = module.model
    names = pa.adapter_names(model)
    if not names:
        yield
        return
    before = pa.active_adapters(model)
    if task is None:
        wanted = names
    else:
        order = [r["name"] for r in module.records]
        upto = set(order[: order.index(task) + 1])
        wanted = [r["name"] for r in module.adapter_records if r["task"] in upto]
    pa.set_active(model, wanted)
    try:
        yield
    finally:
        pa.set_active(model, before)


@torch.no_grad()
def evaluate_task(
    module: MILModule, task: str, batches: Iterable[Mapping[str, Any]]
) -> dict[str, dict[str, float]]:
    """``{mode: {metric: value}}`` of ``task`` on ``batches`` (its test loader), both modes."""
    record = module.record(task)
    n, offset = len(record["classes"]), record["offset"]
    threshold = module.eval_cfg["instance_threshold"]
    bag = {m: BagMetrics(n) for m in MODES}
    inst = {m: InstanceMetrics(threshold) for m in MODES}
    correct = {m: 0 for m in MODES}
    module.eval()
    batches = list(batches)
    total = sum(len(b["labels"]) for b in batches)
    for mode in MODES:
        with task_mode(module, None if mode == "class_incremental" else task):
            for batch in batches:
                if mode == "class_incremental":
                    out = module.model(
                        batch["features"], coords=batch.get("coords"), mask=_mask(batch), task=None
                    )
                    probs_all = torch.softmax(out.logits.float(), dim=-1)
                    pred = probs_all.argmax(dim=-1)
                    correct[mode] += int((pred == batch["labels"] + offset).sum())
                    own = probs_all[:, offset : offset + n]
                    probs = own / own.sum(dim=-1, keepdim=True).clamp_min(1e-12)
                else:
                    out = module.model(
                        batch["features"], coords=batch.get("coords"), mask=_mask(batch), task=task
                    )
                    probs = torch.softmax(out.logits.float(), dim=-1)
                    correct[mode] += int((probs.argmax(dim=-1) == batch["labels"]).sum())
                bag[mode].update(probs, batch["labels"])
                inst[mode].update(out.scores, batch["tile_labels"], out.mask)
    results: dict[str, dict[str, float]] = {}
    for mode in MODES:
        b = {k: float(v) for k, v in bag[mode].compute().items()}
        i = {k: float(v) for k, v in inst[mode].compute().items()}
        results[mode] = {
            "bag_accuracy": correct[mode] / total if total else float("nan"),
            "bag_auc": b["bag_auc"],
            "bag_balanced_accuracy": b["bag_balanced_accuracy"] if mode == "task_aware" else float("nan"),
            "instance_auc": i.get("instance_auc", float("nan")),
            "tile_dice": i.get("tile_dice", float("nan")),
        }
    return results


def _mask(batch: Mapping[str, Any]) -> torch.Tensor | None:
    mask = batch["mask"]
    return None if bool(mask.all()) else mask
