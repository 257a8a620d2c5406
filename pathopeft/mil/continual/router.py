"""Which task a bag belongs to, for inference without a task id: a router on stored bag statistics.

Class-incremental inference as the authors specify it (every head's logits concatenated, argmax
over every class seen) is decided by how the independently trained heads are calibrated against
each other: a head trained only on its own organ has never seen another organ's bags and often
scores them high as well (measured on the synthetic 3-task sequence: class-incremental accuracy
0.39–0.44 where each task's own head reaches 0.80). The router supplies the missing task
identity from what a slide looks like: the mean of its tiles' features (the backbone's features,
upstream of every adapter, so the statistic never drifts when later tasks train). Per task it keeps
the per-dimension mean and variance of that statistic over the task's training bags, 2·D numbers
and a count, and routes a bag by the diagonal-Gaussian likelihood. No bag, no slide, no tile is
kept: a lab may delete an earlier task's data and the router still works.

The *routed* evaluation mode then answers with the routed task's own head, with only that task's
and earlier adapters active (task-aware inference on the routed task). Its class probabilities
over every seen class are ``p(task | bag) · p(class | bag, task)``, so it is a proper
class-incremental prediction (no task id is given), reported next to the concatenated one.

It is stored in the checkpoint as plain tensors and lists (key ``pathopeft_router``), loaded with
``torch.load(weights_only=True)`` like the rest.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["ROUTER_KEY", "TaskRouter", "bag_descriptor", "fit_router", "write_router"]

log = logging.getLogger(__name__)

ROUTER_KEY = "pathopeft_router"
# pseudo-count of the shrinkage of each dimension's variance towards the task's mean variance: a
# task trained on a handful of bags would otherwise get near-zero variances on some dimensions
# and reject its own new bags
SHRINK = 5.0


def bag_descriptor(features: Tensor, mask: Tensor | None = None) -> Tensor:
    """(B, D) mean feature over each bag's real tiles (padding excluded)."""
    features = features.float()
    if mask is None:
        return features.mean(dim=1)
    weights = mask.to(features.dtype).unsqueeze(-1)
    return (features * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


class TaskRouter:
    """Per-task diagonal Gaussian over :func:`bag_descriptor`; tasks are fitted once, in order."""

    def __init__(self) -> None:
        self.tasks: dict[str, dict[str, Any]] = {}  # name -> {"mean", "var", "count"}

    def __contains__(self, task: str) -> bool:
        return task in self.tasks

    def missing(self, names: Sequence[str]) -> list[str]:
        """The named tasks without statistics (a model trained before the router existed)."""
        return [n for n in names if n not in self.tasks]

    def fit_task(self, task: str, descriptors: Tensor) -> None:
        """Store ``task``'s statistics from its training bags' descriptors (N, D)."""
        d = descriptors.detach().double().cpu()
        if d.ndim != 2 or len(d) == 0:
            raise ValueError(f"task {task!r}: the router needs at least one training bag")
        if self.tasks:
            dim = next(iter(self.tasks.values()))["mean"].numel()
            if d.shape[1] != dim:
                raise ValueError(
                    f"task {task!r}: bag statistics of size {d.shape[1]}, the router's are {dim}"
                )
        n = len(d)
        mean = d.mean(dim=0)
        var = d.var(dim=0, unbiased=True) if n > 1 else torch.zeros_like(mean)
        pooled = float(var.mean()) if n > 1 else 1.0
        floor = max(pooled, 1e-6)
        var = (n * var + SHRINK * floor) / (n + SHRINK)
        self.tasks[task] = {"mean": mean.float(), "var": var.float(), "count": n}

    def log_likelihood(self, descriptors: Tensor, names: Sequence[str]) -> Tensor:
        """(B, T) log density of each bag under each named task's Gaussian."""
        missing = self.missing(names)
        if missing:
            raise KeyError(f"the router has no statistics for task(s) {missing}")
        x = descriptors.detach().float().cpu()
        columns = []
        for name in names:
            stats = self.tasks[name]
            mean, var = stats["mean"], stats["var"]
            columns.append(-0.5 * (((x - mean) ** 2 / var) + var.log() + math.log(2 * math.pi)).sum(dim=1))
        return torch.stack(columns, dim=1).to(descriptors.device)

    def posterior(self, descriptors: Tensor, names: Sequence[str]) -> Tensor:
        """(B, T) p(task | bag) with equal priors."""
        return torch.softmax(self.log_likelihood(descriptors, names), dim=1)

    # --- checkpoint form ------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "version": 1,
            "tasks": [
                {"name": k, "mean": v["mean"].clone(), "var": v["var"].clone(), "count": int(v["count"])}
                for k, v in self.tasks.items()
            ],
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any] | None) -> TaskRouter:
        router = cls()
        if not state:
            return router
        if state.get("version") != 1:
            raise ValueError(f"unknown router format {state.get('version')!r}")
        for t in state["tasks"]:
            router.tasks[str(t["name"])] = {
                "mean": torch.as_tensor(t["mean"]).float(),
                "var": torch.as_tensor(t["var"]).float(),
                "count": int(t["count"]),
            }
        return router


def fit_router(
    router: TaskRouter, names: Sequence[str], datasets: Iterable[Any], default_task: int
) -> list[str]:
    """Fit every task of ``datasets`` that the router lacks; returns the names fitted.

    ``datasets`` are :class:`~pathopeft.mil.data.BagDataset` objects of training bags, each with
    its ``task`` index (``None``: ``default_task``). A task already in the router is left as it
    is: replay datasets hold a few of an earlier task's bags, whose statistics came from all of
    them when that task was trained.
    """
    sums: dict[int, list[Tensor]] = {}
    for dataset in datasets:
        index = default_task if dataset.task is None else int(dataset.task)
        if names[index] in router:
            continue
        for i in range(len(dataset)):
            item = dataset[i]
            sums.setdefault(index, []).append(bag_descriptor(item["features"][None])[0])
    fitted = []
    for index, rows in sorted(sums.items()):
        router.fit_task(names[index], torch.stack(rows))
        fitted.append(names[index])
        log.info("router: task %r fitted on %d training bag(s)", names[index], len(rows))
    return fitted


def write_router(router: TaskRouter, checkpoints: Iterable[Path]) -> None:
    """Put the router into finished checkpoints (one atomic rewrite each; absent files skipped)."""
    from pathopeft.files import atomic_path

    for path in checkpoints:
        if not path.is_file():
            continue
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        ckpt[ROUTER_KEY] = router.state()
        with atomic_path(path) as tmp:
            torch.save(ckpt, tmp)
