"""Model-level operations: inject adapters by name pattern, choose the active ones, merge, count.

Injection replaces each matched module by an :class:`AdaptedLayer` that keeps the original as
``<name>.base_layer`` (HF PEFT's layout), so state-dict keys of the base stay predictable.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TextIO

import torch
from torch import nn

from pathopeft.adapters.base import AdaptedLayer, AdapterError, AdapterModule, float32_svd_many
from pathopeft.adapters.registry import NAME_PATTERN, AdapterConfig, make_config
from pathopeft.adapters.saved import SavedModule, fresh_copy, select_modules_to_save, warn_if_ambiguous

__all__ = [
    "active_adapters",
    "adapted_layers",
    "adapter_modules",
    "adapter_names",
    "attach",
    "detach",
    "disable_adapters",
    "merge",
    "merge_and_unload",
    "print_trainable_parameters",
    "regularization",
    "saved_modules",
    "set_active",
    "set_trainable",
    "trainable_parameters",
    "unmerge",
]

Patterns = str | Sequence[str] | None


def _compile(patterns: Patterns) -> list[re.Pattern[str]]:
    if patterns is None:
        return []
    items = [patterns] if isinstance(patterns, str) else list(patterns)
    try:
        return [re.compile(p) for p in items]
    except re.error as exc:
        raise AdapterError(f"invalid target pattern {items!r}: {exc}") from None


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, AdaptedLayer]]:
    """Every wrapped layer of ``model`` with its module name."""
    for name, module in model.named_modules():
        if isinstance(module, AdaptedLayer):
            yield name, module


def adapter_modules(model: nn.Module, name: str) -> Iterator[tuple[str, AdaptedLayer, AdapterModule]]:
    """``(layer name, wrapper, module)`` for every layer that carries adapter ``name``."""
    for layer_name, layer in adapted_layers(model):
        if name in layer.adapters:
            yield layer_name, layer, layer.adapters[name]  # type: ignore[misc]


def saved_modules(model: nn.Module) -> Iterator[tuple[str, SavedModule]]:
    """Every ``modules_to_save`` wrapper of ``model`` with its module name."""
    for name, module in model.named_modules():
        if isinstance(module, SavedModule):
            yield name, module


def adapter_names(model: nn.Module) -> list[str]:
    """All adapter names on the model, in the order they were attached."""
    seen: dict[str, None] = {}
    for _, layer in adapted_layers(model):
        seen.update(dict.fromkeys(layer.adapters))
    for _, wrapper in saved_modules(model):
        seen.update(dict.fromkeys(wrapper.modules_to_save))
    return list(seen)


def active_adapters(model: nn.Module) -> list[str]:
    seen: dict[str, None] = {}
    for _, layer in adapted_layers(model):
        seen.update(dict.fromkeys(layer.active))
    return list(seen)


def _candidates(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Modules a pattern may select: wrappers and plain modules, never a wrapper's insides."""
    inside: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(prefix) for prefix in inside):
            continue
        yield name, module
        if isinstance(module, (AdaptedLayer, SavedModule)):
            inside.append(name + ".")


ALL_LINEAR = "all-linear"


def _output_layer(model: nn.Module) -> str | None:
    """Name of the model's output layer, left out by ``"all-linear"`` (as in HF PEFT): timm's
    ``get_classifier()``, transformers' ``get_output_embeddings()``, else the last nn.Linear."""
    for getter in ("get_classifier", "get_output_embeddings"):
        head = getattr(model, getter, None)
        head = head() if callable(head) else None
        if isinstance(head, nn.Module):
            return next((n for n, m in model.named_modules() if m is head), None)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def _matches(model: nn.Module, targets: Patterns, exclude: Patterns) -> list[tuple[str, nn.Module]]:
    """``targets``: a full-match regex, a list whose entries match as full-match regex or as a dotted
    name suffix (HF PEFT's list form: ``["qkv"]`` selects ``blocks.0.attn.qkv``), or ``"all-linear"``."""
    if targets == ALL_LINEAR:
        head = _output_layer(model)
        chosen = [
            (name, module)
            for name, module in _candidates(model)
            if isinstance(module, (nn.Linear, AdaptedLayer))
            and (not isinstance(module, AdaptedLayer) or module.geometry.kind == "linear")
            and name != head
            and not isinstance(model.get_submodule(name.rpartition(".")[0]), nn.MultiheadAttention)
        ]
        skip = _compile(exclude)
        return [(n, m) for n, m in chosen if not any(p.fullmatch(n) for p in skip)]
    include, skip = _compile(targets), _compile(exclude)
    if not include:
        raise AdapterError("attach needs a target pattern (a full-match regex over module names)")
    suffixes = [] if isinstance(targets, str) or targets is None else [t for t in targets if t]

    def wanted(name: str) -> bool:
        if any(p.fullmatch(name) for p in include):
            return True
        return any(name == t or name.endswith("." + t) for t in suffixes)

    return [
        (name, module)
        for name, module in _candidates(model)
        if wanted(name) and not any(p.fullmatch(name) for p in skip)
    ]


def _no_match_message(model: nn.Module, targets: Patterns) -> str:
    layers = [n for n, m in _candidates(model) if isinstance(m, (nn.Linear, nn.Conv2d, AdaptedLayer))]
    shown = ", ".join(layers[:8]) + (" ..." if len(layers) > 8 else "")
    return (
        f"target pattern {targets!r} (full match) selected no module of {type(model).__name__}; "
        f"Linear/Conv2d module names look like: {shown or '(none)'}"
    )


def _refuse_bypassed(model: nn.Module, names: Sequence[str]) -> None:
    """Refuse layers whose parent never calls them: ``nn.MultiheadAttention`` reads ``out_proj.weight``
    directly (``F.multi_head_attention_forward``), so an adapter there would silently do nothing."""
    bypassed = [
        n for n in names if isinstance(model.get_submodule(n.rpartition(".")[0]), nn.MultiheadAttention)
    ]
    if bypassed:
        raise AdapterError(
            f"cannot adapt {', '.join(bypassed[:5])}: nn.MultiheadAttention uses its out_proj weight "
            "without calling the layer, so an adapter there would have no effect"
        )


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def attach(
    model: nn.Module,
    method: str | AdapterConfig,
    targets: Patterns = None,
    *,
    name: str = "default",
    exclude: Patterns = None,
    modules_to_save: Patterns = None,
    **options: Any,
) -> list[str]:
    """Add adapter ``name`` of ``method`` to every module whose name full-matches ``targets``.

    ``modules_to_save`` (HF PEFT's option, e.g. ``["head"]``): modules trained whole alongside the
    adapter, matched like targets (a list entry: full-match regex or dotted name suffix). Each gets a
    trainable full copy for ``name`` (see :mod:`pathopeft.adapters.saved`) that :func:`save` stores
    with the adapter; forward uses the copy of the active adapter, so switching adapters switches it.

    ``method`` is a registered method name (``options`` are its config fields) or a ready config.
    Returns the adapted module names. Afterwards every parameter that is not an adapter parameter
    is frozen (``requires_grad=False``); the new adapter is trainable and active in addition to
    the adapters already active. To train e.g. norms too, set their ``requires_grad`` afterwards.
    Nothing is changed when any matched layer is rejected (unsupported type, rank too large).
    Attaching an existing ``name`` again (same method and options) extends it to more layers;
    the same name with another method or other options is refused (it would not save as one).
    """
    config = method if isinstance(method, AdapterConfig) else make_config(method, **options)
    if isinstance(method, AdapterConfig) and options:
        raise AdapterError("pass either a config object or keyword options, not both")
    if not NAME_PATTERN.fullmatch(name):
        raise AdapterError(f"adapter name {name!r} may only use letters, digits, '_' and '-'")
    existing = next((a.adapter_config for _, _, a in adapter_modules(model, name)), None)
    if existing is not None and existing != config:
        raise AdapterError(
            f"an adapter named {name!r} already exists on this model ({existing.method}, other options); "
            "an adapter name stands for one method and one set of options: choose another name"
        )
    matched = _matches(model, targets, exclude)
    if not matched:
        raise AdapterError(_no_match_message(model, targets))
    unsupported = [
        f"{n} ({type(m).__name__})"
        for n, m in matched
        if not isinstance(m, (nn.Linear, nn.Conv2d, AdaptedLayer))
    ]
    if unsupported:
        raise AdapterError(
            f"method {config.method!r} cannot adapt {', '.join(unsupported[:5])}: only nn.Linear and "
            "nn.Conv2d layers can be wrapped; narrow the target pattern"
        )
    _refuse_bypassed(model, [n for n, _ in matched])
    config.check_patterns([n for n, _, _ in adapter_modules(model, name)] + [n for n, _ in matched])
    to_save = select_modules_to_save(
        model, modules_to_save, _candidates(model), name, [n for n, _ in matched]
    )
    copies = [(module_name, module, fresh_copy(module)) for module_name, module in to_save]
    layers: list[tuple[str, AdaptedLayer, bool]] = []
    for layer_name, module in matched:  # build everything first: a failure leaves the model untouched
        is_new = not isinstance(module, AdaptedLayer)
        layer = AdaptedLayer(module, layer_name) if is_new else module
        if name in layer.adapters:
            raise AdapterError(f"{layer_name}: an adapter named {name!r} is already attached")
        if layer.merged and config.uses_svd:
            raise AdapterError(f"{layer_name}: unmerge adapters {layer.merged} before attaching {name!r}")
        layers.append((layer_name, layer, is_new))
    weights = [layer.geometry.as_matrix(layer.base_layer.weight.detach()) for _, layer, _ in layers]
    svds = float32_svd_many(weights) if config.uses_svd else [None] * len(layers)
    built: list[tuple[str, AdaptedLayer, bool, AdapterModule]] = []
    for (layer_name, layer, is_new), weight, svd in zip(layers, weights, svds):
        adapter = config.build(layer.geometry, layer_name, weight=weight, svd=svd)
        adapter.to(device=weight.device)
        built.append((layer_name, layer, is_new, adapter))
    for layer_name, layer, is_new, adapter in built:
        if is_new:
            _set_submodule(model, layer_name, layer)
        layer.add(name, adapter)
    install_copies(model, name, copies)
    _freeze_base(model)
    for _, _, _, adapter in built:
        adapter.requires_grad_(True)
    for _, _, module_copy in copies:
        module_copy.requires_grad_(True)
    hook = getattr(config, "after_attach", None)
    if hook is not None:
        hook(model, name)
    return [layer_name for layer_name, *_ in built]


def install_copies(model: nn.Module, name: str, copies: Sequence[tuple[str, nn.Module, nn.Module]]) -> None:
    """Put each ``(module name, module, copy)``'s copy into the model as adapter ``name``'s (active)."""
    for module_name, module, module_copy in copies:
        wrapper = module if isinstance(module, SavedModule) else SavedModule(module)
        if wrapper is not module:
            _set_submodule(model, module_name, wrapper)
        wrapper.add(name, module_copy)
        warn_if_ambiguous(module_name, wrapper)


def _adapter_parameters(model: nn.Module) -> set[int]:
    """ids of every adapter parameter: adapters on layers and the modules_to_save copies."""
    found = {id(p) for _, layer in adapted_layers(model) for p in layer.adapters.parameters()}
    found.update(id(p) for _, wrapper in saved_modules(model) for p in wrapper.modules_to_save.parameters())
    return found


def _freeze_base(model: nn.Module) -> None:
    adapter_params = _adapter_parameters(model)
    for p in model.parameters():
        if id(p) not in adapter_params:
            p.requires_grad_(False)


def _check_names(model: nn.Module, names: Sequence[str]) -> list[str]:
    names = [names] if isinstance(names, str) else list(names)
    known = adapter_names(model)
    missing = [n for n in names if n not in known]
    if missing:
        raise AdapterError(f"unknown adapter(s) {missing}; this model has {known}")
    return names


def set_active(model: nn.Module, names: str | Sequence[str]) -> None:
    """Make exactly ``names`` take part in forward (on the layers that carry them)."""
    names = _check_names(model, names)
    for layer_name, layer in adapted_layers(model):
        layer.set_active(names, layer_name)
    for module_name, wrapper in saved_modules(model):
        wrapper.set_active(names)
        warn_if_ambiguous(module_name, wrapper)


def set_trainable(model: nn.Module, names: str | Sequence[str]) -> None:
    """Adapters in ``names`` get ``requires_grad=True``, every other adapter is frozen (base untouched)."""
    names = _check_names(model, names)
    for _, layer in adapted_layers(model):
        for adapter_name, adapter in layer.adapters.items():
            adapter.requires_grad_(adapter_name in names)
    for _, wrapper in saved_modules(model):
        for adapter_name, module_copy in wrapper.modules_to_save.items():
            module_copy.requires_grad_(adapter_name in names)


def detach(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` (unmerging it first); layers left without adapters are unwrapped."""
    _check_names(model, [name])
    for layer_name, layer in list(adapted_layers(model)):
        if name in layer.adapters:
            layer.remove(name)
        if not len(layer.adapters):
            _set_submodule(model, layer_name, layer.base_layer)
    for module_name, wrapper in list(saved_modules(model)):
        if name in wrapper.modules_to_save:
            wrapper.remove(name)
        if not len(wrapper.modules_to_save):
            _set_submodule(model, module_name, wrapper.original_module)


def merge(model: nn.Module, names: str | Sequence[str] | None = None) -> list[str]:
    """Add ΔW of ``names`` (default: the active adapters) into the base weights, in float32.

    Merged adapters cost nothing in forward. Returns the adapter names that were merged.
    """
    chosen = active_adapters(model) if names is None else _check_names(model, names)
    done: dict[str, None] = {}
    for _, layer in adapted_layers(model):
        done.update(dict.fromkeys(layer.merge([n for n in chosen if n in layer.adapters])))
    for _, layer in adapted_layers(model):  # an explicitly merged adapter must also be active
        for n in layer.merged:
            if n not in layer.active:
                layer.active.append(n)
        layer._refresh()
    for module_name, wrapper in saved_modules(model):  # ... and so must its modules_to_save copies
        added = [n for n in done if n in wrapper.modules_to_save and n not in wrapper.active]
        if added:
            wrapper.active.extend(added)
            warn_if_ambiguous(module_name, wrapper)
    return list(done)


def unmerge(model: nn.Module, names: str | Sequence[str] | None = None) -> list[str]:
    """Subtract merged ΔW again (all merged adapters by default). Returns the names unmerged."""
    chosen = None if names is None else _check_names(model, names)
    done: dict[str, None] = {}
    for _, layer in adapted_layers(model):
        done.update(dict.fromkeys(layer.unmerge(chosen)))
    return list(done)


def trainable_parameters(model: nn.Module) -> dict[str, Any]:
    """``{"trainable", "total", "share", "per_adapter"}`` (the share is trainable / total, HF-PEFT style).

    ``per_adapter[name]`` counts all parameters that adapter owns, trainable or frozen right now
    (the numbers METHODS.md's formulas give); ``trainable`` counts ``requires_grad`` parameters
    of the whole model (adapters plus anything the caller unfroze).
    """
    seen: set[int] = set()
    total = trainable = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    per_adapter: dict[str, int] = {}
    for _, layer in adapted_layers(model):
        for adapter_name, adapter in layer.adapters.items():
            per_adapter[adapter_name] = per_adapter.get(adapter_name, 0) + adapter.num_parameters()
    for _, wrapper in saved_modules(model):
        for adapter_name, module_copy in wrapper.modules_to_save.items():
            size = sum(p.numel() for p in module_copy.parameters())
            per_adapter[adapter_name] = per_adapter.get(adapter_name, 0) + size
    return {
        "trainable": trainable,
        "total": total,
        "share": trainable / total if total else 0.0,
        "per_adapter": per_adapter,
    }


def regularization(model: nn.Module, names: str | Sequence[str] | None = None) -> torch.Tensor:
    """Sum of the methods' training penalties (SALT ``reg``, OWLoRA orthogonality) over layers.

    Default: every adapter that has trainable parameters. Returns a 0-dim tensor (0 if none).
    """
    chosen = None if names is None else _check_names(model, names)
    terms: list[torch.Tensor] = []
    for _, layer in adapted_layers(model):
        for adapter_name, adapter in layer.adapters.items():
            wanted = chosen is None and any(p.requires_grad for p in adapter.parameters())
            if wanted or (chosen is not None and adapter_name in chosen):
                term = adapter.regularization()
                if term is not None:
                    terms.append(term)
    if not terms:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        return torch.zeros((), device=device)
    return torch.stack(terms).sum()


def merge_and_unload(model: nn.Module, names: str | Sequence[str] | None = None) -> nn.Module:
    """HF PEFT's ``merge_and_unload``: merge ``names`` (default: the active adapters), drop the rest and
    every wrapper; returns ``model`` as a plain model whose state-dict keys are the base model's.

    Unlike :func:`detach`, nothing is un-merged first: the merged ΔW stays in the weights. A
    ``modules_to_save`` module becomes the copy that was running (of a merged adapter), else the original.
    """
    chosen = active_adapters(model) if names is None else _check_names(model, names)
    merge(model, chosen)
    merged = set(chosen) | {n for _, layer in adapted_layers(model) for n in layer.merged}
    for layer_name, layer in list(adapted_layers(model)):
        _set_submodule(model, layer_name, layer.base_layer)
    for module_name, wrapper in list(saved_modules(model)):
        running = [n for n in wrapper.active if n in merged]
        kept = wrapper.modules_to_save[running[-1]] if running else wrapper.original_module
        _set_submodule(model, module_name, kept)
    return model


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager: inside it the model computes the base model alone (HF PEFT's ``disable_adapter``).

    Merged adapters are un-merged on entry and merged again on exit (the weights come back a float32
    rounding away from before); which adapters are active is restored on exit.
    """
    layers = [layer for _, layer in adapted_layers(model)]
    wrappers = [wrapper for _, wrapper in saved_modules(model)]  # modules_to_save: the originals run
    merged = [list(layer.merged) for layer in layers]
    try:
        for layer in layers:
            layer.unmerge()
            layer.disabled = True
            layer._refresh()
        for wrapper in wrappers:
            wrapper.disabled = True
        yield model
    finally:
        for layer, names in zip(layers, merged):
            layer.disabled = False
            layer.merge(names)
            layer._refresh()
        for wrapper in wrappers:
            wrapper.disabled = False


def print_trainable_parameters(model: nn.Module, file: TextIO | None = None) -> str:
    """Write HF PEFT's one-line summary (``trainable params: … || all params: … || trainable%: …``).

    Returns the line too; the numbers are :func:`trainable_parameters`' ``trainable`` and ``total``.
    """
    info = trainable_parameters(model)
    line = (
        f"trainable params: {info['trainable']:,d} || all params: {info['total']:,d} "
        f"|| trainable%: {100 * info['share']:.4f}"
    )
    (file or sys.stdout).write(line + "\n")
    return line
