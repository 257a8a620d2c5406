"""Feature-stage tile loading: our Dataset/DataLoader vs a bare OpenSlide ``read_region`` loop.

What is timed, over the same level-0 coordinates, in one run:

* baseline: ``openslide.OpenSlide.read_region`` in a plain loop (1 process, then 2 processes each
  taking half of the coordinates; timed inside the processes);
* ours: :class:`pathopeft.features.dataset.TileDataset` through ``make_tile_loader`` with 1 and 2
  workers — read (``pathopeft.wsi.open_slide``, fast TIFF reader when it applies) + decode +
  batching, then resize (256 → 224, the default ``resize_to: model``) + normalisation to float
  (:class:`~pathopeft.features.dataset.Preprocess`) — feeding an identity model, as
  ``FeatureExtractor`` runs it:

  - GPU path: workers ship uint8 256-px batches; resize + normalisation run on the GPU (none
    here, so not timed);
  - CPU path: workers also resize to 224 (anti-aliased bicubic); the main process normalises.

Each rate is reported in steady state (from the first batch on) and, in parentheses, including
the per-slide loader start-up (worker start + first batch). Ratios are ours / OpenSlide at equal
worker counts, steady state. Measurements are interleaved and the best of ``--repeats`` is kept.
Slides: a synthetic pyramidal JPEG TIFF (generic-tiff) and, when ../shared/data is present, the
real Aperio SVS.

Cohort of small slides (biopsies): ``--cohort-slides`` slides of ``--cohort-tiles`` tiles each,
read (GPU path) by a new DataLoader per slide (fresh workers per slide: the baseline) and by one
:class:`~pathopeft.features.dataset.TileLoaderPool` kept across the slides (what
``FeatureExtractor`` does), batches split over the workers as ``FeatureExtractor`` splits them.

    python benchmarks/bench_tile_loading.py [--size 16384] [--max-tiles 4096] [--repeats 2]
                                            [--cohort-slides 8] [--cohort-tiles 300] [--workers 1,2,4,8]
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import openslide
import torch

from pathopeft.features.dataset import Preprocess, TileDataset, TileLoaderPool, make_tile_loader
from pathopeft.wsi import open_slide

TILE = 256
OUT = 224
BATCH = 64
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
STARTUP: list[float] = []  # seconds from loader creation to the first batch, per run
SHARED = Path(
    os.environ.get("PATHOPEFT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)


def grid_coords(width: int, height: int, max_tiles: int, offset: int = 0) -> np.ndarray:
    xs = np.arange(offset, width - TILE + 1, TILE)
    ys = np.arange(offset, height - TILE + 1, TILE)
    coords = np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2)  # row-major, as the grid is
    return coords[:max_tiles]


def _openslide_loop(args: tuple[str, np.ndarray]) -> tuple[int, float]:
    path, coords = args
    osr = openslide.OpenSlide(path)
    start = time.perf_counter()
    for x, y in coords:
        osr.read_region((int(x), int(y)), 0, (TILE, TILE))
    elapsed = time.perf_counter() - start
    osr.close()
    return len(coords), elapsed


def bench_openslide(path: Path, coords: np.ndarray, workers: int) -> float:
    """Tiles/s of the bare loop; with several processes, total tiles over the slowest one's loop time
    (spawned processes, timed inside, so interpreter start-up is not charged to OpenSlide)."""
    if workers == 1:
        n, elapsed = _openslide_loop((str(path), coords))
        return n / elapsed
    parts = np.array_split(coords, workers)  # contiguous rows per process, like a sharded reader
    with mp.get_context("spawn").Pool(workers) as pool:
        results = pool.map(_openslide_loop, [(str(path), p) for p in parts])
    return sum(n for n, _ in results) / max(t for _, t in results)


def bench_ours(path: Path, coords: np.ndarray, workers: int, *, cpu_path: bool) -> tuple[float, float]:
    """(steady-state tiles/s from the first batch on, tiles/s including loader start-up)."""
    slide = open_slide(path)
    dataset = TileDataset(slide, coords, 0, TILE, TILE, input_size=OUT if cpu_path else None)
    prepare = Preprocess(MEAN, STD) if cpu_path else None
    model = torch.nn.Identity()
    n = n_first = 0
    start = time.perf_counter()
    first = None
    loader = make_tile_loader(dataset, batch_size=BATCH, num_workers=workers)
    with torch.inference_mode():
        for batch in loader:
            n += len(model(prepare(batch) if prepare is not None else batch))
            if first is None:
                first, n_first = time.perf_counter(), n
    end = time.perf_counter()
    assert n == len(coords) and first is not None
    STARTUP.append(first - start)
    return (n - n_first) / (end - first), n / (end - start)


def warm_up(path: Path, coords: np.ndarray) -> None:
    """Start the worker forkserver once (a run pays this once, not per slide)."""
    dataset = TileDataset(open_slide(path), coords[:4], 0, TILE, TILE)
    for _ in make_tile_loader(dataset, batch_size=4, num_workers=1):
        pass


def run(name: str, path: Path, coords: np.ndarray, repeats: int, counts: list[int]) -> list[str]:
    backend = open_slide(path).backend
    warm_up(path, coords)
    rows = [f"### {name} ({len(coords)} tiles of {TILE} px → {OUT} px, reader backend: {backend})", ""]
    rows += [
        "| workers | OpenSlide read_region | ours, GPU path (uint8 batches) | ratio "
        "| ours, CPU path (+ resize + normalise) | ratio |"
    ]
    rows += ["|---:|---:|---:|---:|---:|---:|"]
    for workers in counts:
        base, gpu, cpu = 0.0, (0.0, 0.0), (0.0, 0.0)
        for _ in range(repeats):  # interleaved, so load changes hit all three alike
            base = max(base, bench_openslide(path, coords, workers))
            gpu = max(gpu, bench_ours(path, coords, workers, cpu_path=False))
            cpu = max(cpu, bench_ours(path, coords, workers, cpu_path=True))
        rows.append(
            f"| {workers} | {base:,.0f} | {gpu[0]:,.0f} ({gpu[1]:,.0f}) | **{gpu[0] / base:.2f}×** "
            f"| {cpu[0]:,.0f} ({cpu[1]:,.0f}) | {cpu[0] / base:.2f}× |"
        )
        print(rows[-1], flush=True)
    return rows


def bench_cohort(path: Path, slides: list[np.ndarray], workers: int, *, pooled: bool) -> float:
    """Tiles/s over a cohort of small slides, each opened and read in full (GPU path, uint8)."""
    pool = TileLoaderPool(workers) if pooled else None
    n = 0
    start = time.perf_counter()
    for coords in slides:
        dataset = TileDataset(open_slide(path), coords, 0, TILE, TILE)
        batch = max(1, min(BATCH, math.ceil(len(coords) / workers)))
        loader = (
            pool.batches(dataset, batch)
            if pool is not None
            else make_tile_loader(dataset, batch_size=batch, num_workers=workers)
        )
        for tiles in loader:
            n += len(tiles)
    elapsed = time.perf_counter() - start
    if pool is not None:
        pool.close()
    assert n == sum(len(c) for c in slides)
    return n / elapsed


def run_cohort(
    path: Path, coords: np.ndarray, n_slides: int, n_tiles: int, repeats: int, counts: list[int]
) -> list[str]:
    slides = [coords[(i * n_tiles) % max(1, len(coords) - n_tiles) :][:n_tiles] for i in range(n_slides)]
    rows = [
        f"### Cohort of {n_slides} small slides × {len(slides[0])} tiles (GPU path, uint8 batches)",
        "",
        "| workers | new loader per slide | one pool across slides | ratio |",
        "|---:|---:|---:|---:|",
    ]
    for workers in counts:
        fresh = pooled = 0.0
        for _ in range(repeats):  # interleaved
            fresh = max(fresh, bench_cohort(path, slides, workers, pooled=False))
            pooled = max(pooled, bench_cohort(path, slides, workers, pooled=True))
        rows.append(
            f"| {workers} | {fresh:,.0f} tiles/s | {pooled:,.0f} tiles/s | **{pooled / fresh:.2f}×** |"
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=16384, help="synthetic slide side, px")
    parser.add_argument("--max-tiles", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=2, help="best of N per measurement")
    parser.add_argument("--cohort-slides", type=int, default=8, help="small slides in the cohort run")
    parser.add_argument("--cohort-tiles", type=int, default=300, help="tiles per small slide")
    parser.add_argument("--cohort-only", action="store_true", help="only the cohort measurement")
    parser.add_argument(
        "--workers",
        default="1,2",
        help="worker counts to measure, comma-separated (e.g. 1,2,4,8 on a machine with the cores)",
    )
    args = parser.parse_args()
    counts = [int(w) for w in args.workers.split(",") if w.strip()]
    torch.set_num_threads(1)
    from pathopeft.features.runtime import auto_workers, usable_cores

    report: list[str] = [
        f"cpu cores visible: {os.cpu_count()}, usable: {usable_cores()}; "
        f"default workers for one device: {auto_workers(1)}",
        "",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        from pathopeft.wsi.synth import make_synthetic_slide

        path = Path(tmp) / "synthetic.tiff"
        info = make_synthetic_slide(path, width=args.size, height=args.size, mpp=0.5, seed=0, n_tissue=4)
        coords = grid_coords(info.width, info.height, args.max_tiles)
        if not args.cohort_only:
            report += run(
                f"synthetic generic TIFF {args.size}×{args.size} (JPEG q80)",
                path,
                coords,
                args.repeats,
                counts,
            )
            report.append("")
        warm_up(path, coords)
        report += run_cohort(path, coords, args.cohort_slides, args.cohort_tiles, args.repeats, counts)
        report.append("")
    svs = SHARED / "wsi" / "CMU-1-Small-Region.svs"
    if svs.is_file() and not args.cohort_only:
        w, h = openslide.OpenSlide(str(svs)).dimensions
        # sub-tile offsets so there are enough distinct regions on this small (2220×2967) slide
        offsets = range(0, 256, 32)
        coords = np.concatenate([grid_coords(w, h, args.max_tiles, off) for off in offsets])
        report += run(
            "CMU-1-Small-Region.svs (Aperio, JPEG q30, 240-px stored tiles)",
            svs,
            coords,
            args.repeats,
            counts,
        )
    if STARTUP:
        report += [
            "",
            f"time to the first batch (worker start-up + one batch): median {np.median(STARTUP):.2f} s",
        ]
    print("\n".join(report))


if __name__ == "__main__":
    main()
