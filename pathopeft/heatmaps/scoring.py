"""From a checkpoint and one feature bag to per-tile values: the only place that runs the model.

``score_bag`` is the single entry point. For a continual checkpoint it runs the task-aware mode
(:func:`pathopeft.mil.continual.evaluation.task_mode`): the named task's head with only its own
and earlier tasks' adapters, the outputs that stay bit-identical when later tasks are added.
It returns the raw per-tile values:

* ``attention``: the model's attention weight of each tile (sums to 1 over the bag);
* ``probability``: the bag head of the task applied to each tile's own instance embedding
  (``out.features``), softmax probability of the shown class. The models have no per-tile
  classifier; this is what the bag head would say about a bag made of that tile alone, after the
  same instance encoder (so for TransMIL/CoMEL it includes context from the other tiles).

:func:`display_scores` turns one of them into the shown value in [0, 1]: normalisation (none,
min–max or rank within the slide) and then the *gate*. Why the gate: min–max and rank are relative
by construction, so they paint the most-attended tiles of every slide hot, benign ones included.
With ``gate="bag_probability"`` (the default) the shown value is the normalised score multiplied by
the bag probability of the class; a slide the model calls negative (probability < threshold) can
then never reach the region threshold, and its map stays cold.

``task="auto"`` (:func:`route_task`) is for a continual checkpoint asked about a slide whose task
(organ) is not known: the checkpoint's task router picks it from the bag's mean feature
(:mod:`pathopeft.mil.continual.router`), and that task's task-aware view scores the slide.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = [
    "AUTO_TASK",
    "RAW_SCORE",
    "BagScores",
    "TaskError",
    "display_scores",
    "resolve_task",
    "route_task",
    "scale_sentence",
    "score_bag",
]

RAW_SCORE = {
    "attention": "the model's attention weight of the tile (softmax over the slide's tiles, sums to 1)",
    "probability": (
        "softmax probability of the class from the task's bag head applied to the tile's own instance "
        "embedding (out.features); the models have no per-tile classifier, so this is the bag head's "
        "verdict on that tile alone"
    ),
}


AUTO_TASK = "auto"


class TaskError(ValueError):
    """The checkpoint has no such task or class (the message lists what it has)."""


def check_routable(module: Any, class_name: str | None) -> None:
    """``task="auto"`` needs a router that knows every task, and no fixed class (tasks differ)."""
    missing = module.router.missing([t.name for t in module.model.tasks])
    if missing:
        raise TaskError(
            f"task=auto needs the checkpoint's task router, which lacks {missing} (a model trained "
            "before the router existed); name the task instead"
        )
    if class_name is not None:
        raise TaskError("task=auto shows each routed task's last class: leave class_name unset")


@torch.no_grad()
def route_task(module: Any, features: np.ndarray) -> tuple[str, dict[str, float]]:
    """(the task a bag is routed to, p(task | bag) per task) from the checkpoint's router."""
    from pathopeft.mil.continual.router import bag_descriptor

    names = [t.name for t in module.model.tasks]
    x = torch.as_tensor(np.asarray(features), dtype=torch.float32)
    posterior = module.router.posterior(bag_descriptor(x[None]), names)[0]
    return names[int(posterior.argmax())], {n: float(p) for n, p in zip(names, posterior)}


@dataclass
class BagScores:
    """Model outputs of one bag, as numpy (N tiles, C classes of the task)."""

    task: str
    classes: tuple[str, ...]
    bag_probs: np.ndarray  # (C,)
    attention: np.ndarray  # (N,)
    minmax: np.ndarray  # (N,) the model's own min–max attention score (out.scores)
    tile_probs: np.ndarray  # (N, C)

    @property
    def predicted_class(self) -> str:
        return self.classes[int(np.argmax(self.bag_probs))]

    def raw(self, score: str, class_index: int) -> np.ndarray:
        return self.attention if score == "attention" else self.tile_probs[:, class_index]


def resolve_task(module: Any, task: str | None, class_name: str | None) -> tuple[str, tuple[str, ...], int]:
    """(task name, its classes, index of the shown class); clear errors for names the model lacks."""
    tasks = list(module.model.tasks)
    names = [t.name for t in tasks]
    if task is None:
        chosen = tasks[-1]
    else:
        matches = [t for t in tasks if t.name == task]
        if not matches:
            raise TaskError(f"the checkpoint has no task {task!r}; its tasks are {names}")
        chosen = matches[0]
    classes = tuple(chosen.classes)
    if class_name is None:
        return chosen.name, classes, len(classes) - 1
    if class_name not in classes:
        raise TaskError(f"task {chosen.name!r} has no class {class_name!r}; its classes are {list(classes)}")
    return chosen.name, classes, classes.index(class_name)


@torch.no_grad()
def score_bag(module: Any, features: np.ndarray, coords: np.ndarray | None, task: str) -> BagScores:
    """Run ``module.model`` on one bag in eval mode; bag probabilities and per-tile raw scores."""
    model = module.model
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters())
        x = torch.as_tensor(np.asarray(features), dtype=param.dtype, device=param.device).unsqueeze(0)
        c = None
        if coords is not None:
            c = torch.as_tensor(np.asarray(coords), dtype=torch.float32, device=param.device).unsqueeze(0)
        from pathopeft.mil.continual.evaluation import task_mode

        # task-aware: a continual model's task sees only its own and earlier tasks' adapters
        with task_mode(module, task):
            out = model(x, coords=c, task=task)
        head = model.heads[task]
        inst = out.features[0]
        tile_logits = head(inst.to(head.weight.dtype)).float()
        result = BagScores(
            task=task,
            classes=tuple(model.task(task).classes),
            bag_probs=torch.softmax(out.logits.float()[0], dim=-1).cpu().numpy().astype(np.float64),
            attention=out.attention.float()[0].cpu().numpy().astype(np.float64),
            minmax=out.scores.float()[0].cpu().numpy().astype(np.float64),
            tile_probs=torch.softmax(tile_logits, dim=-1).cpu().numpy().astype(np.float64),
        )
    finally:
        model.train(was_training)
    n = len(features)
    if result.attention.shape != (n,) or result.tile_probs.shape[0] != n:
        raise RuntimeError(
            f"the model returned {result.attention.shape[0]} attention values for a bag of {n} tiles"
        )
    return result


def normalize(values: np.ndarray, how: str) -> np.ndarray:
    """Scale raw values to [0, 1]: none (clip), minmax within the slide, or rank (0 = lowest)."""
    v = np.asarray(values, dtype=np.float64)
    if how == "none":
        return np.clip(np.nan_to_num(v, nan=0.0), 0.0, 1.0)
    if how == "minmax":
        lo, hi = float(v.min()), float(v.max())
        if hi - lo <= np.finfo(np.float64).eps * max(1.0, abs(hi)):
            return np.full_like(v, 0.5)  # no contrast: neither hot nor cold (as MILOutput.scores)
        return (v - lo) / (hi - lo)
    if how == "rank":
        if len(v) == 1:
            return np.full_like(v, 0.5)
        order = np.argsort(v, kind="stable")
        ranks = np.empty(len(v), dtype=np.float64)
        ranks[order] = np.arange(len(v))
        return ranks / (len(v) - 1)
    raise ValueError(f"unknown normalisation {how!r}")


def display_scores(raw: np.ndarray, how: str, gate: str, bag_probability: float) -> np.ndarray:
    """The shown value in [0, 1]: normalised raw score, times the bag probability when gated."""
    shown = normalize(raw, how)
    if gate == "bag_probability":
        shown = shown * float(bag_probability)
    elif gate != "none":
        raise ValueError(f"unknown gate {gate!r}")
    return np.clip(shown, 0.0, 1.0)


def scale_sentence(score: str, how: str, gate: str, class_name: str) -> str:
    """The contract's ``scale``: in words, what a value on the shown scale means."""
    base = {
        "none": f"the raw {score} value (clipped to [0, 1])",
        "minmax": f"the {score} min-max normalised within this slide (0 = its lowest tile, 1 = its highest)",
        "rank": f"the rank of the tile's {score} within this slide (0 = lowest, 1 = highest)",
    }[how]
    if gate == "bag_probability":
        return (
            f"{base}, multiplied by the slide's bag probability of {class_name!r}: a slide the model calls "
            "negative stays below the threshold everywhere"
        )
    if how == "none" and score == "probability":
        return f"{base}: absolute, comparable across slides"
    return f"{base}: relative, the hottest tiles of any slide (benign ones too) reach 1"
