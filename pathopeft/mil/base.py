"""What every MIL model in pathopeft shares: tasks, the typed output, masking helpers, the interface.

The interface follows MIL-Lab (``forward_features`` → ``forward_attention`` → pooling →
``forward_head``), so baselines and CoMEL are interchangeable in the training module, the heatmap
stage and the continual-learning code. Batches are ``(B, N, D)`` with a boolean padding ``mask``
``(B, N)`` (``True`` = a real tile); every reduction over instances (softmax, min–max, pooling)
ignores padding, so a bag scored alone equals the same bag inside a padded batch.

Adapter-readiness (METHODS.md, OWLoRA): every linear layer is a plain ``nn.Linear`` with a stable
name; classifier heads live in ``heads`` (an ``nn.ModuleDict`` keyed by task name) and the attention
scorer's 1-unit output is ``pool.score``, so :meth:`MILModel.adapter_targets` can exclude both.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "MILModel",
    "MILOutput",
    "Task",
    "as_tasks",
    "masked_softmax",
    "minmax_scores",
    "valid_mask",
]

_TASK_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


@dataclass(frozen=True)
class Task:
    """A classification task: a name (the head's key) and its ordered class names."""

    name: str
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if not _TASK_NAME.match(self.name):
            raise ValueError(
                f"task name {self.name!r} must start with a letter or '_' and contain only letters, "
                "digits, '_' or '-' (it becomes a module name)"
            )
        if len(self.classes) < 2:
            raise ValueError(f"task {self.name!r} needs at least 2 classes, got {list(self.classes)}")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"task {self.name!r} lists a class twice: {list(self.classes)}")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict[str, Any]:
        """Plain types only, so checkpoints load with ``torch.load(weights_only=True)``."""
        return {"name": self.name, "classes": list(self.classes)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Task:
        return cls(str(data["name"]), tuple(str(c) for c in data["classes"]))


def as_tasks(tasks: Iterable[Task | Mapping[str, Any]]) -> list[Task]:
    out = [t if isinstance(t, Task) else Task.from_dict(t) for t in tasks]
    if not out:
        raise ValueError("a MIL model needs at least one task")
    names = [t.name for t in out]
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be unique, got {names}")
    return out


@dataclass
class MILOutput:
    """What a MIL model returns for a batch of bags.

    ``attention`` sums to 1 over each bag's valid instances (0 on padding); ``scores`` is the
    attention min–max normalised per bag to [0, 1] (METHODS.md, CoMEL: the localization score),
    0 on padding; ``features`` are the instance embeddings ``h`` that were pooled.
    """

    logits: Tensor  # (B, C)
    attention: Tensor  # (B, N)
    scores: Tensor  # (B, N)
    embedding: Tensor  # (B, E)
    features: Tensor  # (B, N, E)
    mask: Tensor  # (B, N) bool


def valid_mask(x: Tensor, mask: Tensor | None) -> Tensor:
    """The (B, N) boolean mask of real instances (all true when ``mask`` is None)."""
    if mask is None:
        return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    if mask.shape != x.shape[:2]:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match the batch {tuple(x.shape[:2])}")
    if not bool(mask.any(dim=1).all()):
        raise ValueError("every bag in a batch needs at least one valid instance")
    return mask.bool()


def masked_softmax(logits: Tensor, mask: Tensor, dim: int = -1) -> Tensor:
    """Softmax over valid positions only; padded positions get exactly 0."""
    logits = logits.float().masked_fill(~mask, float("-inf"))
    return torch.softmax(logits, dim=dim).masked_fill(~mask, 0.0)


def minmax_scores(attention: Tensor, mask: Tensor) -> Tensor:
    """Min–max normalise each bag's attention to [0, 1] over its valid instances (METHODS.md, CoMEL).

    A bag whose valid attentions are all equal (e.g. a single tile) has no contrast: its scores are
    0.5, neither positive nor negative. Padding gets 0. The result keeps the gradient (BPPL trains
    through it).
    """
    a = attention.float()
    lo = a.masked_fill(~mask, float("inf")).amin(dim=-1, keepdim=True)
    hi = a.masked_fill(~mask, float("-inf")).amax(dim=-1, keepdim=True)
    span = hi - lo
    flat = span <= torch.finfo(a.dtype).eps
    scores = (a - lo) / torch.where(flat, torch.ones_like(span), span)
    scores = torch.where(flat, torch.full_like(scores, 0.5), scores)
    return scores.masked_fill(~mask, 0.0)


class MILModel(nn.Module):
    """Base class: instance encoder → attention → pooled bag embedding → one head per task.

    Subclasses implement :meth:`forward_features` and :meth:`forward_attention` (and may override
    :meth:`aggregate` / :meth:`forward`). ``task=None`` in :meth:`forward_head` concatenates every head's
    logits in task order (class-incremental inference); naming a task uses only its head.
    """

    def __init__(self, in_dim: int, embed_dim: int, tasks: Sequence[Task | Mapping[str, Any]]) -> None:
        super().__init__()
        if in_dim < 1:
            raise ValueError(f"in_dim must be positive, got {in_dim}")
        self.in_dim = int(in_dim)
        self.embed_dim = int(embed_dim)
        self.tasks: list[Task] = []
        self.heads = nn.ModuleDict()
        for task in as_tasks(tasks):
            self.add_task(task)

    # --- tasks ------------------------------------------------------------------------------
    def add_task(self, task: Task | Mapping[str, Any]) -> nn.Linear:
        """Add a classifier head for a new task (continual learning adds one per task)."""
        task = task if isinstance(task, Task) else Task.from_dict(task)
        if task.name in self.heads:
            raise ValueError(f"the model already has a task named {task.name!r}")
        head = nn.Linear(self.embed_dim, task.num_classes)
        self.heads[task.name] = head
        self.tasks.append(task)
        return head

    def task(self, name: str | None = None) -> Task:
        if name is None:
            return self.tasks[-1]
        for task in self.tasks:
            if task.name == name:
                return task
        raise KeyError(f"unknown task {name!r}; the model has {[t.name for t in self.tasks]}")

    def adapter_layers(self) -> list[str]:
        """Names of every linear layer an adapter may wrap (METHODS.md, OWLoRA), in module order.

        Plain ``nn.Linear`` layers and ones already wrapped by an adapter (a later task adds its own
        adapter next to the earlier ones), excluding the classifier heads, the attention scorer's
        1-unit output (``pool.score``) and any other single-output linear.
        """
        from pathopeft.adapters import AdaptedLayer

        names = []
        for name, module in self.named_modules():
            base = module.base_layer if isinstance(module, AdaptedLayer) else module
            if ".base_layer" in name or not isinstance(base, nn.Linear):
                continue
            if base.out_features > 1 and not self._adapter_excluded(name):
                names.append(name)
        return names

    def adapter_targets(self) -> str:
        """A full-match regex naming :meth:`adapter_layers`."""
        return "(" + "|".join(re.escape(n) for n in self.adapter_layers()) + ")"

    @staticmethod
    def _adapter_excluded(name: str) -> bool:
        return name.startswith("heads.") or name == "pool.score" or name.endswith(".pool.score")

    # --- the MIL-Lab interface -----------------------------------------------------------------
    def forward_features(self, x: Tensor, coords: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """Instance embeddings ``h`` (B, N, E) from tile features ``x`` (B, N, D)."""
        raise NotImplementedError

    def forward_attention(self, h: Tensor, mask: Tensor | None = None) -> Tensor:
        """Per-instance attention (B, N), summing to 1 over each bag's valid instances."""
        raise NotImplementedError

    def instance_embeddings(self, h: Tensor) -> Tensor:
        """The (B, N, E) per-instance part of ``forward_features``' output (all of it by default)."""
        return h

    def aggregate(self, h: Tensor, attention: Tensor, mask: Tensor | None = None) -> Tensor:
        """Attention-weighted bag embedding (B, E); padding has attention 0."""
        return torch.einsum("bn,bne->be", attention.to(h.dtype), h)

    def forward_head(self, bag_embedding: Tensor, task: str | None = None) -> Tensor:
        """Bag logits: one task's head, or all heads concatenated when ``task`` is None."""
        if task is not None:
            self.task(task)  # clear error for an unknown name
            return self.heads[task](bag_embedding)
        return torch.cat([self.heads[t.name](bag_embedding) for t in self.tasks], dim=-1)

    def forward(
        self,
        x: Tensor,
        coords: Tensor | None = None,
        mask: Tensor | None = None,
        task: str | None = None,
    ) -> MILOutput:
        x = self._check_input(x)
        if coords is not None and coords.ndim == 2:
            coords = coords.unsqueeze(0)
        if mask is not None and mask.ndim == 1:
            mask = mask.unsqueeze(0)
        valid = valid_mask(x, mask)
        h = self.forward_features(x, coords=coords, mask=None if mask is None else valid)
        attention = self.forward_attention(h, mask=valid)
        embedding = self.aggregate(h, attention, valid)
        logits = self.forward_head(embedding, task=task)
        return MILOutput(
            logits=logits,
            attention=attention,
            scores=minmax_scores(attention, valid),
            embedding=embedding,
            features=self.instance_embeddings(h),
            mask=valid,
        )

    def _check_input(self, x: Tensor) -> Tensor:
        if x.ndim == 2:
            x = x.unsqueeze(0)
        if x.ndim != 3:
            raise ValueError(f"expected tile features of shape (B, N, D) or (N, D), got {tuple(x.shape)}")
        if x.shape[-1] != self.in_dim:
            raise ValueError(
                f"the bag has {x.shape[-1]}-dimensional features but the model expects {self.in_dim} "
                "(model.in_dim); were the bags made with another backbone?"
            )
        return x
