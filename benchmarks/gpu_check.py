"""CUDA / bf16 checks and GPU throughput, as one short script for a lent GPU machine.

Runs the real commands and modules on ``cuda``: ``pathopeft tile`` (fast reader vs OpenSlide,
bf16 vs fp32 vs CPU features), CoMEL/TransMIL/ABMIL forward+backward at 10^4 and 10^5 tiles,
adapter training steps on a ViT-B under bf16 autocast, and ``pathopeft train`` /
``pathopeft segment train`` with ``precision: bf16-mixed``. Every section is independent and
records its result (or its error) in ``OUT/gpu_check.json``; ratios are measured in the same run.

    python benchmarks/gpu_check.py --out OUTDIR [--quick]    # --quick: tiny sizes (CPU dry run)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

RESULTS: dict[str, Any] = {}


def section(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> None:
            start = time.perf_counter()
            print(f"== {name}", flush=True)
            try:
                RESULTS[name] = fn(*args, **kwargs)
            except Exception as exc:
                trace = traceback.format_exc()[-2000:]
                RESULTS[name] = {"error": f"{type(exc).__name__}: {exc}", "trace": trace}
            RESULTS[name + "_seconds"] = round(time.perf_counter() - start, 1)
            print(json.dumps(RESULTS[name], default=str)[:1500], flush=True)

        return run

    return wrap


def cli(*args: str, cwd: Path) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pathopeft", *args], cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"pathopeft {' '.join(args)} exited {proc.returncode}: {proc.stderr[-1500:]}")
    return seconds, proc.stdout + proc.stderr


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@section("environment")
def environment() -> dict[str, Any]:
    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
        info["bf16"] = torch.cuda.is_bf16_supported()
    import lightning
    import timm

    info["timm"] = timm.__version__
    info["lightning"] = lightning.__version__
    return info


@section("tile")
def tile(work: Path, device: str, quick: bool) -> dict[str, Any]:
    import h5py

    size = 4096 if quick else 16384
    cli("synth", "slides", "--n", "4", "--seed", "3", "--size", str(size), cwd=work)
    (work / "one.csv").write_text("path\nslides/synth_000.tiff\n")
    out: dict[str, Any] = {}
    big = "resnet18" if quick else "vit_base_patch16_224"
    common = ["--no-pretrained", "--overwrite", "--no-progress", "--workers", "2" if quick else "12"]
    for backend in ("auto", "openslide"):
        seconds, _ = cli(
            "tile", "slides", "--out", f"t_{backend}", "--backbone", big, "--batch-size", "256",
            "--accelerator", device, "--precision", "bf16-mixed" if device == "cuda" else "32-true",
            "--set", f"reader.backend={backend}", *common, cwd=work,
        )  # fmt: skip
        manifest = (work / f"t_{backend}" / "manifest.csv").read_text().splitlines()
        tiles = sum(int(line.split(",")[3]) for line in manifest[1:])
        out[f"{big}_{backend}"] = {
            "seconds": round(seconds, 1),
            "tiles": tiles,
            "tiles_per_s": round(tiles / seconds),
        }
    out["fast_vs_openslide_end_to_end"] = round(
        out[f"{big}_auto"]["tiles_per_s"] / out[f"{big}_openslide"]["tiles_per_s"], 2
    )

    def features(folder: str) -> np.ndarray:
        with h5py.File(work / folder / "features" / "resnet18" / "synth_000.h5") as h5:
            return h5["features"][:]

    runs = (("cpu32", "cpu", "32-true"), ("gpu32", device, "32-true"), ("gpubf16", device, "bf16-mixed"))
    for name, dev, prec in runs:
        cli("tile", "one.csv", "--out", name, "--backbone", "resnet18", "--accelerator", dev,
            "--precision", prec, *common, cwd=work)  # fmt: skip
    ref = features("cpu32")
    for name in ("gpu32", "gpubf16"):
        other = features(name)
        cos = (ref * other).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(other, axis=1) + 1e-12)
        out[f"resnet18_{name}_vs_cpu32"] = {
            "max_abs_diff": float(np.abs(ref - other).max()),
            "min_cosine": float(cos.min()),
            "n": len(ref),
        }
    return out


def tile_throughput(
    work: Path,
    device: str,
    size: int,
    n: int,
    workers: int,
    backends: tuple[str, ...] = ("auto", "openslide"),
) -> dict[str, Any]:
    """Steady-state tiles/s: ViT-B/16 bf16, fast reader vs OpenSlide; per-slide seconds."""
    folder = work / f"big{size}"
    cli("synth", str(folder), "--n", str(n), "--seed", "5", "--size", str(size), cwd=work)
    out: dict[str, Any] = {}
    common = ["--no-pretrained", "--overwrite", "--no-progress", "--workers", str(workers)]
    seconds, _ = cli("tile", str(folder), "--out", f"big{size}_nofeat", "--no-features", *common, cwd=work)
    out["no_features_seconds"] = round(seconds, 1)
    for backend in backends:
        seconds, _ = cli(
            "tile", str(folder), "--out", f"big{size}_{backend}", "--backbone", "vit_base_patch16_224",
            "--batch-size", "256", "--accelerator", device,
            "--precision", "bf16-mixed" if device == "cuda" else "32-true",
            "--set", f"reader.backend={backend}", *common, cwd=work,
        )  # fmt: skip
        rows = (work / f"big{size}_{backend}" / "manifest.csv").read_text().splitlines()[1:]
        tiles = sum(int(r.split(",")[3]) for r in rows)
        slide_seconds = [float(r.split(",")[9]) for r in rows]
        out[backend] = {
            "command_seconds": round(seconds, 1),
            "tiles": tiles,
            "slide_seconds": slide_seconds,
            "tiles_per_s_in_slides": round(tiles / sum(slide_seconds)),
        }
    if "openslide" in out and "auto" in out:
        out["fast_vs_openslide"] = round(
            out["auto"]["tiles_per_s_in_slides"] / out["openslide"]["tiles_per_s_in_slides"], 2
        )
    return out


@section("mil_step")
def mil_step(device: str, quick: bool) -> dict[str, Any]:
    from pathopeft.mil import create_model

    sizes = [1_000, 5_000] if quick else [10_000, 100_000]
    out: dict[str, Any] = {}
    for name in ("comel", "transmil", "abmil"):
        for precision in ("fp32", "bf16"):
            for n in sizes:
                out[f"{name}_{precision}_{n}"] = _mil_timing(create_model, name, n, precision, device)
                if device == "cuda":
                    torch.cuda.empty_cache()
        small, large = sizes
        for precision in ("fp32", "bf16"):
            t_small = out[f"{name}_{precision}_{small}"]["seconds"]
            t_large = out[f"{name}_{precision}_{large}"]["seconds"]
            out[f"{name}_{precision}_ratio"] = round(t_large / t_small, 2)
    return out


def _mil_timing(create_model: Any, name: str, n: int, precision: str, device: str) -> dict[str, Any]:
    """Best of 3 forward+backward steps on one random bag of ``n`` 1024-d tiles; peak GPU memory."""
    torch.manual_seed(0)
    model = create_model(name, in_dim=1024, tasks=[{"name": "t", "classes": ["a", "b"]}]).to(device).train()
    x = torch.randn(1, n, 1024, device=device)
    coords = torch.randint(0, 100_000, (1, n, 2), device=device)
    label = torch.tensor([1], device=device)

    def step() -> None:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(x, coords=coords).logits
        torch.nn.functional.cross_entropy(logits.float(), label).backward()
        model.zero_grad(set_to_none=True)

    step()
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return {"seconds": round(min(times), 4), "peak_gib": peak}


@section("adapters_step")
def adapters_step(device: str, quick: bool) -> dict[str, Any]:
    import timm

    import pathopeft.adapters as pa

    arch = "vit_tiny_patch16_224" if quick else "vit_base_patch16_224"
    batch = 4 if quick else 64
    targets = r".*blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"
    settings: dict[str, tuple[str, dict[str, Any]] | None] = {
        "frozen": None,
        "lora": ("lora", {"rank": 8}),
        "salt": ("salt", {"ratio": 0.1, "lora_rank": 8}),
        "svfit": ("svfit", {"energy": 0.99}),
        "wara": ("wara", {"rank": 4}),
        "owlora": ("owlora", {"rank": 16}),
    }
    x = torch.randn(batch, 3, 224, 224, device=device)
    out: dict[str, Any] = {}
    for name, spec in settings.items():
        torch.manual_seed(0)
        model = timm.create_model(arch, pretrained=False, num_classes=10)
        if spec is None:
            for p in model.parameters():
                p.requires_grad_(False)
            model.head.requires_grad_(True)
        else:
            start = time.perf_counter()
            pa.attach(model, spec[0], targets=targets, **spec[1])
            out[f"{name}_attach_s"] = round(time.perf_counter() - start, 2)
        model = model.to(device).train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)

        def step(model: Any = model, opt: Any = opt) -> None:
            with torch.autocast(device, dtype=torch.bfloat16):
                loss = model(x).float().logsumexp(-1).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(3):
            step()
        sync()
        times = []
        for _ in range(10):
            start = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - start)
        out[name] = round(float(np.median(times)), 5)
        del model, opt
    for name in ("salt", "svfit", "wara", "owlora"):
        out[f"{name}_vs_lora"] = round(out[name] / out["lora"], 2)
    return out


@section("merged_inference")
def merged_inference(device: str, quick: bool) -> dict[str, Any]:
    """Merged LoRA+SALT ViT-B vs the same base, bf16 autocast inference, interleaved repeats.

    Both models' weights are frozen: autocast caches its bf16 weight casts only for tensors that
    require grad, so a trainable plain model would skip the casts a frozen adapted one redoes.
    The trainable-base time is reported too, to show that effect.
    """
    import timm

    import pathopeft.adapters as pa

    arch = "vit_tiny_patch16_224" if quick else "vit_base_patch16_224"
    x = torch.randn(4 if quick else 64, 3, 224, 224, device=device)
    torch.manual_seed(0)
    base = timm.create_model(arch, pretrained=False, num_classes=10).to(device).eval()
    merged = timm.create_model(arch, pretrained=False, num_classes=10).to(device).eval()
    merged.load_state_dict(base.state_dict())
    pa.attach(merged, "lora", targets=r".*blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))", rank=8)
    pa.merge(merged)
    base.requires_grad_(False)
    times: dict[str, list[float]] = {"base_frozen": [], "merged": [], "base_trainable": []}
    # bf16 on the GPU; a CPU dry run stays fp32 (this CPU has no fast bf16)
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        for _ in range(5):
            for label in times:
                if label == "base_trainable":
                    base.requires_grad_(True)
                    times[label].append(_time(lambda: base(x), repeats=10))
                    base.requires_grad_(False)
                else:
                    model = merged if label == "merged" else base
                    times[label].append(_time(lambda m=model: m(x), repeats=10))
    med = {k: float(np.median(v)) for k, v in times.items()}
    return {
        **{k: round(v * 1e3, 3) for k, v in med.items()},
        "merged_vs_base_frozen": round(med["merged"] / med["base_frozen"], 3),
        "base_trainable_vs_frozen": round(med["base_trainable"] / med["base_frozen"], 3),
    }


def _time(fn: Callable[[], Any], repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


@section("train_cli_bf16")
def train_cli(work: Path, device: str, repo: Path) -> dict[str, Any]:
    manifest = work / "manifest.csv"
    cli("manifest", "cpu32" if not (work / "gpu32").exists() else "gpu32", "--labels", "slides/labels.csv",
        "--out", str(manifest), "--val-fraction", "0.5", "--overwrite", cwd=work)  # fmt: skip
    # tile all slides with resnet18 on the GPU so every labelled slide has a bag
    cli("tile", "slides", "--out", "tiles", "--backbone", "resnet18", "--no-pretrained", "--no-progress",
        "--accelerator", device, cwd=work)  # fmt: skip
    cli("manifest", "tiles", "--labels", "slides/labels.csv", "--out", str(manifest), "--val-fraction", "0.5",
        "--overwrite", cwd=work)  # fmt: skip
    seconds, _ = cli(
        "train", str(repo / "configs" / "camelyon_comel.yaml"), "--set", f"data.manifest={manifest}",
        "--set", "data.annotations=slides/annotations", "--set", "trainer.max_epochs=2",
        "--set", f"trainer.accelerator={'gpu' if device == 'cuda' else 'cpu'}",
        "--set", f"trainer.precision={'bf16-mixed' if device == 'cuda' else '32-true'}",
        "--set", "run.name=gpu", "--set", "run.overwrite=true", cwd=work,
    )  # fmt: skip
    metrics = json.loads((work / "runs" / "gpu" / "test_metrics.json").read_text())
    return {"seconds": round(seconds, 1), "test_metrics": metrics}


@section("segment_cli_bf16")
def segment_cli(work: Path, device: str, repo: Path) -> dict[str, Any]:
    from pathopeft.seg.synth import make_shapes_dataset

    make_shapes_dataset(work / "shapes", 24, size=(128, 128), seed=0)
    seconds, _ = cli(
        "segment", "train", str(repo / "configs" / "seg_salt.yaml"), "--set", f"data.root={work / 'shapes'}",
        "--set", "data.masks_dir=masks", "--set", "model.encoder=vit_small_patch16_224",
        "--set", "model.weights=none", "--set", "model.img_size=128", "--set", "trainer.max_epochs=2",
        "--set", "adapter.extra_trainable=[pos_embed]",
        "--set", f"trainer.accelerator={'gpu' if device == 'cuda' else 'cpu'}",
        "--set", f"trainer.precision={'bf16-mixed' if device == 'cuda' else '32-true'}",
        "--set", "data.num_workers=2", "--set", "run.name=seg_gpu", "--set", "run.overwrite=true", cwd=work,
    )  # fmt: skip
    metrics = json.loads((work / "runs" / "seg_gpu" / "test_metrics.json").read_text())
    return {"seconds": round(seconds, 1), "test_metrics": metrics}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/pathopeft_gpu_check"))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="*", default=None)
    args = parser.parse_args()
    repo = Path(__file__).resolve().parents[1]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    steps: dict[str, Callable[[], None]] = {
        "environment": environment,
        "tile": lambda: tile(args.work, device, args.quick),
        "tile_throughput": lambda: section("tile_throughput")(tile_throughput)(
            args.work, device, 8192 if args.quick else 40_000, 2, 2 if args.quick else 12
        ),
        # a cohort of small slides: loader workers kept across slides (TileLoaderPool)
        "tile_small_cohort": lambda: section("tile_small_cohort")(tile_throughput)(
            args.work, device, 4096 if args.quick else 16_000, 8, 2 if args.quick else 12, ("auto",)
        ),
        "mil_step": lambda: mil_step(device, args.quick),
        "adapters_step": lambda: adapters_step(device, args.quick),
        "merged_inference": lambda: merged_inference(device, args.quick),
        "train_cli_bf16": lambda: train_cli(args.work, device, repo),
        "segment_cli_bf16": lambda: segment_cli(args.work, device, repo),
    }
    for name, step in steps.items():
        if args.only is None or name in args.only or name == "environment":
            step()
            (args.out / "gpu_check.json").write_text(json.dumps(RESULTS, indent=2, default=str))


if __name__ == "__main__":
    main()
