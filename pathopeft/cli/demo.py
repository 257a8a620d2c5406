"""``pathopeft demo``: synthetic cohort → tile → train → add a task → heatmaps → segmentation, offline."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from pathopeft.cli._common import EXIT_FAILED, handle_errors

__all__ = ["demo"]


@click.command("demo")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("demo"),
    show_default=True,
    help="Demo folder (everything is written inside it).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same numbers.")
@click.option(
    "--n-slides", type=click.IntRange(min=6), default=12, show_default=True, help="Slides per task."
)
@click.option(
    "--size", type=click.IntRange(min=1024), default=4096, show_default=True, help="Slide side in pixels."
)
@click.option(
    "--epochs", type=click.IntRange(min=1), default=8, show_default=True, help="MIL epochs per task."
)
@click.option(
    "--backbone", default="resnet18", show_default=True, help="timm tile encoder (random init, offline)."
)
@click.option("--overwrite", is_flag=True, help="Redo every stage instead of skipping finished ones.")
@handle_errors
def demo(out: Path, seed: int, n_slides: int, size: int, epochs: int, backbone: str, overwrite: bool) -> None:
    """Run the whole product on a synthetic two-task cohort, on the CPU, without downloads.

    Synthesises slides for two tasks with different lesion types, then runs the real commands in
    OUT: synth, tile, manifest, train (CoMEL, task 1), add-task (OWLoRA, task 2), heatmap (both
    tasks), segment train/predict. Prints a line per stage and a table (bag and instance AUC per
    task, backward transfer, where the heatmaps, GeoJSON, TIFF and plots are); writes
    OUT/demo_summary.json. A rerun skips finished stages. The defaults cost about 4 minutes of CPU
    time (benchmarks/bench_demo.py); --n-slides/--size/--epochs make it smaller or larger.

    \b
    Examples:
      pathopeft demo
      pathopeft demo --out /tmp/demo --seed 1
    """
    from pathopeft.demo import DemoError, DemoSettings, run_demo

    settings = DemoSettings(seed=seed, n_slides=n_slides, size=size, epochs=epochs, backbone=backbone)
    click.echo(f"pathopeft demo in {out} (seed {seed}; every command's output goes to {out / 'logs'}/)")
    try:
        run_demo(out, settings, overwrite=overwrite, echo=click.echo)
    except DemoError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_FAILED)
