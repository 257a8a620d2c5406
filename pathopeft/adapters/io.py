"""Save and load one adapter alone, in HF PEFT's folder layout.

``adapter_config.json``: format/version, method, name, options, target pattern, one entry per
adapted layer (kind, weight shape, per-layer meta such as SVFit's rank, base-weight hash) and
``base_hash`` (sha256 over the sorted ``"<layer>:<layer hash>"`` lines, see :func:`layer_hash`).
``adapter_model.safetensors``: every parameter AND buffer of the adapter (SVD factors included:
recomputing an SVD elsewhere can flip signs), keyed ``<layer name>.<tensor name>``; optional
"extra" base parameters the caller also trained (norms, positional embeddings) under
``__extra__.<parameter name>``; the adapter's ``modules_to_save`` copies (every parameter and
buffer) under ``__module__.<module name>.<key>``, listed in the config as
``"modules_to_save": {module name: class name}`` and covered by the same metadata hash.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from pathopeft.adapters.base import AdaptedLayer, AdapterError, LayerGeometry, layer_hash
from pathopeft.adapters.model import (
    _freeze_base,
    _set_submodule,
    adapted_layers,
    adapter_modules,
    adapter_names,
    install_copies,
    saved_modules,
)
from pathopeft.adapters.registry import NAME_PATTERN, make_config
from pathopeft.adapters.saved import INTERNAL_NAMES, SavedModule, check_module_to_save, fresh_copy
from pathopeft.files import atomic_path, atomic_write_json

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "base_hash", "load", "read_adapter_config", "save"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
EXTRA_PREFIX = "__extra__."
MODULE_PREFIX = "__module__."
LAYER_KEYS = ("kind", "weight_shape", "hash")  # what every per-layer entry must have
FORMAT = "pathopeft-adapter"
VERSION = 1


def base_hash(layer_hashes: dict[str, str]) -> str:
    """One hash for all adapted layers: sha256 of ``"name:hash\\n"`` lines in sorted name order."""
    text = "".join(f"{name}:{layer_hashes[name]}\n" for name in sorted(layer_hashes))
    return hashlib.sha256(text.encode()).hexdigest()


HASH_KEY = "pathopeft_hash"


def content_hash(document: dict[str, Any], tensor_names: list[str]) -> str:
    """sha256 over the config document (without its free-text ``name``) and the sorted tensor names.

    Stored in the safetensors metadata: an edit of the options (alpha, dropout, wavelet ...), of a
    layer entry or a stray tensor makes the two files disagree and the load is refused.
    """
    body = {k: v for k, v in document.items() if k != "name"}
    text = json.dumps({"document": body, "tensors": sorted(tensor_names)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _plain_name(parameter_name: str) -> str:
    """Parameter name as in the unwrapped model (``x.qkv.base_layer.bias`` -> ``x.qkv.bias``)."""
    return parameter_name.replace(".base_layer.", ".").replace(".original_module.", ".")


def save(
    model: nn.Module, out_dir: str | Path, name: str = "default", *, extra_parameters: str | None = None
) -> Path:
    """Write adapter ``name`` to ``out_dir`` (config JSON + safetensors, each written atomically).

    ``extra_parameters``: a full-match regex over (unwrapped) parameter names of base parameters
    to store alongside, e.g. ``r".*norm.*|pos_embed"`` when those were trained too; :func:`load`
    copies them back. Adapter parameters never match it.

    The base hash is the one recorded when each layer was wrapped, so saving works while merged.
    If a layer was never merged and its current weights no longer hash the same (the base was
    trained or edited after attach), saving is refused: the adapter would not reproduce the
    outputs on the original base.
    """
    if name not in adapter_names(model):
        raise AdapterError(f"no adapter named {name!r} on this model; it has {adapter_names(model)}")
    out = Path(out_dir)
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, Any] = {}
    config = None
    num_parameters = 0
    for layer_name, layer, adapter in adapter_modules(model, name):
        if layer.base_changed():
            raise AdapterError(
                f"{layer_name}: the base weights changed since the adapter was attached; "
                "an adapter alone cannot reproduce this model (save the full model instead)"
            )
        if config is not None and adapter.adapter_config != config:  # attach refuses this; guard edits
            raise AdapterError(f"{layer_name}: adapter {name!r} has other options here than on other layers")
        config = adapter.adapter_config
        num_parameters += adapter.num_parameters()
        for key, tensor in adapter.state_dict().items():
            tensors[f"{layer_name}.{key}"] = tensor.detach().to("cpu").contiguous().clone()
        g = layer.geometry
        layers[layer_name] = {
            "kind": g.kind,
            "weight_shape": list(g.weight_shape),
            "meta": adapter.meta(),
            "hash": layer.base_hash,
        }
    assert config is not None
    extras = _extra_tensors(model, extra_parameters)
    tensors.update({EXTRA_PREFIX + key: value for key, value in extras.items()})
    saved: dict[str, str] = {}
    for module_name, wrapper in saved_modules(model):
        if name in wrapper.modules_to_save:
            saved[module_name] = type(wrapper.original_module).__name__
            for key, tensor in wrapper.modules_to_save[name].state_dict().items():
                tensors[f"{MODULE_PREFIX}{module_name}.{key}"] = (
                    tensor.detach().to("cpu").contiguous().clone()
                )
    document = {
        "format": FORMAT,
        "version": VERSION,
        "method": config.method,
        "name": name,
        "options": config.model_dump(mode="json"),
        "base_hash": base_hash({k: v["hash"] for k, v in layers.items()}),
        "layers": layers,
        "num_parameters": num_parameters,
        "extra_parameters": sorted(extras),
        "modules_to_save": saved,
    }
    with atomic_path(out / WEIGHTS_NAME) as tmp:
        metadata = {"format": "pt", "method": config.method, "name": name}
        metadata[HASH_KEY] = content_hash(document, list(tensors))
        save_file(tensors, str(tmp), metadata=metadata)
    atomic_write_json(out / CONFIG_NAME, document)
    return out


def _extra_tensors(model: nn.Module, pattern: str | None) -> dict[str, torch.Tensor]:
    if pattern is None:
        return {}
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise AdapterError(f"invalid extra_parameters pattern {pattern!r}: {exc}") from None
    found = {
        _plain_name(n): p.detach().to("cpu").contiguous().clone()
        for n, p in model.named_parameters()
        if ".adapters." not in n and ".modules_to_save." not in n and regex.fullmatch(_plain_name(n))
    }
    if not found:
        raise AdapterError(f"extra_parameters pattern {pattern!r} matched no base parameter")
    return found


def read_adapter_config(path: str | Path) -> dict[str, Any]:
    """Read and sanity-check ``adapter_config.json`` from a folder (or the file itself)."""
    path = Path(path)
    file = path / CONFIG_NAME if path.is_dir() else path
    if not file.is_file():
        raise AdapterError(f"{file}: adapter config not found")
    try:
        document = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{file}: not valid JSON: {exc}") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        found = document.get("format") if isinstance(document, dict) else type(document).__name__
        raise AdapterError(f"{file}: not a pathopeft adapter (format={found!r})")
    for key in ("method", "name", "options", "layers"):
        if key not in document:
            raise AdapterError(f"{file}: missing key {key!r}")
    if not isinstance(document["options"], dict) or not isinstance(document["layers"], dict):
        raise AdapterError(f"{file}: 'options' and 'layers' must be JSON objects")
    if not document["layers"]:
        raise AdapterError(f"{file}: 'layers' is empty: the file adapts no layer")
    if not isinstance(document["name"], str) or not NAME_PATTERN.fullmatch(document["name"]):
        raise AdapterError(
            f"{file}: field 'name' {document['name']!r} may only use letters, digits, '_' and '-'"
        )
    if not isinstance(document["method"], str):
        raise AdapterError(f"{file}: field 'method' must be a string")
    extras = document.get("extra_parameters", [])
    if not isinstance(extras, list) or not all(isinstance(k, str) for k in extras):
        raise AdapterError(f"{file}: field 'extra_parameters' must be a list of parameter names")
    to_save = document.get("modules_to_save", {})
    if not isinstance(to_save, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in to_save.items()
    ):
        raise AdapterError(f"{file}: field 'modules_to_save' must map module names to class names")
    for module_name in to_save:
        if not module_name or any(part in f".{module_name}." for part in INTERNAL_NAMES):
            raise AdapterError(
                f"{file}: modules_to_save {module_name!r} names a module inside an adapter wrapper"
            )
        nested = [o for o in [*to_save, *document["layers"]] if o.startswith(module_name + ".")]
        if nested or module_name in document["layers"]:
            raise AdapterError(
                f"{file}: modules_to_save {module_name!r} overlaps {(nested or [module_name])[0]!r} "
                "(a module is saved whole once, and never holds or is an adapted layer)"
            )
    for layer_name, info in document["layers"].items():
        missing = [k for k in LAYER_KEYS if not isinstance(info, dict) or k not in info]
        if missing:
            raise AdapterError(f"{file}: layer {layer_name!r} lacks {', '.join(missing)}")
        where = f"{file}: layer {layer_name!r}:"
        if any(part in f".{layer_name}." for part in INTERNAL_NAMES):
            raise AdapterError(f"{where} names a module inside an adapter wrapper")
        if info["kind"] not in LayerGeometry.SUPPORTED:
            raise AdapterError(f"{where} field 'kind' must be one of {LayerGeometry.SUPPORTED}")
        shape = info["weight_shape"]
        if not isinstance(shape, list) or not shape or not all(_positive_int(d) for d in shape):
            raise AdapterError(
                f"{where} field 'weight_shape' must be a list of positive integers, got {shape!r}"
            )
        if not isinstance(info["hash"], str):
            raise AdapterError(f"{where} field 'hash' must be a string")
        if not isinstance(info.get("meta", {}), dict):
            raise AdapterError(f"{where} field 'meta' must be a JSON object")
    saved = document.get("base_hash")
    if saved is not None and saved != base_hash({k: v["hash"] for k, v in document["layers"].items()}):
        raise AdapterError(f"{file}: field 'base_hash' does not match the layers' hashes (edited file?)")
    return document


def _inside_wrapper(model: nn.Module, module_name: str) -> bool:
    """Does ``module_name`` lie inside an adapted layer or a modules_to_save wrapper?"""
    wrappers = [n for n, _ in adapted_layers(model)] + [n for n, _ in saved_modules(model)]
    return any(module_name.startswith(f"{wrapped}.") for wrapped in wrappers)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_tensors(
    weights_file: Path, tensors: dict[str, torch.Tensor], expected: dict[str, Any]
) -> list[str]:
    """Unknown keys, non-float or non-finite tensors; dtypes that differ are cast with a warning."""
    problems = [f"unknown tensor {key!r}" for key in sorted(set(tensors) - set(expected))]
    for key, tensor in tensors.items():
        if key not in expected:
            continue
        if not expected[key].is_floating_point():  # e.g. BatchNorm's num_batches_tracked in a saved module
            if tensor.dtype != expected[key].dtype:
                problems.append(
                    f"tensor {key!r} has dtype {tensor.dtype}, the module uses {expected[key].dtype}"
                )
        elif not tensor.is_floating_point():
            problems.append(
                f"tensor {key!r} has dtype {tensor.dtype}; adapter tensors must be floating point"
            )
        elif not bool(torch.isfinite(tensor).all()):
            problems.append(f"tensor {key!r} holds NaN or infinite values")
        elif tensor.dtype != expected[key].dtype:
            warnings.warn(
                f"{weights_file}: tensor {key!r} is {tensor.dtype}, the adapter uses {expected[key].dtype}; "
                "cast on load",
                stacklevel=3,
            )
            tensors[key] = tensor.to(expected[key].dtype)
    return problems


def load(
    model: nn.Module,
    path: str | Path,
    *,
    name: str | None = None,
    trainable: bool = False,
    verify_hash: bool = True,
) -> str:
    """Attach the adapter saved in ``path`` to ``model``; return its name (``name`` renames it).

    The model must have every saved layer, with the same kind and weight shape, and (unless
    ``verify_hash=False``) base weights hashing as saved. The loaded adapter is active; it is
    frozen unless ``trainable``. Like :func:`attach`, every non-adapter parameter is frozen.
    """
    folder = Path(path)
    document = read_adapter_config(folder)
    weights_file = folder / WEIGHTS_NAME
    if not weights_file.is_file():
        raise AdapterError(f"{weights_file}: adapter weights not found")
    try:
        config = make_config(document["method"], **document["options"])
        config.check_patterns(document["layers"])
    except AdapterError as exc:
        raise AdapterError(f"{folder / CONFIG_NAME}: {exc}") from None
    name = name or document["name"]
    if not NAME_PATTERN.fullmatch(name):
        raise AdapterError(f"adapter name {name!r} may only use letters, digits, '_' and '-'")
    if name in adapter_names(model):
        raise AdapterError(f"an adapter named {name!r} is already attached; pass name= to rename")
    try:
        tensors = load_file(str(weights_file))
        with safe_open(str(weights_file), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for truncated/corrupt files
        raise AdapterError(f"{weights_file}: not a readable safetensors file ({exc})") from None
    stored = metadata.get(HASH_KEY)
    if stored is not None and stored != content_hash(document, list(tensors)):
        raise AdapterError(
            f"{folder}: {CONFIG_NAME} and {WEIGHTS_NAME} do not belong together (the options, layer entries "
            "or tensor names changed since saving)"
        )
    modules = dict(model.named_modules())
    built = []
    problems: list[str] = []
    for layer_name, info in document["layers"].items():
        module = modules.get(layer_name)
        if module is None:
            problems.append(f"{layer_name}: no such module in {type(model).__name__}")
            continue
        if _inside_wrapper(model, layer_name):
            problems.append(f"{layer_name}: lies inside an adapter wrapper; name the wrapped layer instead")
            continue
        layer = module if isinstance(module, AdaptedLayer) else None
        base = layer.base_layer if layer else module
        try:
            geometry = layer.geometry if layer else LayerGeometry.from_module(base, layer_name)
        except AdapterError as exc:
            problems.append(str(exc))
            continue
        if geometry.kind != info["kind"] or list(geometry.weight_shape) != list(info["weight_shape"]):
            problems.append(
                f"{layer_name}: saved for a {info['kind']} of weight shape {tuple(info['weight_shape'])}, "
                f"found a {geometry.kind} of shape {geometry.weight_shape}"
            )
            continue
        current_hash = layer.base_hash if layer else layer_hash(base)
        if verify_hash and current_hash != info["hash"]:
            problems.append(f"{layer_name}: base weights differ from the ones the adapter was trained on")
            continue
        built.append((layer_name, module, geometry, info))
    copies = []
    for module_name, class_name in document.get("modules_to_save", {}).items():
        module = modules.get(module_name)
        if module is None or _inside_wrapper(model, module_name):
            where = "no such module" if module is None else "lies inside an adapter wrapper"
            problems.append(f"modules_to_save {module_name}: {where} in {type(model).__name__}")
            continue
        original = module.original_module if isinstance(module, SavedModule) else module
        if type(original).__name__ != class_name:
            problems.append(
                f"modules_to_save {module_name}: saved from a {class_name}, found a {type(original).__name__}"
            )
            continue
        try:
            check_module_to_save(model, module_name, module, name, list(document["layers"]))
        except AdapterError as exc:
            problems.append(str(exc))
            continue
        copies.append((module_name, module, fresh_copy(module)))
    base_params = {
        _plain_name(n): p
        for n, p in model.named_parameters()
        if ".adapters." not in n and ".modules_to_save." not in n
    }
    for key in document.get("extra_parameters", []):
        target = base_params.get(key)
        saved = tensors.get(EXTRA_PREFIX + key)
        if target is None or saved is None:
            problems.append(
                f"extra parameter {key}: missing in the {'model' if saved is not None else 'file'}"
            )
        elif tuple(target.shape) != tuple(saved.shape):
            problems.append(
                f"extra parameter {key}: saved shape {tuple(saved.shape)}, model has {tuple(target.shape)}"
            )
    if problems:
        shown = "\n  ".join(problems[:10]) + ("\n  ..." if len(problems) > 10 else "")
        raise AdapterError(f"{folder}: cannot load adapter {document['name']!r} onto this model:\n  {shown}")
    ready = []  # every layer's module is built, filled and checked before the model is touched
    modules_built = []
    for layer_name, module, geometry, info in built:
        try:
            adapter = config.build(geometry, layer_name, meta=info.get("meta") or {})
        except AdapterError as exc:
            raise AdapterError(f"{folder / CONFIG_NAME}: {exc}") from None
        modules_built.append((layer_name, module, geometry, adapter))
    expected = {
        f"{layer_name}.{key}": value
        for layer_name, _, _, adapter in modules_built
        for key, value in adapter.state_dict().items()
    }
    expected.update({EXTRA_PREFIX + key: base_params[key] for key in document.get("extra_parameters", [])})
    expected.update(
        {
            f"{MODULE_PREFIX}{module_name}.{key}": value
            for module_name, _, module_copy in copies
            for key, value in module_copy.state_dict().items()
        }
    )
    problems = _check_tensors(weights_file, tensors, expected)
    if problems:
        shown = "\n  ".join(problems[:10]) + ("\n  ..." if len(problems) > 10 else "")
        raise AdapterError(f"{weights_file}: cannot load adapter {document['name']!r}:\n  {shown}")
    for layer_name, module, geometry, adapter in modules_built:
        prefix = f"{layer_name}."
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            adapter.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise AdapterError(f"{weights_file}: tensors for {layer_name} do not fit: {exc}") from None
        base = module.base_layer if isinstance(module, AdaptedLayer) else module
        if verify_hash and (reason := adapter.check_factors(geometry.as_matrix(base.weight))) is not None:
            raise AdapterError(f"{weights_file}: {layer_name}: {reason}")
        ready.append((layer_name, module, adapter))
    for module_name, _, module_copy in copies:
        prefix = f"{MODULE_PREFIX}{module_name}."
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            module_copy.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise AdapterError(
                f"{weights_file}: tensors for modules_to_save {module_name} do not fit: {exc}"
            ) from None
    for layer_name, module, adapter in ready:
        layer = module if isinstance(module, AdaptedLayer) else AdaptedLayer(module, layer_name)
        if layer is not module:
            _set_submodule(model, layer_name, layer)
        weight = layer.base_layer.weight
        adapter.to(device=weight.device)
        layer.add(name, adapter)
    install_copies(model, name, copies)
    with torch.no_grad():
        for key in document.get("extra_parameters", []):
            base_params[key].copy_(tensors[EXTRA_PREFIX + key])
    _freeze_base(model)
    for _, _, adapter in adapter_modules(model, name):
        adapter.requires_grad_(trainable)
    for _, _, module_copy in copies:
        module_copy.requires_grad_(trainable)
    hook = getattr(config, "after_load", None)
    if hook is not None:
        hook(model, name)
    return name
