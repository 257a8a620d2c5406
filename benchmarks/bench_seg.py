"""Segmentation training cost per tuning setting: step time and peak memory, one run, on CPU.

ViT-S/16 (``vit_small_patch16_224`` built at 256 px, random init) + UNETR decoder; for each
setting — frozen encoder, full fine-tuning, LoRA, SALT, SVFit, WaRA (the shipped configs' options)
— one training step is forward + Dice/CE loss + backward + AdamW step on a batch of 256-px
crops. Every setting runs in its own fresh process so peak resident memory (``ru_maxrss``) belongs
to it alone; the "training" column is the peak minus the RSS after the model was built (i.e. the
activations, gradients and optimizer state that training adds).

    python benchmarks/bench_seg.py [--batch-size 2] [--steps 6] [--threads 2]

Prints a table with ratios against the frozen encoder and against full fine-tuning.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

TARGETS = r".*blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"
SETTINGS: dict[str, dict] = {
    "frozen": {"mode": "frozen"},
    "full": {"mode": "full"},
    "lora": {"method": "lora", "targets": TARGETS, "options": {"rank": 8, "alpha": 8.0}},
    "salt": {
        "method": "salt",
        "targets": TARGETS,
        "options": {"ratio": 0.1, "lora_rank": 8},
        "train_norms": True,
        "extra_trainable": ["pos_embed"],
    },
    "svfit": {
        "method": "svfit",
        "targets": TARGETS,
        "options": {"energy": 0.99, "max_rank": 256},
        "train_norms": True,
    },
    "wara": {"method": "wara", "targets": TARGETS, "options": {"rank": 4, "alpha": 4.0}},
}


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _current_rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(name: str, batch_size: int, steps: int, img_size: int) -> dict:
    import torch

    from pathopeft.config.segment import SegmentTrainConfig
    from pathopeft.seg.metrics import build_loss
    from pathopeft.seg.model import build_model, trainable_summary

    torch.manual_seed(0)
    cfg = SegmentTrainConfig.model_validate(
        {
            "model": {
                "encoder": "vit_small_patch16_224",
                "weights": "none",
                "img_size": img_size,
                "decoder": "unetr",
                "decoder_channels": 16,
            },
            "adapter": SETTINGS[name],
        }
    )
    t0 = time.perf_counter()
    model = build_model(cfg).train()
    build_s = time.perf_counter() - t0
    loss_fn = build_loss(cfg.loss)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    image = torch.randn(batch_size, 3, img_size, img_size)
    mask = (torch.rand(batch_size, 1, img_size, img_size) > 0.7).long()
    built_rss = _current_rss_mib()
    times = []
    for _ in range(steps + 2):  # 2 warm-up steps (allocator, optimizer state creation)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(image), mask)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    summary = trainable_summary(model)
    return {
        "setting": name,
        "step_s": statistics.median(times[2:]),
        "peak_rss_mib": _rss_mib(),
        "train_mib": _rss_mib() - built_rss,
        "trainable": summary["trainable"],
        "share": summary["share"],
        "build_s": build_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--img-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(worker(args.worker, args.batch_size, args.steps, args.img_size)))
        return
    rows = []
    for name in args.settings:
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            name,
            "--batch-size",
            str(args.batch_size),
            "--steps",
            str(args.steps),
            "--img-size",
            str(args.img_size),
            "--threads",
            str(args.threads),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONWARNINGS": "ignore"}
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(f"measured {name}", file=sys.stderr, flush=True)
    base = {r["setting"]: r for r in rows}
    frozen, full = base.get("frozen"), base.get("full")
    print(
        f"ViT-S/16 at {args.img_size} px + UNETR, batch {args.batch_size}, CPU, {args.threads} thread(s), "
        f"median of {args.steps} steps"
    )
    header = "setting | trainable | share | step (s) | × frozen | × full | peak RSS (MiB) | training MiB"
    print(f"| {header} | × frozen | × full |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        t_fro = r["step_s"] / frozen["step_s"] if frozen else float("nan")
        t_full = r["step_s"] / full["step_s"] if full else float("nan")
        m_fro = r["train_mib"] / frozen["train_mib"] if frozen else float("nan")
        m_full = r["train_mib"] / full["train_mib"] if full else float("nan")
        print(
            f"| {r['setting']} | {r['trainable']:,} | {100 * r['share']:.2f}% | {r['step_s']:.3f} | "
            f"{t_fro:.2f} | {t_full:.2f} | {r['peak_rss_mib']:.0f} | {r['train_mib']:.0f} | "
            f"{m_fro:.2f} | {m_full:.2f} |"
        )


if __name__ == "__main__":
    main()
