"""Pieces every subcommand shares: ``--set`` overrides, config loading and error-to-exit-code mapping."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import click
from pydantic import BaseModel

from pathopeft.config import ConfigError, load_config

__all__ = [
    "EXIT_FAILED",
    "EXIT_USAGE",
    "dry_run_option",
    "handle_errors",
    "load_or_exit",
    "report_dry_run",
    "set_option",
]

EXIT_FAILED = 1
EXIT_USAGE = 2

F = TypeVar("F", bound=Callable[..., Any])
M = TypeVar("M", bound=BaseModel)

set_option = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a config key (dotted path, YAML-typed value); repeatable.",
)

dry_run_option = click.option(
    "--dry-run",
    is_flag=True,
    help="Check the arguments and the config (every key validated), print the resolved config, do no work.",
)


def report_dry_run(config: BaseModel, *notes: str) -> None:
    """What ``--dry-run`` prints: the resolved, validated config as YAML, then any notes."""
    import yaml

    click.echo(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), nl=False)
    for note in notes:
        click.echo(note)
    click.echo("dry run: arguments and config are valid; nothing was run")


def load_or_exit(
    schema: type[M], path: str | Path | None, overrides: Iterable[str], *, base: dict[str, Any] | None = None
) -> M:
    """Load and validate a config; a config problem ends the command with status 2."""
    try:
        return load_config(schema, path, overrides, base=base)
    except ConfigError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_USAGE)


def handle_errors(func: F) -> F:
    """Map ``ConfigError`` to exit 2 and any other failure to exit 1, with a one-line message.

    Set ``PATHOPEFT_DEBUG=1`` to see the full traceback.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import os

        try:
            return func(*args, **kwargs)
        except ConfigError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_USAGE)
        except (click.exceptions.Exit, click.ClickException, SystemExit, KeyboardInterrupt):
            raise
        except Exception as exc:
            if os.environ.get("PATHOPEFT_DEBUG"):
                raise
            logging.getLogger("pathopeft").debug("command failed", exc_info=True)
            click.echo(f"error: {type(exc).__name__}: {exc}", err=True)
            sys.exit(EXIT_FAILED)

    return wrapper  # type: ignore[return-value]
