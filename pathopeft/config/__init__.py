"""Typed, validated configuration shared by every command (schemas live in one module per command)."""

from pathopeft.config.base import (
    ConfigError,
    StrictModel,
    apply_overrides,
    dump_config,
    load_config,
    parse_override,
    read_yaml,
    validate,
)

__all__ = [
    "ConfigError",
    "StrictModel",
    "apply_overrides",
    "dump_config",
    "load_config",
    "parse_override",
    "read_yaml",
    "validate",
]
