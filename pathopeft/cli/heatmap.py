"""``pathopeft heatmap CHECKPOINT``: localisation exports (QuPath GeoJSON, PNG, CSV, TIFF) + FROC."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from pathopeft.cli._common import (
    EXIT_FAILED,
    EXIT_USAGE,
    dry_run_option,
    handle_errors,
    load_or_exit,
    report_dry_run,
    set_option,
)
from pathopeft.config import ConfigError, validate
from pathopeft.config.heatmap import FORMATS, HeatmapConfig


@click.command("heatmap")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--slides", required=True, type=click.Path(exists=True, path_type=Path), help="Slide folder (or CSV)."
)
@click.option("--features", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--task",
    default=None,
    help="Task of the checkpoint (default: its last); 'auto' routes each slide to its task.",
)
@click.option("--class", "class_name", default=None, help="Class shown (default: the task's last).")
@click.option("--score", type=click.Choice(["attention", "probability"]), default=None)
@click.option("--normalize", type=click.Choice(["none", "minmax", "rank"]), default=None)
@click.option("--gate", type=click.Choice(["bag_probability", "none"]), default=None)
@click.option("--threshold", type=float, default=None, help="Region threshold on the shown scale.")
@click.option("--formats", default=None, help=f"Comma-separated subset of {','.join(FORMATS)}.")
@click.option(
    "--annotations", type=click.Path(exists=True, file_okay=False), default=None, help="Enables FROC."
)
@click.option("--overwrite", is_flag=True, default=False, help="Redo slides whose outputs exist.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
@set_option
@dry_run_option
@handle_errors
def heatmap(
    checkpoint: Path,
    slides: Path,
    features: Path,
    out: Path,
    task: str | None,
    class_name: str | None,
    score: str | None,
    normalize: str | None,
    gate: str | None,
    threshold: float | None,
    formats: str | None,
    annotations: str | None,
    overwrite: bool,
    config_path: Path | None,
    overrides: tuple[str, ...],
    dry_run: bool,
) -> None:
    """Write OUT/manifest.csv and per slide <id>.{json,csv,geojson,png,tiff} (HEATMAP_CONTRACT.md).

    \b
    Examples:
      pathopeft heatmap runs/abmil/best.ckpt --slides slides/ --features tiles/features --out heatmaps/
      pathopeft heatmap best.ckpt --slides s/ --features f/ --out h/ --score probability --normalize none
      pathopeft heatmap best.ckpt --slides s/ --features f/ --out h/ --annotations lesions/   # + FROC
    """
    flags = {
        "task": task,
        "class_name": class_name,
        "score": score,
        "normalize": normalize,
        "gate": gate,
        "threshold": threshold,
        "annotations": annotations,
        "formats": [f.strip() for f in formats.split(",") if f.strip()] if formats else None,
        "overwrite": True if overwrite else None,
    }
    cfg = load_or_exit(HeatmapConfig, config_path, overrides)
    given = {k: v for k, v in flags.items() if v is not None}
    if given:  # flags win over the file and --set; validated like them (a bad value exits 2)
        try:
            cfg = validate(HeatmapConfig, {**cfg.model_dump(), **given}, "command-line options")
        except ConfigError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_USAGE)
    if dry_run:
        report_dry_run(cfg)
        return
    from pathopeft.heatmaps.processor import run_heatmaps

    def report(row: dict[str, object]) -> None:
        text = f"{row['slide_id']}: {row['status']}"
        if row["status"] == "error":
            text += f" ({row['error']})"
        else:
            text += f" (P({row['class']}) = {float(row['bag_probability']):.3f}, {row['n_regions']} regions)"
        click.echo(text, err=row["status"] == "error")

    result = run_heatmaps(checkpoint, slides, features, out, cfg, on_slide=report)
    click.echo(
        f"{result.n_ok} ok, {result.n_error} error(s) in {result.seconds:.1f} s -> {out / 'manifest.csv'}"
    )
    if result.froc is not None:
        if result.froc.get("froc") is None:
            click.echo(f"FROC not computed: {result.froc.get('error')}", err=True)
        else:
            froc, n = result.froc["froc"], result.froc["n_slides"]
            click.echo(f"FROC = {froc:.4f} over {n} slides -> {out / 'froc.json'}")
    if result.n_ok == 0:
        sys.exit(EXIT_FAILED)
