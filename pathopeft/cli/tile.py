"""``pathopeft tile SLIDES...``: tissue → tile grid → coords, thumbnails and feature bags, per slide."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import click

from pathopeft.cli._common import dry_run_option, handle_errors, load_or_exit, report_dry_run, set_option

__all__ = ["tile"]

# flag name -> dotted config key; a flag given on the command line wins over the config file and --set.
_FLAG_KEYS = {
    "out": "output.dir",
    "backbone": "features.backbone",
    "weights": "features.weights",
    "mpp": "slides.mpp",
    "workers": "features.num_workers",
    "batch_size": "features.batch_size",
    "devices": "run.devices",
    "accelerator": "run.accelerator",
    "num_nodes": "run.num_nodes",
    "strategy": "run.strategy",
    "precision": "run.precision",
    "target_mpp": "grid.target_mpp",
    "tile_px": "grid.tile_px",
}


class _TqdmHandler(logging.Handler):
    """Log lines that do not break the progress bar, written to the *current* stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def _setup_logging(level: int) -> None:
    """Show pathopeft's INFO/WARNING lines (resume decisions, failed slides) on stderr.

    Propagation stays on, so applications and test harnesses that capture the root logger still
    see the records.
    """
    logger = logging.getLogger("pathopeft")
    if not any(isinstance(h, _TqdmHandler) for h in logger.handlers):
        handler = _TqdmHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)


@click.command(context_settings={"show_default": True})
@click.argument("slides", nargs=-1, required=True, metavar="SLIDES...")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Output folder [default: tiles/ under the current directory].",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="YAML config (see configs/tile_default.yaml).",
)
@set_option
@click.option("--no-features", is_flag=True, help="Coords and thumbnails only (no encoder).")
@click.option("--backbone", default=None, help="timm model name (features.backbone).")
@click.option(
    "--weights",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Local weights file (.safetensors / .pth / .bin / .pt state dict).",
)
@click.option("--no-pretrained", is_flag=True, help="Random (seeded) init instead of hub weights.")
@click.option(
    "--mpp",
    type=float,
    default=None,
    metavar="UM_PER_PX",
    help="Level-0 µm/px for slides whose metadata has none or an implausible one (outside 0.05-20).",
)
@click.option("--workers", type=int, default=None, help="Tile-reading worker processes per device.")
@click.option("--batch-size", type=int, default=None, help="Tiles per forward pass.")
@click.option("--devices", type=int, default=None, help="Processes/devices per node (slides are sharded).")
@click.option("--accelerator", default=None, help="auto | cpu | cuda | gpu | mps.")
@click.option("--num-nodes", type=int, default=None, help="Nodes (multi-node DDP).")
@click.option("--strategy", default=None, help="Lightning strategy (auto = ddp for several devices).")
@click.option("--precision", default=None, help="auto | 32-true | bf16-mixed | 16-mixed.")
@click.option("--target-mpp", type=float, default=None, help="µm/px of the tiles (grid.target_mpp).")
@click.option("--tile-px", type=int, default=None, help="Tile size in pixels at --target-mpp.")
@click.option("--overwrite", is_flag=True, help="Recompute every slide, even complete ones.")
@click.option("--strict", is_flag=True, help="Exit 1 if any slide fails (default: only if all fail).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and the summary.")
@dry_run_option
@handle_errors
def tile(
    slides: tuple[str, ...],
    config_path: Path | None,
    overrides: tuple[str, ...],
    no_features: bool,
    no_pretrained: bool,
    overwrite: bool,
    strict: bool,
    no_progress: bool,
    quiet: bool,
    dry_run: bool,
    **flags: Any,
) -> None:
    """Tile whole-slide images and encode the tiles into feature bags.

    SLIDES: folders (searched recursively), slide files, or a CSV with a 'path' column (optional
    'slide_id', 'mpp'). Writes OUT/manifest.csv, OUT/coords/<id>.h5, OUT/thumbnails/<id>.png and
    OUT/features/<backbone>/<id>.h5. A rerun skips slides already done with the same parameters.
    Exit status: 0 ok (some failed slides allowed), 1 every slide failed (or --strict and any), 2 bad usage.
    """
    from pathopeft.config import validate
    from pathopeft.config.tile import TileConfig
    from pathopeft.features.pipeline import run_tile

    _setup_logging(logging.WARNING if quiet else logging.INFO)
    config = load_or_exit(TileConfig, config_path, overrides)
    data = config.model_dump()
    for flag, key in _FLAG_KEYS.items():
        if flags.get(flag) is not None:
            _set(data, key, flags[flag])
    switches = {
        "features.enabled": False if no_features else None,
        "features.pretrained": False if no_pretrained else None,
        "output.overwrite": True if overwrite else None,
        "output.strict": True if strict else None,
        "output.progress": False if no_progress else None,
    }
    for key, value in switches.items():
        if value is not None:
            _set(data, key, value)
    config = validate(TileConfig, data, "command-line flags")
    if dry_run:
        from pathopeft.features.pipeline import discover

        report_dry_run(config, f"{len(discover(list(slides)))} slide file(s) found in {', '.join(slides)}")
        return

    summary = run_tile(list(slides), config)
    if summary.rank == 0:
        click.echo(summary.describe())
    code = summary.exit_code(strict=config.output.strict)
    if code:
        sys.exit(code)


def _set(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
