"""``pathopeft train CONFIG|PIPELINE``: train a MIL model (CoMEL, ABMIL, TransMIL) or a task sequence."""

from __future__ import annotations

from pathlib import Path

import click

from pathopeft.cli._common import dry_run_option, handle_errors, load_or_exit, report_dry_run, set_option
from pathopeft.config.train import TrainConfig


@click.command("train")
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@set_option
@click.option(
    "--resume", is_flag=True, help="Continue an interrupted run (last.ckpt) or pipeline (last complete task)."
)
@dry_run_option
@handle_errors
def train(config: Path, overrides: tuple[str, ...], resume: bool, dry_run: bool) -> None:
    """Train the MIL model of CONFIG; writes runs/<run.name>/ (checkpoints, metrics, predictions).

    A file with a top-level `tasks:` list is a continual pipeline: task 1 is trained, the others
    are added in order with its `method:`, every task is evaluated after each, and
    runs/<run.name>/results/ gets the result matrices.

    \b
    Examples:
      pathopeft train configs/camelyon_comel.yaml
      pathopeft train configs/camelyon_comel.yaml --set data.annotations=annotations/
      pathopeft train configs/abmil.yaml --set trainer.devices=2 --set trainer.strategy=ddp
      pathopeft train pipelines/synthetic_3task.yaml --set method=finetune
    """
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    from pathopeft.mil.continual.pipeline import is_pipeline

    if config.is_file() and is_pipeline(config):
        from pathopeft.mil.continual.pipeline import run_pipeline

        if dry_run:
            from pathopeft.mil.continual.pipeline import PipelineConfig, task_configs

            pipeline = load_or_exit(PipelineConfig, config, overrides)
            out = Path(pipeline.run.root) / pipeline.run.name
            tasks = task_configs(pipeline, config, out)  # every task's config, resolved and checked
            report_dry_run(
                pipeline,
                *(f"task {i + 1}: {c.data.task} {list(c.data.classes)}" for i, c in enumerate(tasks)),
            )
            return

        out = run_pipeline(config, overrides, resume=resume)
        click.echo(f"pipeline written to {out} (results: {out / 'results' / 'summary.md'})")
        return
    from pathopeft.mil.train import train as run_training

    cfg = load_or_exit(TrainConfig, config, overrides)
    if dry_run:
        report_dry_run(cfg)
        return
    run_dir = run_training(cfg, resume=resume)
    if rank_zero_only.rank == 0:
        click.echo(f"run written to {run_dir} (test metrics: {run_dir / 'test_metrics.json'})")
