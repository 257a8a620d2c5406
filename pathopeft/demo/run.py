"""The demo's stages, their done-markers and the subprocess runner.

Every stage is a list of real ``pathopeft`` command lines (plus, for two stages, a call of a
documented library function that has no command: the segmentation shapes set). A stage that
finishes writes ``.demo/<stage>.done`` atomically; a rerun skips stages with a marker, so an
interrupted demo continues where it stopped, and a finished one only prints its table again.
The markers record the demo's settings: a folder made with other settings is refused rather
than mixed.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

import pathopeft
from pathopeft.files import atomic_write_json, atomic_write_text

__all__ = ["STAGES", "TASKS", "DemoError", "DemoSettings", "DemoTask", "run_demo"]

MARKERS = ".demo"


class DemoError(RuntimeError):
    """A demo stage failed (the message names the command and its log) or the folder is not usable."""


@dataclass(frozen=True)
class DemoTask:
    """One diagnostic task of the demo: its name, lesion look and class names."""

    name: str
    lesion: str  # pathopeft synth --lesion
    classes: tuple[str, str]


# Two tasks whose lesions look different (crowded dark nuclei vs few large pale ones), so task 2
# is a new task for the model of task 1, as a new organ would be.
TASKS = (
    DemoTask("dense", "dense", ("dense_normal", "dense_tumor")),
    DemoTask("vesicular", "vesicular", ("vesicular_normal", "vesicular_tumor")),
)


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of the demo. The defaults take a few minutes on 2 CPU cores; tests use tiny ones."""

    seed: int = 0
    n_slides: int = 12  # per task; half of them with lesions
    size: int = 4096  # slide width and height in pixels at 0.5 µm/px
    epochs: int = 8  # MIL epochs per task
    backbone: str = "resnet18"  # timm model, random init (--no-pretrained): the demo runs offline
    seg_images: int = 24  # synthetic segmentation images (64 × 64)
    seg_epochs: int = 6

    def __post_init__(self) -> None:
        # 6 slides per task is the least that gives every split (train/val/test) both classes
        if self.n_slides < 6:
            raise DemoError(f"n_slides={self.n_slides}: the demo needs at least 6 slides per task")
        if self.size < 1024 or self.epochs < 1 or self.seg_images < 8 or self.seg_epochs < 1:
            raise DemoError("size >= 1024, epochs >= 1, seg_images >= 8 and seg_epochs >= 1 are needed")

    def describe(self) -> dict[str, Any]:
        return asdict(self)


def _python_env() -> dict[str, str]:
    """The child processes import the same pathopeft as this one (editable install or PYTHONPATH)."""
    env = dict(os.environ)
    root = str(Path(pathopeft.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    return env


def _command_line(args: list[str]) -> str:
    return "pathopeft " + " ".join(shlex.quote(a) for a in args)


class _Runner:
    """Runs ``python -m pathopeft ARGS`` in the demo folder, logging every command and its output."""

    def __init__(self, out: Path, log: Path) -> None:
        self.out, self.log = out, log
        self.env = _python_env()

    def __call__(self, args: list[str]) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("a", encoding="utf-8") as handle:
            handle.write(f"$ {_command_line(args)}\n")
            handle.flush()
            result = subprocess.run(
                [sys.executable, "-m", "pathopeft", *args],
                cwd=self.out,
                env=self.env,
                stdout=handle,
                stderr=subprocess.STDOUT,
                check=False,
            )
        if result.returncode != 0:
            tail = "\n".join(self.log.read_text(encoding="utf-8", errors="replace").splitlines()[-15:])
            raise DemoError(
                f"`{_command_line(args)}` failed (exit {result.returncode}) in {self.out}; "
                f"full output in {self.log}:\n{tail}"
            )


def _train_config(task: DemoTask, settings: DemoSettings) -> dict[str, Any]:
    """A small CoMEL config for one task (same model sizes as configs/synthetic_task.yaml)."""
    return {
        "data": {
            "manifest": [f"manifests/{task.name}.csv"],
            "features_dir": f"tiles/{task.name}/features",
            "coords_dir": f"tiles/{task.name}/coords",
            "annotations": f"slides/{task.name}/annotations",
            "classes": list(task.classes),
            "task": task.name,
            "negative_class": 0,
            "num_workers": 0,
        },
        "model": {"name": "comel", "comel": {"embed_dim": 64, "heads": 4, "groups": 16, "attn_hidden": 64}},
        "optimizer": {"name": "adam", "lr": 5.0e-4, "weight_decay": 1.0e-5},
        "continual": {"method": "owlora", "rank": 4},
        "evaluation": {"instance_threshold": 0.5, "write_predictions": True},
        "trainer": {
            "max_epochs": settings.epochs,
            "accelerator": "cpu",
            "devices": 1,
            "precision": "32-true",
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "log_every_n_steps": 5,
        },
        # overwrite: a stage without its done-marker was interrupted and is redone from the start
        "run": {
            "name": task.name,
            "root": "runs",
            "overwrite": True,
            "monitor": "val/loss",
            "monitor_mode": "min",
        },
        "seed": settings.seed,
    }


def _segment_config(settings: DemoSettings) -> dict[str, Any]:
    """LoRA on a small random-init ViT with a progressive-upsampling decoder (as tests/test_seg_train.py)."""
    return {
        "data": {
            "root": "shapes",
            "masks_dir": "masks",
            "val_fraction": 0.25,
            "test_fraction": 0.25,
            "samples_per_image": 4,
            "batch_size": 8,
            "num_workers": 0,
            "augment": {"stain_jitter": 0.0, "color_jitter": 0.0},
        },
        "model": {
            "encoder": "vit_tiny_patch16_224",
            "weights": "none",
            "img_size": 64,
            "encoder_kwargs": {"patch_size": 8, "depth": 4, "embed_dim": 64, "num_heads": 2},
            "decoder": "pup",
            "decoder_channels": 2,
        },
        "adapter": {
            "mode": "adapter",
            "method": "lora",
            "targets": r".*blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))",
            "options": {"rank": 4, "alpha": 4.0},
        },
        "optimizer": {"lr": 3.0e-3},
        "trainer": {
            "max_epochs": settings.seg_epochs,
            "accelerator": "cpu",
            "devices": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
            "log_every_n_steps": 5,
        },
        "run": {"root": "runs", "name": "segment", "overwrite": True},
        "seed": settings.seed,
    }


def _write_configs(out: Path, settings: DemoSettings) -> None:
    for task in TASKS:
        text = yaml.safe_dump(_train_config(task, settings), sort_keys=False)
        atomic_write_text(out / "configs" / f"{task.name}.yaml", text)
    atomic_write_text(
        out / "configs" / "segment.yaml", yaml.safe_dump(_segment_config(settings), sort_keys=False)
    )


# --- the stages: each returns a short description of what it made -----------------------------------


def _synth(run: _Runner, s: DemoSettings) -> str:
    for i, task in enumerate(TASKS):
        seed = str(s.seed * 10 + i)  # each task its own slides
        run(["synth", f"slides/{task.name}", "--n", str(s.n_slides), "--seed", seed, "--size", str(s.size),
             "--lesion", task.lesion, "--classes", ",".join(task.classes)])  # fmt: skip
    return f"{len(TASKS)} × {s.n_slides} slides in slides/{{{','.join(t.name for t in TASKS)}}}/"


def _tile(run: _Runner, s: DemoSettings) -> str:
    for task in TASKS:
        run(["tile", f"slides/{task.name}", "--out", f"tiles/{task.name}", "--backbone", s.backbone,
             "--no-pretrained", "--target-mpp", "1.0", "--tile-px", "128", "--workers", "0",
             "--no-progress", "-q"])  # fmt: skip
    return f"128-px tiles at 1 µm/px, {s.backbone} (random init) features in tiles/"


def _manifest(run: _Runner, s: DemoSettings) -> str:
    for task in TASKS:
        run(["manifest", f"tiles/{task.name}", "--labels", f"slides/{task.name}/labels.csv",
             "--out", f"manifests/{task.name}.csv", "--val-fraction", "0.25", "--test-fraction", "0.25",
             "--seed", str(s.seed), "--overwrite"])  # fmt: skip
    return "train/val/test splits in manifests/"


def _train(run: _Runner, s: DemoSettings) -> str:
    run(["train", f"configs/{TASKS[0].name}.yaml"])
    return f"CoMEL on task 1 ({TASKS[0].name}) -> runs/{TASKS[0].name}/"


def _add_task(run: _Runner, s: DemoSettings) -> str:
    first, second = TASKS
    run(["add-task", f"runs/{first.name}/best.ckpt", f"configs/{second.name}.yaml"])
    run(["tasks", f"runs/{second.name}/best.ckpt"])
    return f"task 2 ({second.name}) added with OWLoRA -> runs/{second.name}/"


def _heatmap(run: _Runner, s: DemoSettings) -> str:
    for task in TASKS:
        run(["heatmap", f"runs/{TASKS[-1].name}/best.ckpt", "--task", task.name, "--slides",
             f"slides/{task.name}", "--features", f"tiles/{task.name}/features", "--out",
             f"heatmaps/{task.name}", "--formats", "geojson,png,csv,tiff"])  # fmt: skip
    return "GeoJSON, PNG, CSV and pyramidal TIFF per slide in heatmaps/<task>/"


def _segment(run: _Runner, s: DemoSettings) -> str:
    from pathopeft.seg.synth import make_shapes_dataset  # no command makes this set: a library call

    make_shapes_dataset(run.out / "shapes", s.seg_images, size=(64, 64), seed=s.seed)
    run(["segment", "train", "configs/segment.yaml"])
    run(["segment", "predict", "runs/segment/best.ckpt", "shapes/images", "--out", "segmentation",
         "--overlay", "--device", "cpu"])  # fmt: skip
    return "LoRA-adapted ViT segmenter -> runs/segment/, masks in segmentation/"


Stage = Callable[[_Runner, DemoSettings], str]
STAGES: tuple[tuple[str, Stage], ...] = (
    ("synth", _synth),
    ("tile", _tile),
    ("manifest", _manifest),
    ("train", _train),
    ("add-task", _add_task),
    ("heatmap", _heatmap),
    ("segment", _segment),
)


def _check_settings(out: Path, settings: DemoSettings) -> None:
    """A demo folder belongs to one set of settings; mixing two would give a meaningless table."""
    path = out / MARKERS / "settings.json"
    if path.is_file():
        recorded = json.loads(path.read_text(encoding="utf-8"))
        if recorded != settings.describe():
            changed = sorted(k for k in settings.describe() if recorded.get(k) != settings.describe()[k])
            raise DemoError(
                f"{out} holds a demo made with other settings ({', '.join(changed)} differ: "
                f"{ {k: recorded.get(k) for k in changed} }); use another --out or --overwrite"
            )
    else:
        atomic_write_json(path, settings.describe())


def run_demo(
    out: str | Path,
    settings: DemoSettings | None = None,
    *,
    overwrite: bool = False,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run (or continue) the demo in ``out``; returns the summary also written to demo_summary.json."""
    from pathopeft.demo.report import format_table, summarize

    settings = settings or DemoSettings()
    out = Path(out)
    if overwrite and (out / MARKERS).is_dir():
        for marker in (out / MARKERS).iterdir():
            marker.unlink()
    out.mkdir(parents=True, exist_ok=True)
    _check_settings(out, settings)
    _write_configs(out, settings)
    redo = False  # once a stage runs, every later stage runs too (it depends on the new outputs)
    n = len(STAGES)
    for i, (name, stage) in enumerate(STAGES, start=1):
        marker = out / MARKERS / f"{name}.done"
        if marker.is_file() and not redo:
            echo(f"[{i}/{n}] {name:<9} skip (done in an earlier run)")
            continue
        redo = True
        marker.unlink(missing_ok=True)
        start = time.perf_counter()
        what = stage(_Runner(out, out / "logs" / f"{name}.log"), settings)
        seconds = time.perf_counter() - start
        atomic_write_json(marker, {"stage": name, "seconds": round(seconds, 1), "made": what})
        echo(f"[{i}/{n}] {name:<9} {what} ({seconds:.0f} s)")
    summary = summarize(out, settings)
    atomic_write_json(out / "demo_summary.json", summary)
    echo(format_table(summary, out))
    return summary
