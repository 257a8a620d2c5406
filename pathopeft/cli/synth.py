"""``pathopeft synth OUT``: a synthetic cohort of pyramidal slides, lesion GeoJSON and labels.csv."""

from __future__ import annotations

from pathlib import Path

import click

from pathopeft.cli._common import handle_errors, load_or_exit, set_option
from pathopeft.config.wsi import SynthConfig


@click.command("synth")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--n", "n", type=int, default=None, help="Number of slides (default 4).")
@click.option("--seed", type=int, default=None, help="Random seed (default 0); same seed, same files.")
@click.option("--size", type=int, default=None, help="Width and height in pixels (default 8192).")
@click.option("--width", type=int, default=None, help="Level-0 width in pixels.")
@click.option("--height", type=int, default=None, help="Level-0 height in pixels.")
@click.option("--mpp", type=float, default=None, help="µm/px written to the files (default 0.5).")
@click.option("--no-mpp", is_flag=True, help="Write no µm/px metadata (to test --mpp handling).")
@click.option(
    "--lesion-fraction", type=float, default=None, help="Share of slides with lesions (default 0.5)."
)
@click.option("--tile", type=int, default=None, help="TIFF tile size, a multiple of 16 (default 256).")
@click.option("--levels", type=int, default=None, help="Pyramid levels (default: halve until one tile).")
@click.option("--quality", type=int, default=None, help="JPEG quality 1-100 (default 80).")
@click.option(
    "--modality",
    type=click.Choice(["brightfield", "fluorescence", "blank"]),
    default=None,
    help="brightfield H&E-like (default), fluorescence (dark background) or blank (glass only).",
)
@click.option(
    "--lesion",
    type=click.Choice(["dense", "vesicular"]),
    default=None,
    help="Lesion look: dense (crowded dark nuclei, default) or vesicular (few large pale nuclei).",
)
@click.option(
    "--classes",
    default=None,
    metavar="NORMAL,TUMOR",
    help="Class names written to labels.csv (default normal,tumor), e.g. liver_normal,liver_tumor.",
)
@click.option(
    "--feature-tasks",
    default=None,
    metavar="NAMES",
    help="Instead of slides: feature bags of a continual task sequence, e.g. breast,liver,colon "
    "(one lesion type per organ; see pipelines/synthetic_3task.yaml).",
)
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
@set_option
@handle_errors
def synth(out: Path, config_path: Path | None, overrides: tuple[str, ...], **flags: object) -> None:
    """Write synthetic pyramidal JPEG TIFF slides to OUT (+ annotations/*.geojson, labels.csv)."""
    tasks = flags.pop("feature_tasks")
    if tasks:
        from pathopeft.mil.synthetic import make_task_sequence

        names = tuple(t.strip() for t in str(tasks).split(",") if t.strip())
        seed = int(flags["seed"] or 0)  # type: ignore[call-overload]
        cohorts = make_task_sequence(out, names, seed=seed)
        for c in cohorts:
            click.echo(
                f"wrote {len(c.slide_ids)} bags to {c.root} (ideal instance AUC {c.ideal_instance_auc:.3f})"
            )
        return
    from pathopeft.wsi.synth import make_synthetic_cohort

    size = flags.pop("size")
    no_mpp = flags.pop("no_mpp")
    classes = flags.pop("classes")
    if size is not None:
        flags["width"] = flags["width"] or size
        flags["height"] = flags["height"] or size
    sets = [f"{key}={value}" for key, value in flags.items() if value is not None]
    if no_mpp:
        sets.append("mpp=null")
    if classes:
        names = [c.strip() for c in str(classes).split(",")]
        sets.append("classes=[" + ",".join(names) + "]")
    cfg = load_or_exit(SynthConfig, config_path, [*sets, *overrides])
    infos = make_synthetic_cohort(out, cfg)
    n_tumor = sum(info.label == "tumor" for info in infos)
    click.echo(f"wrote {len(infos)} slides ({n_tumor} tumor, {len(infos) - n_tumor} normal) to {out}")
