"""``pathopeft manifest``: a training manifest (slide_id,[case_id,]label,split|fold) from labels + slides."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from pathopeft.cli._common import handle_errors


@click.command("manifest")
@click.argument("source", required=False, type=click.Path(exists=True, path_type=Path))
@click.option(
    "--labels",
    required=True,
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="CSV with slide_id,label[,case_id|patient|case_submitter_id] (or CAMELYON16's reference.csv).",
)
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Manifest CSV.")
@click.option(
    "--val-fraction", type=float, default=0.2, show_default=True, help="Stratified validation share."
)
@click.option("--test-fraction", type=float, default=0.0, show_default=True, help="Stratified test share.")
@click.option("--folds", type=int, default=None, help="Write a fold column (K folds) instead of a split.")
@click.option(
    "--split",
    type=click.Choice(["train", "val", "test"]),
    default=None,
    help="Put every slide in this split (e.g. a held-out test cohort).",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@handle_errors
def manifest(
    source: Path | None,
    labels: Path,
    out: Path,
    val_fraction: float,
    test_fraction: float,
    folds: int | None,
    split: str | None,
    seed: int,
    overwrite: bool,
) -> None:
    """Build a training manifest (slide_id,label,split|fold) from labels and slides.

    Joins the labels with the slides of SOURCE (a `pathopeft tile` output folder, a folder of bags
    or slides, or a CSV with slide_id) and assigns a seeded stratified split or folds, per case
    (patient): all slides of a case land in one split or fold. The case comes from the labels
    file's case_id/patient/case_submitter_id column, else from a TCGA barcode's first 12
    characters (both written as a case_id column), else each slide is its own case. Without
    SOURCE every labelled slide is listed.

    \b
    Examples:
      pathopeft manifest tiles/ --labels labels.csv --out manifest.csv
      pathopeft manifest --labels reference.csv --split test --out data_manifests/camelyon16_test.csv
    """
    from pathopeft.config import ConfigError
    from pathopeft.files import atomic_write_text
    from pathopeft.mil.manifest import build_manifest

    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} exists; pass --overwrite to replace it")
    table = build_manifest(
        labels,
        source,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        folds=folds,
        split=split,
        seed=seed,
    )
    atomic_write_text(out, table.to_csv(index=False))
    column = "fold" if "fold" in table.columns else "split"
    counts = ", ".join(f"{k}: {v}" for k, v in table[column].value_counts().sort_index().items())
    cases = f", {table['case_id'].nunique()} cases" if "case_id" in table.columns else ""
    click.echo(f"wrote {len(table)} slides{cases} to {out} ({column} {counts})")
