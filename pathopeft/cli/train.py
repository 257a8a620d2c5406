"""``pathopeft train CONFIG``: train a MIL model (CoMEL, ABMIL, TransMIL) on feature bags."""

from __future__ import annotations

from pathlib import Path

import click

from pathopeft.cli._common import handle_errors, load_or_exit, set_option
from pathopeft.config.train import TrainConfig


@click.command("train")
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@set_option
@handle_errors
def train(config: Path, overrides: tuple[str, ...]) -> None:
    """Train the MIL model of CONFIG; writes runs/<run.name>/ (checkpoints, metrics, predictions).

    \b
    Examples:
      pathopeft train configs/camelyon_comel.yaml
      pathopeft train configs/camelyon_comel.yaml --set data.annotations=annotations/
      pathopeft train configs/abmil.yaml --set trainer.devices=2 --set trainer.strategy=ddp
    """
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    from pathopeft.mil.train import train as run_training

    cfg = load_or_exit(TrainConfig, config, overrides)
    run_dir = run_training(cfg)
    if rank_zero_only.rank == 0:
        click.echo(f"run written to {run_dir} (test metrics: {run_dir / 'test_metrics.json'})")
