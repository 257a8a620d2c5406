"""A timm-style model registry: ``create_model("comel", in_dim=1024, tasks=[...], **options)``.

Models register themselves with :func:`register_model` (optionally several names for one class
with different fixed options, e.g. ``abmil`` / ``abmil_gated``); the training command picks one by
``model.name``. No if/elif chain: adding a model is one decorator.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from pathopeft.mil.base import MILModel, Task

__all__ = ["create_model", "list_models", "register_model"]

_REGISTRY: dict[str, tuple[type[MILModel], dict[str, Any]]] = {}

T = TypeVar("T", bound=type[MILModel])


def register_model(name: str, **fixed: Any) -> Callable[[T], T]:
    """Register a :class:`MILModel` subclass under ``name``; ``fixed`` options are always passed."""

    def decorator(cls: T) -> T:
        if name in _REGISTRY:
            raise ValueError(f"a MIL model named {name!r} is already registered")
        _REGISTRY[name] = (cls, dict(fixed))
        return cls

    return decorator


def list_models() -> list[str]:
    _ensure_builtin()
    return sorted(_REGISTRY)


def create_model(
    name: str, *, in_dim: int, tasks: Sequence[Task | Mapping[str, Any]], **options: Any
) -> MILModel:
    """Build the model registered as ``name``; unknown names and options fail with a clear message."""
    _ensure_builtin()
    if name not in _REGISTRY:
        raise ValueError(f"unknown MIL model {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    cls, fixed = _REGISTRY[name]
    clash = sorted(set(options) & set(fixed))
    if clash:
        raise ValueError(f"model {name!r} fixes {', '.join(clash)}; do not set it")
    return cls(in_dim=in_dim, tasks=tasks, **fixed, **options)


def _ensure_builtin() -> None:
    """Import the built-in model modules (they register on import)."""
    from pathopeft.mil import abmil, comel, transmil  # noqa: F401
