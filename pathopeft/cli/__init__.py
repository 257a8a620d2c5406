"""The ``pathopeft`` command line: parse arguments, load a config, call one stage function.

Subcommands live one per module in this package and are imported only when invoked, so
``pathopeft --help`` stays fast and a broken optional stage cannot take the others down.
Exit status: 0 success, 1 the command failed, 2 bad usage or configuration.
"""

from __future__ import annotations

import importlib
from typing import Any

import click

from pathopeft import __version__

# command name -> "module:attribute" (a click.Command). Register only commands that work.
COMMANDS: dict[str, str] = {
    "tile": "pathopeft.cli.tile:tile",
    "synth": "pathopeft.cli.synth:synth",
    "train": "pathopeft.cli.train:train",
    "manifest": "pathopeft.cli.manifest:manifest",
    "segment": "pathopeft.cli.segment:segment",
    "add-task": "pathopeft.cli.add_task:add_task",
    "tasks": "pathopeft.cli.tasks:tasks",
    "heatmap": "pathopeft.cli.heatmap:heatmap",
    "view": "pathopeft.cli.view:view",
    "demo": "pathopeft.cli.demo:demo",
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        module = importlib.import_module(module_name)
        command: Any = getattr(module, attr)
        return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pathopeft")
def main() -> None:
    """pathopeft: tile whole-slide images, train MIL models, adapt encoders with PEFT."""
