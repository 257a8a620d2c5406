"""``pathopeft segment train | predict | compare``: parse, load the config, call one stage function."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from pathopeft.cli._common import dry_run_option, handle_errors, load_or_exit, report_dry_run, set_option

__all__ = ["segment"]


def _log_to_stderr() -> None:
    logger = logging.getLogger("pathopeft")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def _is_global_zero() -> bool:
    from pathopeft.seg.train import is_global_zero_env

    return is_global_zero_env()


def _scores(result: dict) -> str:
    return ", ".join(
        f"{k} {result[k]:.4f}" for k in ("dice", "iou", "hd95") if isinstance(result.get(k), float)
    )


@click.group("segment")
def segment() -> None:
    """PEFT segmentation: adapt a ViT/SAM/CNN encoder with an adapter and train a decoder."""


@segment.command("train")
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@set_option
@dry_run_option
@handle_errors
def train(config: Path, overrides: tuple[str, ...], dry_run: bool) -> None:
    """Train on the images/masks in CONFIG's data section; writes runs/<name>/."""
    from pathopeft.config.segment import SegmentTrainConfig

    cfg = load_or_exit(SegmentTrainConfig, config, overrides)
    if dry_run:
        report_dry_run(cfg)
        return
    from pathopeft.seg.train import describe_trainable, train_segmentation

    _log_to_stderr()
    summary = train_segmentation(cfg)
    if _is_global_zero():
        click.echo(describe_trainable(summary["trainable"]))
        click.echo(f"best validation Dice {summary['best_val_dice']:.4f} ({summary['best_checkpoint']})")
        click.echo(f"test: {_scores(summary['test'])}")
        click.echo(f"run folder: {summary['run_dir']}")


@segment.command("predict")
@click.argument("checkpoint", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for <stem>.png masks (input size; binary 0/255, multi-class label values).",
)
@click.option("--overlay", is_flag=True, help="Also write <stem>_overlay.png (image with outlined classes).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, ...")
@click.option(
    "--sw-batch-size", type=int, default=None, help="Windows per forward pass (default: as trained)."
)
@handle_errors
def predict(
    checkpoint: Path,
    inputs: tuple[Path, ...],
    out_dir: Path,
    overlay: bool,
    device: str,
    sw_batch_size: int | None,
) -> None:
    """Segment INPUTS (image files or folders of images) with a trained CHECKPOINT."""
    from pathopeft.seg.predict import predict_masks

    _log_to_stderr()
    written = predict_masks(
        checkpoint, inputs, out_dir, overlay=overlay, device=device, sw_batch_size=sw_batch_size
    )
    click.echo(f"wrote {len(written)} mask(s) to {out_dir}")


@segment.command("compare")
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@set_option
@dry_run_option
@handle_errors
def compare(config: Path, overrides: tuple[str, ...], dry_run: bool) -> None:
    """Train every setting of CONFIG at each learning rate; table at the best validation lr."""
    from pathopeft.config.segment import SegmentCompareConfig

    cfg = load_or_exit(SegmentCompareConfig, config, overrides)
    if dry_run:
        report_dry_run(cfg, "settings: " + ", ".join(s.name for s in cfg.compare.settings))
        return
    from pathopeft.seg.compare import compare_settings

    _log_to_stderr()
    result = compare_settings(cfg)
    click.echo(result.markdown)
    click.echo(f"written: {', '.join(str(p) for p in result.files)}")
