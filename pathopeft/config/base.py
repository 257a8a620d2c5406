"""Typed configuration: YAML files + ``--set a.b=c`` overrides, validated by pydantic.

Every command has one schema (a :class:`StrictModel`); unknown keys are errors, because a typo in a
config that is silently ignored costs a user a training run. Errors name the file and the dotted key.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from pathopeft.files import atomic_write_text

__all__ = [
    "ConfigError",
    "StrictModel",
    "apply_overrides",
    "dump_config",
    "load_config",
    "parse_override",
    "read_yaml",
]

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A configuration problem the user must fix (exit status 2 on the command line)."""


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are rejected, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a syntax error or a non-mapping top level names the file (and line)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into its key path and YAML-typed value (``3`` → int, ``[1,2]`` → list)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE with a dotted key, e.g. model.rank=8")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML: {exc}") from exc
    return key.split("."), value


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``a.b=c`` override applied.

    Missing intermediate mappings are created (the schema then decides whether the key exists);
    list items are addressed by index (``sweep.0.lr=1e-3``).
    """
    result: dict[str, Any] = _deep_copy(data)
    for text in overrides:
        path, value = parse_override(text)
        node: Any = result
        for depth, part in enumerate(path[:-1]):
            node = _child(node, part, path[: depth + 1], text, create=True)
        last = path[-1]
        if isinstance(node, list):
            index = _list_index(node, last, text)
            node[index] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise ConfigError(f"--set {text!r}: {'.'.join(path[:-1])} is a value, not a section")
    return result


def load_config(
    schema: type[M],
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
    *,
    base: Mapping[str, Any] | None = None,
) -> M:
    """Load ``path`` (optional) on top of ``base`` (optional), apply overrides, validate into ``schema``."""
    data: dict[str, Any] = _deep_copy(base or {})
    source = "command-line options"
    if path is not None:
        data = _merge(data, read_yaml(path))
        source = str(path)
    overrides = list(overrides)
    if not overrides:
        return validate(schema, data, source)
    # Apply overrides to the *resolved* config (defaults filled in), so `--set sweep.1=...` or
    # `--set trainer.devices=2` work even when the file does not spell those keys out. A file that
    # only becomes valid through its overrides (a required key given by --set) is handled too.
    try:
        resolved = validate(schema, data, source).model_dump()
    except ConfigError:
        resolved = data
    source = f"{source} with --set {' '.join(overrides)}"
    return validate(schema, apply_overrides(resolved, overrides), source)


def validate(schema: type[M], data: Mapping[str, Any], source: str) -> M:
    """Validate ``data`` into ``schema``; all problems are reported at once with dotted keys."""
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration ({exc.error_count()} problem(s))"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<top level>"
        if err["type"] == "extra_forbidden":
            lines.append(f"  - {key}: unknown key")
        else:
            got = err.get("input")
            hint = ""
            if err["type"] == "string_type" and isinstance(got, bool | int | float):
                # YAML 1.1 reads off/no/yes/on as booleans and 1e-3 as a number
                hint = (
                    f"; YAML read the value as a {type(got).__name__}: quote it to keep the text "
                    f"(in a file: {err['loc'][-1]}: 'off'; on the command line: --set {key}='\"off\"')"
                )
            lines.append(f"  - {key}: {err['msg']} (got {got!r}){hint}")
    return "\n".join(lines)


def dump_config(config: BaseModel, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically) so a run can be reproduced from its folder."""
    text = yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
    atomic_write_text(path, text)


def _merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = _deep_copy(value)
    return out


def _deep_copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


def _child(node: Any, part: str, path: list[str], text: str, *, create: bool) -> Any:
    if isinstance(node, list):
        return node[_list_index(node, part, text)]
    if not isinstance(node, dict):
        raise ConfigError(f"--set {text!r}: {'.'.join(path[:-1])} is a value, not a section")
    if part not in node or node[part] is None:
        if not create:
            raise ConfigError(f"--set {text!r}: unknown key {'.'.join(path)}")
        node[part] = {}
    return node[part]


def _list_index(node: list[Any], part: str, text: str) -> int:
    try:
        index = int(part)
    except ValueError:
        raise ConfigError(f"--set {text!r}: {part!r} must be a list index") from None
    if not -len(node) <= index < len(node):
        raise ConfigError(f"--set {text!r}: index {index} is out of range (list of {len(node)})")
    return index
