"""``pathopeft tasks CHECKPOINT``: the tasks a MIL checkpoint holds and how each one fared."""

from __future__ import annotations

from pathlib import Path

import click

from pathopeft.cli._common import handle_errors


@click.command("tasks")
@click.argument("checkpoint", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV instead of a table.")
@handle_errors
def tasks(checkpoint: Path, as_csv: bool) -> None:
    """One row per task: classes, negative class, manifest, adapter and size, parameters added, metrics.

    Metrics (ta = task-aware, cl = class-incremental) are those recorded on the task's test split
    when it was trained and after every later task.
    """
    from pathopeft.mil.continual.inspect import task_table

    table = task_table(checkpoint)
    if as_csv:
        click.echo(table.to_csv(index=False), nl=False)
        return
    for _, row in table.iterrows():
        click.echo(f"{row['task']}  [{row['classes']}]  negative: {row['negative_class'] or '-'}")
        click.echo(f"  manifest: {row['manifest'] or '-'}")
        click.echo(f"  adapters: {row['adapters']}  ({row['adapter_params']:,} params); "
                   f"parameters added: {row['params_added']:,}")  # fmt: skip
        for part in str(row["metrics"]).split("; "):
            click.echo(f"  {part}")
