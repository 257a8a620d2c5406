"""Benchmark: the whole ``pathopeft heatmap`` export of a synthetic 100k × 100k slide with 50k tiles.

Target (issue 10): peak RSS < 2 GB — the export never allocates a level-0-sized array; the
pyramidal TIFF is streamed tile by tile from the small score raster. Printed against, in the
same run:

* the size of one level-0 RGB uint8 array of this slide (what a tool that paints the heatmap at
  full resolution must hold; computed, not allocated: 30 GB at 100k × 100k);
* the measured peak RSS of a child that only imports pathopeft and loads the checkpoint and the
  bag (the floor any export pays), so ``export - floor`` is what the writers add.

The export runs as ``python -m pathopeft heatmap`` in a child process; peak RSS is the child's
``ru_maxrss`` (``os.wait4``). The model is an untrained ABMIL (random weights, seed 0): its
scores are irrelevant to cost. The machine is shared and noisy: read times with that in mind.

    python benchmarks/bench_heatmap.py [--size 100000] [--tiles 50000] [--workdir DIR] [--formats ...]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import shapely
import torch

from pathopeft.bags import FeatureBag, write_bag
from pathopeft.mil.module import MILModule
from pathopeft.wsi.synth import make_synthetic_slide

DIM = 64


def _inputs(workdir: Path, size: int, n_tiles: int) -> tuple[Path, Path, Path, int]:
    slides, feats = workdir / "slides", workdir / "features"
    slide = slides / f"bench_{size}.tiff"
    if not slide.is_file():
        t = time.perf_counter()
        info = make_synthetic_slide(slide, width=size, height=size, seed=3, n_tissue=4, lesions=2, tile=512)
        mb, dt = slide.stat().st_size / 1e6, time.perf_counter() - t
        print(f"synthesized {slide.name} ({mb:.0f} MB) in {dt:.1f} s")
        tissue = shapely.union_all([shapely.Polygon(p) for p in info.tissue_polygons])
        # the tile side that puts ~n_tiles tiles on the tissue
        tile = max(16, round((tissue.area / n_tiles) ** 0.5))
        xs, ys = np.meshgrid(np.arange(0, size - tile + 1, tile), np.arange(0, size - tile + 1, tile))
        grid = np.stack([xs.ravel(), ys.ravel()], 1)
        coords = grid[shapely.contains(tissue, shapely.points(grid + tile / 2))][:n_tiles].astype(np.int64)
        rng = np.random.default_rng(0)
        attrs = {"backbone": "bench", "patch_size_level0": tile}
        write_bag(
            feats / f"{slide.stem}.h5",
            FeatureBag(slide.stem, rng.normal(size=(len(coords), DIM)), coords, attrs),
        )
        (workdir / "tile.txt").write_text(str(tile))
    ckpt = workdir / "bench.ckpt"
    if not ckpt.is_file():
        torch.manual_seed(0)
        module = MILModule(
            model={"name": "abmil", "in_dim": DIM, "embed_dim": 128, "attn_hidden": 64},
            tasks=[{"name": "camelyon16", "classes": ["normal", "tumor"]}],
        )
        torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, ckpt)
    return slides, feats, ckpt, int((workdir / "tile.txt").read_text())


def _child(args: list[str]) -> tuple[float, int, int]:
    """(seconds, peak RSS bytes, exit status) of a child process."""
    t = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    out = proc.stdout.read().decode() if proc.stdout else ""
    if status:
        print(out)
    return time.perf_counter() - t, usage.ru_maxrss * 1024, os.waitstatus_to_exitcode(status)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=100_000)
    parser.add_argument("--tiles", type=int, default=50_000)
    parser.add_argument(
        "--workdir", type=Path, default=Path(tempfile.gettempdir()) / "pathopeft_bench_heatmap"
    )
    parser.add_argument("--formats", default="geojson,png,csv,tiff")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    slides, feats, ckpt, tile = _inputs(args.workdir, args.size, args.tiles)
    floor_code = (
        "from pathopeft.mil.module import MILModule; from pathopeft.bags import read_bag; "
        f"m = MILModule.from_checkpoint({str(ckpt)!r}); b = read_bag({str(next(feats.glob('*.h5')))!r}); "
        "import pathopeft.heatmaps.processor"
    )
    floor_s, floor_rss, _ = _child([sys.executable, "-c", floor_code])
    out = args.workdir / "out"
    cmd = [
        sys.executable,
        "-m",
        "pathopeft",
        "heatmap",
        str(ckpt),
        "--slides",
        str(slides),
        "--features",
        str(feats),
    ]
    cmd += ["--out", str(out), "--formats", args.formats, "--overwrite", "--gate", "none"]
    seconds, rss, code = _child(cmd)
    level0 = args.size * args.size * 3
    sizes = {p.name: p.stat().st_size for p in out.iterdir() if p.is_file()}
    n_tiles = (out / "manifest.csv").read_text().splitlines()[1].split(",")[7] if code == 0 else "?"
    print(f"slide {args.size} x {args.size}, {n_tiles} tiles of {tile} px, formats {args.formats}")
    print(
        f"export: exit {code}, {seconds:.1f} s, peak RSS {rss / 2**30:.2f} GiB (target < 2 GB: {rss < 2e9})"
    )
    print(f"floor (import + load checkpoint and bag): {floor_s:.1f} s, peak RSS {floor_rss / 2**30:.2f} GiB")
    print(f"level-0 RGB array: {level0 / 2**30:.1f} GiB -> export RSS / level-0 array = {rss / level0:.4f}")
    print(f"export RSS - floor = {(rss - floor_rss) / 2**20:.0f} MiB")
    for name, n in sorted(sizes.items()):
        print(f"  {name}: {n / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
