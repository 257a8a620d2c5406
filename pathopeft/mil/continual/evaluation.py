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
from pathopeft.mil.continual.router import bag_descriptor
from pathopeft.mil.metrics import BagMetrics, InstanceMetrics

if TYPE_CHECKING:
    from pathopeft.mil.module import MILModule

__all__ = ["METRICS", "MODES", "evaluate_task", "matrix_keys", "task_mode"]

MODES = ("class_incremental", "task_aware", "routed")
METRICS = ("bag_accuracy", "bag_auc", "instance_auc", "tile_dice")
ROUTED_ONLY = ("routing_accuracy",)


def matrix_keys() -> list[tuple[str, str]]:
    """Every (mode, metric) a result matrix is kept for."""
    keys = [(m, k) for m in MODES for k in METRICS]
    return keys + [("routed", k) for k in ROUTED_ONLY]


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
    """``{mode: {metric: value}}`` of ``task`` on ``batches`` (its test loader), every mode."""
    record = module.record(task)
    n, offset = len(record["classes"]), record["offset"]
    threshold = module.eval_cfg["instance_threshold"]
    names = [r["name"] for r in module.records]
    routable = not module.router.missing(names)
    modes = MODES if routable else tuple(m for m in MODES if m != "routed")
    bag = {m: BagMetrics(n) for m in modes}
    inst = {m: InstanceMetrics(threshold) for m in modes}
    correct = {m: 0 for m in modes}
    routed_right = 0
    module.eval()
    batches = list(batches)
    total = sum(len(b["labels"]) for b in batches)
    for mode in modes:
        if mode == "routed":
            for batch in batches:
                log_joint, scores, mask, route = _routed(module, names, batch)
                correct[mode] += int((log_joint.argmax(dim=-1) == batch["labels"] + offset).sum())
                routed_right += int((route == names.index(task)).sum())
                own = torch.softmax(log_joint[:, offset : offset + n], dim=-1)  # p(task | bag) cancels
                bag[mode].update(own, batch["labels"])
                inst[mode].update(scores, batch["tile_labels"], mask)
            continue
        with task_mode(module, None if mode == "class_incremental" else task):
            for batch in batches:
                if mode == "class_incremental":
                    out = module.model(
                        batch["features"], coords=batch.get("coords"), mask=_mask(batch), task=None
                    )
                    probs_all = torch.softmax(out.logits.float(), dim=-1)
                    pred = probs_all.argmax(dim=-1)
                    correct[mode] += int((pred == batch["labels"] + offset).sum())
                    probs = _renormalise(probs_all[:, offset : offset + n])
                else:
                    out = module.model(
                        batch["features"], coords=batch.get("coords"), mask=_mask(batch), task=task
                    )
                    probs = torch.softmax(out.logits.float(), dim=-1)
                    correct[mode] += int((probs.argmax(dim=-1) == batch["labels"]).sum())
                bag[mode].update(probs, batch["labels"])
                inst[mode].update(out.scores, batch["tile_labels"], out.mask)
    results: dict[str, dict[str, float]] = {}
    nan = float("nan")
    for mode in modes:
        b = {k: float(v) for k, v in bag[mode].compute().items()}
        i = {k: float(v) for k, v in inst[mode].compute().items()}
        results[mode] = {
            "bag_accuracy": correct[mode] / total if total else nan,
            "bag_auc": b["bag_auc"],
            "bag_balanced_accuracy": b["bag_balanced_accuracy"] if mode == "task_aware" else nan,
            "instance_auc": i.get("instance_auc", nan),
            "tile_dice": i.get("tile_dice", nan),
        }
    if routable:
        results["routed"]["routing_accuracy"] = routed_right / total if total else nan
    else:
        results["routed"] = {k: nan for k in (*METRICS, "bag_balanced_accuracy", *ROUTED_ONLY)}
    return results


def _renormalise(own: torch.Tensor) -> torch.Tensor:
    return own / own.sum(dim=-1, keepdim=True).clamp_min(1e-12)


def _routed(
    module: MILModule, names: list[str], batch: Mapping[str, Any]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log-probabilities over every seen class, tile scores of the routed task, mask, routed task).

    Each task answers task-aware (its own and earlier adapters); its class probabilities are
    weighted by the router's posterior in log space, so a bag routed with certainty elsewhere
    still has finite, renormalisable probabilities for its own task's classes.
    """
    descriptor = bag_descriptor(batch["features"], batch["mask"])
    log_post = torch.log_softmax(module.router.log_likelihood(descriptor, names), dim=1)
    route = log_post.argmax(dim=1)
    log_probs, scores, mask = [], None, None
    for j, name in enumerate(names):
        with task_mode(module, name):
            out = module.model(batch["features"], coords=batch.get("coords"), mask=_mask(batch), task=name)
        log_probs.append(torch.log_softmax(out.logits.float(), dim=-1) + log_post[:, j : j + 1])
        if scores is None:
            scores, mask = torch.zeros_like(out.scores), out.mask
        chosen = route == j
        scores[chosen] = out.scores[chosen]
    assert scores is not None and mask is not None
    return torch.cat(log_probs, dim=1), scores, mask, route


def _mask(batch: Mapping[str, Any]) -> torch.Tensor | None:
    mask = batch["mask"]
    return None if bool(mask.all()) else mask
