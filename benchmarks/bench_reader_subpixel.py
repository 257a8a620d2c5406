"""Benchmark: the fast TIFF reader above level 0 on a non-integer-downsample pyramid (issue 13 item 4).

Real pyramids are floor-rounded (downsample 4.000121 ...), so level-1 reads almost never start on
a whole level pixel and both readers resample bilinearly by the sub-pixel offset. Measured, on the
same random 256-px level-1 reads (one process, fresh handles per pass, median of passes):

* bare OpenSlide ``read_region`` (baseline, the reference pixels);
* the fast reader (``backend: tiff``) with the sub-pixel resampling;
* the fast reader at the same reads snapped to whole level pixels (what it did before: no
  resampling), to show what the resampling costs.

Also prints the max / mean abs difference to OpenSlide (tolerance: max ≤ 3, mean ≤ 0.5).

    python benchmarks/bench_reader_subpixel.py [--size 6000] [--reads 600] [--passes 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import openslide
import tifffile

from pathopeft.wsi import open_slide
from pathopeft.wsi.synth import make_synthetic_slide

TILE = 256


def build(workdir: Path, size: int) -> Path:
    flat = workdir / "flat.tiff"
    make_synthetic_slide(flat, width=size, height=size, levels=1, seed=7, tile=256)
    with open_slide(flat) as slide:
        level0 = slide.read_level(0)
    dims = [(size // 4 - 1, size // 4 - 1), (size // 8 - 1, size // 8 - 1)]  # ds ≈ 4.003, 8.01
    path = workdir / "nonint.tiff"
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for i, (w, h) in enumerate([(size, size), *dims]):
            image = level0 if i == 0 else cv2.resize(level0, (w, h), interpolation=cv2.INTER_AREA)
            tw.write(image, tile=(256, 256), compression="jpeg", photometric="rgb",
                     subfiletype=0 if i == 0 else 1, resolution=(2e4, 2e4),
                     resolutionunit="CENTIMETER")  # fmt: skip
    return path


def timed(run: Callable[[], None], passes: int) -> float:
    times = []
    for _ in range(passes):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=6000)
    ap.add_argument("--reads", type=int, default=600)
    ap.add_argument("--passes", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = build(Path(tmp), args.size)
        osr = openslide.OpenSlide(str(path))
        ds = float(osr.level_downsamples[1])
        w1, h1 = osr.level_dimensions[1]
        osr.close()
        rng = np.random.default_rng(0)
        lim_x, lim_y = int((w1 - TILE - 2) * ds), int((h1 - TILE - 2) * ds)
        locs = [(int(rng.integers(0, lim_x)), int(rng.integers(0, lim_y))) for _ in range(args.reads)]
        snapped = [(round(int(x / ds) * ds), round(int(y / ds) * ds)) for x, y in locs]
        frac = np.mean([(x / ds) % 1 > 1e-6 for x, _ in locs])

        def openslide_pass() -> None:
            ref = openslide.OpenSlide(str(path))
            for loc in locs:
                np.asarray(ref.read_region(loc, 1, (TILE, TILE)))
            ref.close()

        def fast_pass(where: list[tuple[int, int]]) -> Callable[[], None]:
            def run() -> None:
                slide = open_slide(path, backend="tiff")
                for loc in where:
                    slide.read_region(loc, 1, (TILE, TILE))
                slide.close()

            return run

        fast_pass(locs)()  # warm the OS file cache
        base = timed(openslide_pass, args.passes)
        fast = timed(fast_pass(locs), args.passes)
        snap = timed(fast_pass(snapped), args.passes)
        ref, mine = open_slide(path, backend="openslide"), open_slide(path, backend="tiff")
        diffs = [
            np.abs(
                mine.read_region(loc, 1, (TILE, TILE)).astype(np.int16)
                - ref.read_region(loc, 1, (TILE, TILE))
            )
            for loc in locs[:100]
        ]
        n = len(locs)
        print(f"level-1 downsample {ds:.6f}; {frac:.0%} of the reads start between level pixels")
        print(f"OpenSlide read_region          {n / base:8.0f} tiles/s")
        print(f"fast reader, sub-pixel         {n / fast:8.0f} tiles/s  ({base / fast:.2f}x OpenSlide)")
        print(f"fast reader, snapped (old)     {n / snap:8.0f} tiles/s  ({base / snap:.2f}x OpenSlide)")
        print(f"resampling cost: {fast / snap:.2f}x the snapped read")
        worst, mean = max(int(d.max()) for d in diffs), float(np.mean([d.mean() for d in diffs]))
        print(f"vs OpenSlide: max abs {worst}, mean {mean:.3f}")


if __name__ == "__main__":
    main()
