"""``pathopeft add-task CHECKPOINT CONFIG``: add a diagnostic task to a trained MIL model."""

from __future__ import annotations

from pathlib import Path

import click

from pathopeft.cli._common import dry_run_option, handle_errors, load_or_exit, report_dry_run, set_option
from pathopeft.config.train import TrainConfig


@click.command("add-task")
@click.argument("checkpoint", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@set_option
@click.option("--resume", is_flag=True, help="Continue an interrupted add-task run from its last.ckpt.")
@dry_run_option
@handle_errors
def add_task(checkpoint: Path, config: Path, overrides: tuple[str, ...], resume: bool, dry_run: bool) -> None:
    """Add CONFIG's task to the model in CHECKPOINT without retraining it (the checkpoint is only read).

    CONFIG is an ordinary `pathopeft train` config for the new task (its manifest, bags, classes,
    annotations); `continual.*` says how it is added (default OWLoRA, rank 16). The base model,
    every earlier adapter and head stay frozen. Writes runs/<run.name>/ whose checkpoint holds all
    tasks, and evaluation.json with every task's metrics afterwards.

    \b
    Examples:
      pathopeft add-task runs/comel_camelyon16/best.ckpt configs/paip_liver.yaml
      pathopeft add-task runs/a/best.ckpt liver.yaml --set continual.rank=8 --set run.name=liver
    """
    from pathopeft.mil.continual.add_task import add_task as run_add_task

    cfg = load_or_exit(TrainConfig, config, overrides)
    if dry_run:  # the config and the request against the checkpoint (names, classes, model type)
        from pathopeft.mil.continual.add_task import _read, check_request

        check_request(_read(checkpoint), checkpoint, cfg)
        report_dry_run(cfg, f"checkpoint {checkpoint}: task {cfg.data.task!r} can be added")
        return
    run_dir = run_add_task(checkpoint, cfg, resume=resume)
    click.echo(f"run written to {run_dir} (every task's metrics: {run_dir / 'evaluation.json'})")
