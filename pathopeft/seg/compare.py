"""``pathopeft segment compare``: which tuning method should I use on my data?

Every setting (adapter methods with explicit ranks, plus the frozen-encoder and full fine-tuning
baselines) is trained on the same split with the same seed at each learning rate of its sweep,
because LoRA-style methods are learning-rate sensitive and a single shared rate favours whichever
method it happens to suit. Each setting is reported at the learning rate with the best
*validation* Dice (empty images counted, see :mod:`pathopeft.seg.metrics`); only that
checkpoint is then evaluated on the test split, which no choice was
made on. Output in ``<run.root>/<run.name>/``: ``comparison.csv``, ``comparison.md``,
``plots/comparison.png`` (bar charts), ``lr_sweep.csv`` (every run's validation score) and one run
folder per setting and learning rate (``<setting>/lr_<lr>/``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning
import pandas as pd

from pathopeft.config import ConfigError, apply_overrides, dump_config, validate
from pathopeft.config.segment import SegCompareSetting, SegmentCompareConfig, SegmentTrainConfig
from pathopeft.files import atomic_path, atomic_write_json, atomic_write_text
from pathopeft.runs import load_checkpoint, prepare_run_dir
from pathopeft.seg.data import Sample
from pathopeft.seg.datamodule import SegDataModule
from pathopeft.seg.model import build_model
from pathopeft.seg.module import SegmentationModule
from pathopeft.seg.train import load_splits, train_segmentation

__all__ = ["CompareResult", "compare_settings", "evaluate_checkpoint", "markdown_table", "setting_config"]

log = logging.getLogger(__name__)

COLUMNS = [
    "setting",
    "mode",
    "method",
    "best_lr",
    "val_dice",
    "test_dice",
    "test_iou",
    "test_hd95",
    "test_fp_image_rate",
    "test_dice_nonempty",
    "trainable",
    "trainable_pct",
    "sec_per_epoch",
    "status",
]


@dataclass
class CompareResult:
    table: pd.DataFrame
    sweep: pd.DataFrame
    markdown: str
    files: list[Path] = field(default_factory=list)


def lr_tag(lr: float) -> str:
    return f"lr_{lr:.0e}".replace("e-0", "e-").replace("e+0", "e+")


def setting_config(
    cfg: SegmentCompareConfig, setting: SegCompareSetting, lr: float, root: Path
) -> SegmentTrainConfig:
    """The train config of one (setting, learning rate): base sections + the setting's changes."""
    data = cfg.model_dump(mode="json", exclude={"compare"})
    data["adapter"] = setting.adapter.model_dump(mode="json")
    data = apply_overrides(data, setting.overrides)
    data["optimizer"]["lr"] = lr
    data["run"] = {"root": str(root / setting.name), "name": lr_tag(lr), "overwrite": True}
    return validate(SegmentTrainConfig, data, f"compare setting {setting.name!r}")


def _single_process(trainer: dict[str, Any], where: str = "") -> None:
    devices = trainer.get("devices", 1)
    strategy = str(trainer.get("strategy", "auto"))
    one = devices in (1, "1") or (isinstance(devices, list) and len(devices) == 1)
    if not one or "ddp" in strategy or "fsdp" in strategy or int(trainer.get("num_nodes", 1)) > 1:
        raise ConfigError(
            f"{where}compare trains its settings one after another in one process: use one device "
            "(trainer.devices=1, no ddp/fsdp strategy); run `segment train` per setting for multi-GPU"
        )


def evaluate_checkpoint(
    cfg: SegmentTrainConfig, checkpoint: str | Path, splits: dict[str, list[Sample]], split: str = "test"
) -> dict[str, Any]:
    """Scores of a trained checkpoint on one split (a fresh model with the checkpoint's tensors)."""
    lightning.seed_everything(cfg.seed, workers=True, verbose=False)
    model = build_model(cfg, verbose=False)
    module = SegmentationModule(model, cfg)
    datamodule = SegDataModule(
        cfg.data,
        {**splits, "test": splits[split]},
        img_size=cfg.model.img_size,
        mean=model.encoder.mean,
        std=model.encoder.std,
        seed=cfg.seed,
    )
    keep = {"accelerator", "devices", "precision", "enable_progress_bar", "deterministic"}
    trainer = lightning.Trainer(
        **{k: v for k, v in cfg.trainer.items() if k in keep},
        logger=False,
        enable_checkpointing=False,
        default_root_dir=str(Path(checkpoint).parent),
    )
    saved = load_checkpoint(checkpoint)
    module.on_load_checkpoint(saved)  # refuses another encoder; fills the frozen encoder back in
    module.load_state_dict(saved["state_dict"])
    trainer.test(module, datamodule=datamodule, verbose=False)
    return dict(module.results.get("test", {}))


def compare_settings(cfg: SegmentCompareConfig) -> CompareResult:
    """Run the sweep, pick each setting's lr on validation Dice, test it, write the tables."""
    _single_process(cfg.trainer)
    root = Path(cfg.run.root) / cfg.run.name
    # every run's config is built and checked before the first one trains: a bad override in the
    # last setting must not surface hours later
    plan = [
        (setting, [(lr, setting_config(cfg, setting, lr, root)) for lr in setting.lrs or cfg.compare.lrs])
        for setting in cfg.compare.settings
    ]
    for setting, runs_of in plan:
        for _, run_cfg in runs_of:
            _single_process(run_cfg.trainer, f"compare setting {setting.name!r}: ")
    if not cfg.run.overwrite and root.is_dir() and any(root.iterdir()):
        prepare_run_dir(cfg.run.root, cfg.run.name)  # raises its "already holds a run" error now
    splits = load_splits(cfg)  # bad data fails before a comparison folder exists
    root = prepare_run_dir(cfg.run.root, cfg.run.name, overwrite=cfg.run.overwrite)
    dump_config(cfg, root / "config.yaml")
    sweep_rows: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    for setting, runs_of in plan:
        runs = []
        for lr, run_cfg in runs_of:
            log.info("compare: %s at lr %g", setting.name, lr)
            try:
                summary = train_segmentation(run_cfg, run_test=False, splits=splits)
            except (ConfigError, ValueError, RuntimeError) as exc:
                log.error("compare: %s at lr %g failed: %s", setting.name, lr, exc)
                summary = {"error": f"{type(exc).__name__}: {exc}"}
            sweep_rows.append(_sweep_row(setting, lr, summary))
            runs.append((lr, run_cfg, summary))
        rows.append(_pick_and_test(setting, runs, splits))
    table = pd.DataFrame(rows, columns=COLUMNS)
    sweep = pd.DataFrame(sweep_rows)
    if (table["status"] != "ok").all():
        raise RuntimeError(f"every compare setting failed; see {root}/lr_sweep.csv")
    markdown = markdown_table(table)
    files = _write_outputs(root, table, sweep, markdown)
    return CompareResult(table=table, sweep=sweep, markdown=markdown, files=files)


def _val_score(summary: dict[str, Any]) -> float:
    value = summary.get("best_val_dice", float("nan"))
    return value if isinstance(value, float) and math.isfinite(value) else -math.inf


def _sweep_row(setting: SegCompareSetting, lr: float, summary: dict[str, Any]) -> dict[str, Any]:
    return {
        "setting": setting.name,
        "lr": lr,
        "val_dice": summary.get("best_val_dice", float("nan")),
        "sec_per_epoch": summary.get("seconds_per_epoch", float("nan")),
        "checkpoint": summary.get("best_checkpoint", ""),
        "status": summary.get("error", "ok"),
    }


def _pick_and_test(
    setting: SegCompareSetting, runs: list[tuple[float, SegmentTrainConfig, dict[str, Any]]], splits: dict
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "setting": setting.name,
        "mode": setting.adapter.mode,
        "method": setting.adapter.method if setting.adapter.mode == "adapter" else "",
    }
    ok = [run for run in runs if "error" not in run[2]]
    if not ok:
        return {**row, "status": runs[-1][2]["error"] if runs else "no runs"}
    lr, run_cfg, summary = max(ok, key=lambda run: _val_score(run[2]))  # first of equals: sweep order
    test = evaluate_checkpoint(run_cfg, summary["best_checkpoint"], splits)
    atomic_write_json(Path(summary["run_dir"]) / "test_metrics.json", {**test, "selected_lr": lr})
    trainable = summary["trainable"]
    return {
        **row,
        "best_lr": lr,
        "val_dice": summary["best_val_dice"],
        "test_dice": test.get("dice"),
        "test_iou": test.get("iou"),
        "test_hd95": test.get("hd95"),
        "test_fp_image_rate": test.get("fp_image_rate"),
        "test_dice_nonempty": test.get("dice_nonempty"),
        "trainable": trainable["trainable"],
        "trainable_pct": 100 * trainable["share"],
        "sec_per_epoch": summary["seconds_per_epoch"],
        "status": "ok",
    }


def markdown_table(table: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (numbers rounded for reading)."""
    formats = {
        "best_lr": "{:.0e}",
        "val_dice": "{:.4f}",
        "test_dice": "{:.4f}",
        "test_iou": "{:.4f}",
        "test_hd95": "{:.2f}",
        "test_fp_image_rate": "{:.3f}",
        "test_dice_nonempty": "{:.4f}",
        "trainable": "{:,.0f}",
        "trainable_pct": "{:.2f}",
        "sec_per_epoch": "{:.2f}",
    }
    header = list(table.columns)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for _, record in table.iterrows():
        cells = []
        for column in header:
            value = record[column]
            if isinstance(value, float) and not math.isfinite(value):
                cells.append("–")
            elif (
                column in formats
                and value is not None
                and not (isinstance(value, float) and math.isnan(value))
            ):
                cells.append(formats[column].format(value))
            else:
                cells.append("–" if value is None else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _write_outputs(root: Path, table: pd.DataFrame, sweep: pd.DataFrame, markdown: str) -> list[Path]:
    files = [
        root / "comparison.csv",
        root / "comparison.md",
        root / "lr_sweep.csv",
        root / "plots" / "comparison.png",
    ]
    atomic_write_text(files[0], table.to_csv(index=False))
    atomic_write_text(files[1], markdown)
    atomic_write_text(files[2], sweep.to_csv(index=False))
    _bar_chart(table, files[3])
    return files


def _bar_chart(table: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = table[table["status"] == "ok"]
    panels = [("test_dice", "test Dice"), ("test_hd95", "test HD95 (px)"), ("trainable_pct", "trainable %")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for ax, (column, title) in zip(axes, panels):
        ax.bar(ok["setting"], ok[column].astype(float), color="tab:blue")
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", rotation=45, labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
