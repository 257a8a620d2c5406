"""Benchmark: tiles/s of the fast TIFF reader vs a bare OpenSlide ``read_region`` loop (target ≥ 3×).

Same 256-px tile coordinates (the tissue tile grid at level 0, row-major as the tile command reads
them), one process, fresh handles for every pass (cold caches for both readers; each keeps its
own tile cache within a pass: OpenSlide's default 32 MiB, ours ``cache_mb``). Also reported:
the fast reader with its cache off and with the coordinates shuffled.

    python benchmarks/bench_reader.py [--size 20000] [--workdir DIR] [--passes 5]

Slides: the real ``CMU-1-Small-Region.svs`` (Aperio, 240-px JPEG tiles) when ../shared/data is
present, and a synthetic generic TIFF (256-px JPEG tiles) generated into ``--workdir``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import openslide

from pathopeft.config.wsi import GridConfig, TissueConfig
from pathopeft.wsi import TileGrid, detect_tissue, open_slide
from pathopeft.wsi.synth import make_synthetic_slide

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PATHOPEFT_SHARED_DATA", REPO.parent / "shared" / "data"))
TILE = 256


def _coords(path: Path) -> np.ndarray:
    with open_slide(path) as slide:
        mask = detect_tissue(slide, TissueConfig())
        cfg = GridConfig(
            target_mpp=slide.mpp,
            tile_px=TILE,
            min_tissue_fraction=0.0 if slide.dimensions[0] < 5000 else 0.25,
        )
        return TileGrid.from_tissue(slide, mask, cfg).coords


def _rate(read_pass: Callable[[np.ndarray], None], coords: np.ndarray, passes: int) -> float:
    times = []
    for _ in range(passes):
        t = time.perf_counter()
        read_pass(coords)
        times.append(time.perf_counter() - t)
    return len(coords) / statistics.median(times)


def openslide_pass(path: Path) -> Callable[[np.ndarray], None]:
    def run(coords: np.ndarray) -> None:
        osr = openslide.OpenSlide(str(path))
        for x, y in coords:
            np.asarray(osr.read_region((int(x), int(y)), 0, (TILE, TILE)))
        osr.close()

    return run


def fast_pass(path: Path, cache_mb: float) -> Callable[[np.ndarray], None]:
    def run(coords: np.ndarray) -> None:
        slide = open_slide(path, backend="tiff", cache_mb=cache_mb)
        for x, y in coords:
            slide.read_region((int(x), int(y)), 0, (TILE, TILE))
        slide.close()

    return run


def bench(name: str, path: Path, passes: int) -> None:
    coords = _coords(path)
    shuffled = np.random.default_rng(0).permutation(coords)
    openslide_pass(path)(coords[:8])  # warm the OS file cache
    base = _rate(openslide_pass(path), coords, passes)
    fast = _rate(fast_pass(path, 64), coords, passes)
    nocache = _rate(fast_pass(path, 0), coords, passes)
    shuf = _rate(fast_pass(path, 64), shuffled, passes)
    base_shuf = _rate(openslide_pass(path), shuffled, passes)
    print(f"{name}: {len(coords)} tiles of {TILE} px, {passes} passes (median)")
    print(f"  OpenSlide read_region            {base:8.0f} tiles/s")
    print(f"  fast TIFF reader (64 MiB cache)  {fast:8.0f} tiles/s   {fast / base:5.2f}x")
    print(f"  fast TIFF reader, no cache       {nocache:8.0f} tiles/s   {nocache / base:5.2f}x")
    print(f"  shuffled: OpenSlide {base_shuf:.0f}, fast {shuf:.0f} tiles/s   {shuf / base_shuf:5.2f}x")
    print(f"  target >= 3x: {'met' if fast / base >= 3 else 'MISSED'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=20_000)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "pathopeft_bench")
    parser.add_argument("--passes", type=int, default=5)
    args = parser.parse_args()
    svs = SHARED / "wsi" / "CMU-1-Small-Region.svs"
    if svs.is_file():
        bench("CMU-1-Small-Region.svs (Aperio, 240-px JPEG tiles)", svs, args.passes)
    else:
        print(f"(no shared data at {SHARED}: skipping the real SVS)")
    args.workdir.mkdir(parents=True, exist_ok=True)
    synth = args.workdir / f"reader_{args.size}.tiff"
    if not synth.is_file():
        make_synthetic_slide(synth, width=args.size, height=args.size, seed=2, n_tissue=4)
    bench(
        f"synthetic generic TIFF {args.size}x{args.size} (256-px JPEG tiles)", synth, max(1, args.passes // 2)
    )


if __name__ == "__main__":
    main()
