"""GDAT scaling: CoMEL forward+backward time and peak memory at N = 10^3, 10^4, 10^5 tiles.

    python benchmarks/bench_gdat.py                      # CoMEL vs TransMIL vs ABMIL, D = 1024, fp32, CPU
    python benchmarks/bench_gdat.py --sizes 1000 10000   # quicker
    python benchmarks/bench_gdat.py --grouping-study     # only the file-order vs spatial grouping study
    python benchmarks/bench_gdat.py --sizes 1000 10000 --grouping-study   # both

Each (model, N) runs in a fresh subprocess so its peak memory is its own: the peak resident set
size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) of that process, reported both as is and as
the increase over the RSS just before the forward pass (after imports, model and input are
built). RSS counts every allocation of torch's CPU allocator, which tracemalloc does not see.
Time is one forward + backward of the whole model (bag logits → cross-entropy) after a warm-up on
a small bag (best of 3 up to 10^4 tiles, one run above), single-threaded. Both wall time and the
process's CPU time are reported; ratios use CPU time, which on a shared machine excludes the time
the process waits for a core (with one thread, CPU time is the work done). Targets (issue #5):
t(10^5)/t(10^4) ≤ 12 (linear scaling) and peak memory at 10^5 < 6 GB.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import subprocess
import sys
import time

MODELS = ("comel", "transmil", "abmil")


def _worker(name: str, n: int, dim: int, threads: int, checkpointing: str, grouping: str) -> dict:
    import torch

    from pathopeft.mil import create_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    ckpt = {"auto": "auto", "on": True, "off": False}[checkpointing]
    options = {"grad_checkpointing": ckpt, "grouping": grouping} if name == "comel" else {}
    model = create_model(name, in_dim=dim, tasks=[{"name": "t", "classes": ["a", "b"]}], **options).train()
    side = math.ceil(math.sqrt(n))
    cells = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="xy"), -1).reshape(
        -1, 2
    )
    coords = (cells[torch.randperm(len(cells))[:n]] * 256)[None]
    label = torch.tensor([1])

    def step(x: torch.Tensor, c: torch.Tensor) -> None:
        out = model(x, coords=c)
        torch.nn.functional.cross_entropy(out.logits, label).backward()
        model.zero_grad(set_to_none=True)

    warm = min(n, 1000)
    step(torch.randn(1, warm, dim), coords[:, :warm])
    x = torch.randn(1, n, dim)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    repeats = 3 if n <= 10_000 else 1
    times, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        step(x, coords)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB → GiB
    return {
        "model": name,
        "n": n,
        "seconds": min(times),
        "cpu_seconds": min(cpu),
        "peak_gb": peak,
        "base_gb": base,
    }


def _measure(name: str, n: int, args: argparse.Namespace, checkpointing: str = "auto") -> dict | None:
    cmd = [sys.executable, __file__, "--worker", name, str(n), str(args.dim), str(args.threads)]
    cmd += ["--checkpointing", checkpointing]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        print(f"  {name} N={n}: failed ({proc.stderr.strip().splitlines()[-1:]})")
        return None
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    label = name
    if name == "comel":
        on = checkpointing == "on" or (checkpointing == "auto" and n >= 16_384)
        label += f" ({checkpointing}: {'ckpt' if on else 'plain'})"
    print(
        f"  {label:22s} N={n:>7,}  fwd+bwd {result['seconds']:8.2f} s wall {result['cpu_seconds']:8.2f} s CPU"
        f"   peak RSS {result['peak_gb']:5.2f} GiB"
        f" (+{result['peak_gb'] - result['base_gb']:.2f} over {result['base_gb']:.2f})",
        flush=True,
    )
    return result


def _grouping_study(seeds: int) -> None:
    """Train CoMEL with file-order vs spatial grouping on synthetic bags (shuffled file order)."""
    import tempfile
    import warnings

    import lightning

    from pathopeft.config import load_config
    from pathopeft.config.train import TrainConfig
    from pathopeft.mil.data import MILDataModule
    from pathopeft.mil.synthetic import make_synthetic_bags
    from pathopeft.mil.train import build_module

    warnings.filterwarnings("ignore")
    print("\nGrouping study: CoMEL (dim 64, 4 heads, G = 16), 32 train / 12 test synthetic bags, 10 epochs")
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for seed in range(seeds):
            cohort = make_synthetic_bags(
                f"{tmp}/c{seed}", n_train=32, n_val=8, n_test=12, side=(8, 12), signal=0.8, seed=seed
            )
            for grouping in ("order", "coords"):
                cfg = load_config(
                    TrainConfig,
                    None,
                    [
                        f"data.manifest={cohort.manifest}",
                        f"data.features_dir={cohort.root / 'features'}",
                        "data.coords_dir=null",
                        f"data.annotations={cohort.annotations_dir}",
                        "model.comel.embed_dim=64",
                        "model.comel.heads=4",
                        "model.comel.groups=16",
                        f"model.comel.grouping={grouping}",
                        "optimizer.lr=1e-3",
                        f"seed={seed}",
                    ],
                )
                lightning.seed_everything(seed, verbose=False)
                logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
                data = MILDataModule(cfg.data, seed=seed)
                data.prepare()
                module = build_module(cfg, data.in_dim)
                trainer = lightning.Trainer(
                    max_epochs=10, accelerator="cpu", logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                    check_val_every_n_epoch=10**6,
                )  # fmt: skip
                start = time.perf_counter()
                trainer.fit(module, datamodule=data)
                trainer.test(module, datamodule=data, verbose=False)
                r = module.test_results
                rows.append((grouping, seed, r["bag_auc"], r["instance_auc"], r["tile_dice"]))
                print(
                    f"  seed {seed} {grouping:6s}: bag AUC {r['bag_auc']:.3f}  instance AUC "
                    f"{r['instance_auc']:.3f}  tile Dice {r['tile_dice']:.3f}"
                    f"  ({time.perf_counter() - start:.0f} s)",
                    flush=True,
                )
        for grouping in ("order", "coords"):
            sel = [r for r in rows if r[0] == grouping]
            mean = [sum(r[i] for r in sel) / len(sel) for i in (2, 3, 4)]
            print(
                f"  mean {grouping:6s}: bag AUC {mean[0]:.3f}  instance AUC {mean[1]:.3f}"
                f"  tile Dice {mean[2]:.3f}"
            )


def _annotation_timing() -> None:
    """Tile labels from an annotation: 10^5 tiles against a detailed outline with a hole."""
    import numpy as np

    from pathopeft.wsi.annotations import Region, tile_labels

    t = np.linspace(0, 2 * np.pi, 2000, endpoint=False)
    r = 60000 * (1 + 0.1 * np.sin(7 * t))
    outer = np.stack([80000 + r * np.cos(t), 80000 + r * np.sin(t)], 1)
    inner = np.stack([80000 + 20000 * np.cos(t), 80000 + 20000 * np.sin(t)], 1)
    coords = np.stack(np.meshgrid(np.arange(316) * 512, np.arange(316) * 512), -1).reshape(-1, 2)
    start = time.process_time()
    labels = tile_labels([Region(outer, [inner])], coords, 512)
    seconds = time.process_time() - start
    print(
        f"\nTile labels: {len(coords):,} tiles vs a 2,000-vertex outline with a hole: {seconds:.2f} s CPU"
        f" ({labels.sum():,} tumour tiles)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=None,
        help="instance counts of the scaling benchmark (default 1000 10000 100000; "
        "with --grouping-study and no --sizes, only the study runs)",
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--grouping-study", action="store_true")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--worker", nargs=4, metavar=("MODEL", "N", "DIM", "THREADS"))
    parser.add_argument("--checkpointing", choices=["auto", "on", "off"], default="auto")
    parser.add_argument("--grouping", default="order")
    args = parser.parse_args()
    if args.worker:
        name, n, dim, threads = args.worker
        print(json.dumps(_worker(name, int(n), int(dim), int(threads), args.checkpointing, args.grouping)))
        return

    if args.sizes is None and args.grouping_study:
        _grouping_study(args.seeds)
        return
    args.sizes = args.sizes or [1_000, 10_000, 100_000]
    print(f"forward+backward, D = {args.dim}, fp32, CPU, {args.threads} thread(s); one fresh process per run")
    results: dict[tuple[str, int], dict] = {}
    for n in args.sizes:
        for name in args.models:
            r = _measure(name, n, args)
            if r:
                results[name, n] = r
    if "comel" in args.models and 10_000 in args.sizes and 100_000 in args.sizes:
        same_mode = _measure("comel", 10_000, args, checkpointing="on")
        big = results.get(("comel", 100_000))
        if same_mode and big:
            ratio = big["cpu_seconds"] / same_mode["cpu_seconds"]
            print(
                f"\nCoMEL t(10^5)/t(10^4), both with checkpointing = {ratio:.2f} (target ≤ 12; 10 = linear)"
            )
            plain = results["comel", 10_000]["cpu_seconds"]
            print(f"CoMEL t(10^5)/t(10^4), default settings (auto) = {big['cpu_seconds'] / plain:.2f}")
            print(f"CoMEL peak RSS at 10^5, default settings = {big['peak_gb']:.2f} GiB (target < 6 GB)")
        for name in args.models:
            if name != "comel" and (name, 10_000) in results and (name, 100_000) in results:
                other = results[name, 100_000]["cpu_seconds"] / results[name, 10_000]["cpu_seconds"]
                print(
                    f"{name} t(10^5)/t(10^4) = {other:.2f}, "
                    f"peak RSS at 10^5 {results[name, 100_000]['peak_gb']:.2f} GiB"
                )
    _annotation_timing()
    if args.grouping_study:
        _grouping_study(args.seeds)


if __name__ == "__main__":
    main()
