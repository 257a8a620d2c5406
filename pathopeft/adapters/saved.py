"""``modules_to_save``: whole modules (a classifier head, a norm) trained and saved with an adapter.

HF PEFT's ``ModulesToSaveWrapper`` layout: the module is replaced by a :class:`SavedModule` that
keeps the original as ``<name>.original_module`` and one full copy per adapter name as
``<name>.modules_to_save.<adapter>``. Forward runs the copy of the active adapter, so switching
adapters switches heads too; with the adapters disabled (or none active that has a copy) it runs
the original. Copies are made from the original when an adapter is attached, so every adapter
starts from the same base module.
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn

from pathopeft.adapters.base import AdaptedLayer, AdapterError
from pathopeft.adapters.registry import name_matches

__all__ = ["SavedModule", "check_module_to_save", "fresh_copy", "select_modules_to_save", "warn_if_ambiguous"]

INTERNAL_NAMES = (".base_layer", ".adapters.", ".original_module", ".modules_to_save.")


class SavedModule(nn.Module):
    """A base module plus one trainable full copy per adapter name (HF PEFT's ``ModulesToSaveWrapper``)."""

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active: list[str] = []  # adapter names whose copy may run, in activation order (last wins)
        self.disabled = False

    def __getattr__(self, name: str) -> Any:
        """Fall back to the running module's attributes (``weight``, ``in_features`` ...), like PEFT."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            # own state and dunders never fall through: a half-built instance (deepcopy, unpickling)
            # would otherwise recurse through current()
            if name in ("original_module", "modules_to_save", "active", "disabled") or name.startswith("__"):
                raise
            return getattr(self.current(), name)

    def add(self, adapter_name: str, module: nn.Module, *, active: bool = True) -> None:
        self.modules_to_save[adapter_name] = module
        if active and adapter_name not in self.active:
            self.active.append(adapter_name)

    def remove(self, adapter_name: str) -> None:
        del self.modules_to_save[adapter_name]
        self.active = [n for n in self.active if n != adapter_name]

    def set_active(self, names: Sequence[str]) -> None:
        self.active = [n for n in names if n in self.modules_to_save]

    def current_name(self) -> str | None:
        """The adapter whose copy forward runs (the last active one that has a copy), or None."""
        return None if self.disabled or not self.active else self.active[-1]

    def current(self) -> nn.Module:
        name = self.current_name()
        return self.original_module if name is None else self.modules_to_save[name]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.current()(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"copies={list(self.modules_to_save)}, active={self.active}"


def warn_if_ambiguous(name: str, wrapper: SavedModule) -> None:
    """Several active adapters each bring a copy of one module: only the last one's can run."""
    if len(wrapper.active) > 1:
        warnings.warn(
            f"adapters {wrapper.active} are active and each has its own copy of {name!r} (modules_to_save); "
            f"{wrapper.active[-1]!r}'s copy is used (the one activated last)",
            UserWarning,
            stacklevel=3,
        )


def select_modules_to_save(
    model: nn.Module,
    patterns: str | Sequence[str] | None,
    candidates: Iterable[tuple[str, nn.Module]],
    adapter_name: str,
    targets: Sequence[str],
) -> list[tuple[str, nn.Module]]:
    """The modules ``patterns`` names, outermost only; every entry must name at least one module.

    ``patterns``: a full-match regex, or a list whose entries match as full-match regex or dotted
    name suffix (the target rules; PEFT's ``modules_to_save=["head"]`` works as is). Refused: the
    model itself, adapted layers, modules that hold adapted layers or this call's targets, modules
    their parent never calls (``nn.MultiheadAttention.out_proj``) and a module that already has a
    copy for ``adapter_name``.
    """
    if patterns is None:
        return []
    entries = [patterns] if isinstance(patterns, str) else list(patterns)
    if not all(isinstance(entry, str) and entry for entry in entries):
        raise AdapterError(f"modules_to_save must be module names or patterns (strings), got {patterns!r}")
    pool = list(candidates)
    chosen: list[tuple[str, nn.Module]] = []
    for entry in entries:
        found = [
            (n, m)
            for n, m in pool
            if (name_matches(entry, n) if not isinstance(patterns, str) else _full_match(entry, n))
        ]
        if not found:
            top = ", ".join(n for n, _ in model.named_children())
            raise AdapterError(
                f"modules_to_save entry {entry!r} names no module of {type(model).__name__} "
                f"(full-match regex or dotted name suffix; top-level modules: {top or '(none)'})"
            )
        chosen.extend(item for item in found if item[0] not in {n for n, _ in chosen})
    outer = [(n, m) for n, m in chosen if not any(n.startswith(o + ".") for o, _ in chosen if o != n)]
    for name, module in outer:
        check_module_to_save(model, name, module, adapter_name, targets)
    return outer


def _full_match(pattern: str, name: str) -> bool:
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error as exc:
        raise AdapterError(f"invalid modules_to_save pattern {pattern!r}: {exc}") from None


def check_module_to_save(
    model: nn.Module, name: str, module: nn.Module, adapter_name: str, targets: Sequence[str]
) -> None:
    """Raise when ``module`` (at ``name``) cannot get a copy for ``adapter_name``."""
    if isinstance(module, AdaptedLayer) or name in targets:
        raise AdapterError(
            f"modules_to_save {name!r} is an adapted layer: a module is either a target (adapter on a frozen "
            "base) or in modules_to_save (a full trainable copy), not both"
        )
    inner = module.original_module if isinstance(module, SavedModule) else module
    nested = [f"{name}.{n}" for n, m in inner.named_modules() if isinstance(m, (AdaptedLayer, SavedModule))]
    nested += [t for t in targets if t.startswith(name + ".")]
    if nested:
        raise AdapterError(
            f"modules_to_save {name!r} contains adapted layers ({', '.join(nested[:3])}); "
            "choose modules outside the targets"
        )
    parent = model.get_submodule(name.rpartition(".")[0])
    if isinstance(parent, nn.MultiheadAttention):
        raise AdapterError(
            f"modules_to_save {name!r}: nn.MultiheadAttention uses its out_proj weight without calling the "
            "module, so a trained copy there would have no effect"
        )
    if isinstance(module, SavedModule) and adapter_name in module.modules_to_save:
        raise AdapterError(f"modules_to_save {name!r} already has a copy for adapter {adapter_name!r}")


def fresh_copy(module: nn.Module) -> nn.Module:
    """A trainable full copy of the base module (of the original when ``module`` is already wrapped)."""
    original = module.original_module if isinstance(module, SavedModule) else module
    return copy.deepcopy(original)
