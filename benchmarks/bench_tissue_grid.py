"""Benchmark: tissue detection + tile grid on a synthetic 100k × 100k slide (target < 3 s).

Baseline, measured in the same run: reading the low-resolution level that tissue detection uses
with a bare OpenSlide ``read_region`` (the part no implementation can avoid). The ratio
(ours / baseline) shows how much the mask + grid add on top of that read.

    python benchmarks/bench_tissue_grid.py [--size 100000] [--workdir DIR] [--repeat 3]

The slide is generated once and cached in ``--workdir`` (default: the system temp folder).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import openslide

from pathopeft.config.wsi import GridConfig, TissueConfig
from pathopeft.wsi import TileGrid, detect_tissue, open_slide
from pathopeft.wsi.synth import make_synthetic_slide


def _slide(workdir: Path, size: int, mpp: float) -> Path:
    path = workdir / f"bench_{size}_{mpp:g}.tiff"
    if not path.is_file():
        t = time.perf_counter()
        make_synthetic_slide(path, width=size, height=size, mpp=mpp, seed=1, n_tissue=6, quality=70)
        print(
            f"synthesized {path.name} ({path.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t:.1f} s"
        )
    return path


def _timeit(fn, repeat: int) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=100_000)
    parser.add_argument("--mpp", type=float, default=0.5)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "pathopeft_bench")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    path = _slide(args.workdir, args.size, args.mpp)
    tissue_cfg, grid_cfg = TissueConfig(), GridConfig()

    result: dict[str, object] = {}

    def ours() -> None:
        with open_slide(path) as slide:
            mask = detect_tissue(slide, tissue_cfg)
            grid = TileGrid.from_tissue(slide, mask, grid_cfg)
        result.update(mask=mask, grid=grid)

    ours()  # warm-up (file cache), also tells us which level the mask uses
    mask, grid = result["mask"], result["grid"]
    level = mask.level  # type: ignore[attr-defined]

    def baseline() -> None:
        osr = openslide.OpenSlide(str(path))
        np.asarray(osr.read_region((0, 0), level, osr.level_dimensions[level]))
        osr.close()

    def ours_openslide() -> None:
        with open_slide(path, backend="openslide") as slide:
            mask = detect_tissue(slide, tissue_cfg)
            TileGrid.from_tissue(slide, mask, grid_cfg)

    def grid_only() -> None:
        with open_slide(path) as slide:
            TileGrid.from_tissue(slide, mask, grid_cfg)  # type: ignore[arg-type]

    baseline()
    t_base = _timeit(baseline, args.repeat)
    t_ours = _timeit(ours, args.repeat)
    t_grid = _timeit(grid_only, args.repeat)
    t_ours_os = _timeit(ours_openslide, args.repeat)
    positions = (args.size // grid.tile_size_level0) ** 2  # type: ignore[attr-defined]
    print(
        f"slide {args.size}x{args.size} @ {args.mpp} um/px; mask level {level} {mask.mask.shape[::-1]} "  # type: ignore[attr-defined]
        f"at {mask.mpp:.1f} um/px; {positions:.0f} grid positions, {len(grid)} tiles kept"
    )  # type: ignore[attr-defined,arg-type]
    print(f"baseline  OpenSlide read of level {level}: {t_base:.3f} s")
    print(f"ours      open + tissue + grid:          {t_ours:.3f} s  (grid alone {t_grid:.3f} s)")
    print(f"ours, OpenSlide backend forced:          {t_ours_os:.3f} s")
    print(f"ratio ours/baseline = {t_ours / t_base:.2f}x; target < 3 s: {'met' if t_ours < 3 else 'MISSED'}")


if __name__ == "__main__":
    main()
