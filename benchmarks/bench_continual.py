"""Continual task addition: every method on the synthetic 3-task sequence, several seeds, one run.

Each method runs the same pipeline (:mod:`pathopeft.mil.continual.pipeline`) on the same cohorts
(:func:`pathopeft.mil.synthetic.make_task_sequence`) and seeds. Prints, per method, mean ± sd over
seeds of ACC / BWT / forgetting (bag accuracy: class-incremental, routed and task-aware), instance AUC
and the routed mode's routing accuracy,
plus per added task: trainable parameters, checkpoint growth and training time, against ``joint``
(retraining one model on every task).

    python benchmarks/bench_continual.py --seeds 3
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import pandas as pd
import yaml

from pathopeft.mil.continual.pipeline import run_pipeline
from pathopeft.mil.synthetic import make_task_sequence

ORGANS = ("breast", "liver", "colon")
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "synthetic_task.yaml"


# method variants: a pipeline method plus overrides for every task
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "owlora_no_protect_base": ("owlora", ["continual.protect_base=false"]),
    "owlora_protect_base": ("owlora", ["continual.protect_base=true"]),
}


def pipeline_file(
    tmp: Path, cohorts, name: str, seed: int, epochs: int | None, extra: list[str], forward_transfer: bool
) -> Path:
    method, variant_sets = VARIANTS.get(name, (name, []))
    tasks = []
    for organ, c in zip(ORGANS, cohorts):
        tasks.append(
            {
                "config": str(CONFIG),
                "set": [
                    f"data.manifest={c.manifest}",
                    f"data.features_dir={c.root / 'features'}",
                    f"data.annotations={c.annotations_dir}",
                    f"data.task={organ}",
                    f"data.classes=[{organ}_normal,{organ}_tumor]",
                    *([f"trainer.max_epochs={epochs}"] if epochs else []),
                    *variant_sets,
                    *extra,
                ],
            }
        )
    path = tmp / f"{name}_{seed}.yaml"
    run = {"name": f"{name}_{seed}", "root": str(tmp / "runs")}
    data = {"method": method, "seed": seed, "tasks": tasks, "run": run, "forward_transfer": forward_transfer}
    path.write_text(yaml.safe_dump(data))
    return path


def fmt(values: list[float]) -> str:
    values = [v for v in values if v == v]
    if not values:
        return "—"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):+.3f} ± {sd:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=None, help="default: the task config's")
    parser.add_argument(
        "--methods", default="owlora_protect_base,owlora_no_protect_base,lora,finetune,ewc,replay,joint"
    )
    parser.add_argument("--seed-list", default=None, help="comma-separated seeds (parallel processes)")
    parser.add_argument("--set", action="append", default=[], help="extra override for every task")
    parser.add_argument(
        "--no-forward-transfer", action="store_true", help="skip the from-scratch reference runs"
    )
    parser.add_argument("--out", default=None, help="CSV of every (method, seed, mode, metric)")
    parser.add_argument(
        "--shared-tissue", action="store_true", help="every organ on the same tissue (routing's hard case)"
    )
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    rows, sizes = [], []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        seeds = [int(v) for v in args.seed_list.split(",")] if args.seed_list else range(args.seeds)
        for seed in seeds:
            cohorts = make_task_sequence(tmp / f"data{seed}", ORGANS, seed=seed, dim=32, n_bags=(24, 8, 12),
                                         tiles=(60, 120), signal=4.0, lesion_share=(0.05, 0.15),
                                         shared_tissue=args.shared_tissue)  # fmt: skip
            for method in args.methods.split(","):
                start = time.perf_counter()
                forward = method != "joint" and not args.no_forward_transfer
                path = pipeline_file(tmp, cohorts, method, seed, args.epochs, args.set, forward)
                out = run_pipeline(path)
                seconds = time.perf_counter() - start
                summary = pd.read_csv(out / "results" / "summary.csv")
                summary["method"] = method
                summary["seed"], summary["seconds"] = seed, seconds
                rows.append(summary)
                folders = [out / "joint"] if method == "joint" else sorted(out.glob("task*_*"))
                for i, folder in enumerate(folders):
                    test = json.loads((folder / "test_metrics.json").read_text())
                    sizes.append({"method": method, "seed": seed, "task": i,
                                  "ckpt_mb": (folder / "best.ckpt").stat().st_size / 2**20,
                                  "fit_s": test.get("fit_seconds", float("nan")),
                                  "trainable": test.get("trainable", "")})  # fmt: skip
                print(f"  seed {seed} {method}: {seconds:.0f} s", flush=True)
    frame = pd.concat(rows)
    if args.out:
        frame.to_csv(args.out, index=False)
    sequence = " → ".join(ORGANS)
    epochs = args.epochs or "config's"
    print(
        f"\n3-task synthetic sequence ({sequence}), seeds {list(seeds)}, {epochs} epochs per task, {args.set}"
        + (", shared tissue" if args.shared_tissue else "")
    )
    print(
        "| method | mode | ACC bag acc | BWT bag acc | forgetting | FWT bag acc | ACC inst. AUC "
        "| routing acc. | s/run |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for method in args.methods.split(","):
        for mode in ("class_incremental", "routed", "task_aware"):
            g = frame[(frame["method"] == method) & (frame["mode"] == mode)]
            acc = g[g["metric"] == "bag_accuracy"]
            inst = g[g["metric"] == "instance_auc"]
            routing = g[g["metric"] == "routing_accuracy"]
            cells = [fmt(acc.ACC.tolist()), fmt(acc.BWT.tolist()), fmt(acc.forgetting.tolist())]
            cells += [fmt(acc.FWT.tolist())]
            cells += [fmt(inst.ACC.tolist()), fmt(routing.ACC.tolist()) if len(routing) else "—"]
            cells += [f"{g.seconds.mean():.0f}"]
            print(f"| {method} | {mode} | {' | '.join(cells)} |")
    sizes_frame = pd.DataFrame(sizes)
    print("\n| method | task | training s (mean) | checkpoint MB (mean) | trainable (first seed) |")
    print("|---|---|---|---|---|")
    for (method, task), g in sizes_frame.groupby(["method", "task"], sort=False):
        print(
            f"| {method} | {task} | {g.fit_s.mean():.1f} | {g.ckpt_mb.mean():.2f} | {g.trainable.iloc[0]} |"
        )


if __name__ == "__main__":
    main()
