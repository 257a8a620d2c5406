"""Which BPPL setting localises best, and does CoMEL beat attention-only MIL? (issue: localization).

Synthetic feature bags with known tile labels and a known ideal per-tile AUC
(:func:`pathopeft.mil.synthetic.make_localization_cohort`), trained through the real
``pathopeft train`` code path (run folder, checkpoint chosen on ``val/loss``, test split), at the
published lr 1e-4. Sweeps BPPL temperature × centring (keep both), then keep mode and grouping at
the best of those, against ABMIL, TransMIL and CoMEL with BPPL off, all in the same run and over
the same seeds. Prints one row per setting: mean ± sd of bag AUC, instance AUC, the kept share and
pseudo-label precision of the last epoch, and the ideal AUC.

    python benchmarks/bench_bppl.py                      # the main scenario, 3 seeds
    python benchmarks/bench_bppl.py --scenario weak --only default,abmil,comel_off
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pandas as pd

from pathopeft.config import load_config
from pathopeft.config.train import TrainConfig
from pathopeft.files import atomic_write_text
from pathopeft.mil.synthetic import make_localization_cohort
from pathopeft.mil.train import train

SCENARIOS = {
    # the cohort, scaled to 2 CPU cores: 2–10 % lesion tiles, compact, 2.5 σ
    "main": {"signal": 2.5, "lesion_share": (0.02, 0.10), "compact": True},
    "weak": {"signal": 1.5, "lesion_share": (0.02, 0.10), "compact": True},
    "scattered": {"signal": 2.5, "lesion_share": (0.02, 0.10), "compact": False},
    # small bags that every model learns within minutes on one CPU thread (the continual benchmark's
    # tasks): run with --dim 32 --tiles 60,120 --set optimizer.lr=1e-3
    "small": {"signal": 4.0, "lesion_share": (0.05, 0.15), "compact": True},
    "small_weak": {"signal": 2.5, "lesion_share": (0.05, 0.15), "compact": True},
    "small_scattered": {"signal": 4.0, "lesion_share": (0.05, 0.15), "compact": False},
    "small_tiny": {"signal": 4.0, "lesion_share": (0.02, 0.05), "compact": True},
}

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "camelyon_comel.yaml"

SETTINGS: dict[str, list[str]] = {
    "abmil": ["model.name=abmil", "bppl.enabled=false"],
    "transmil": ["model.name=transmil", "bppl.enabled=false"],
    "comel_off": ["bppl.enabled=false"],
    "published": ["bppl.preset=published"],
    "T1_center": ["bppl.temperature=1.0", "bppl.center=true"],
    "T0.1": ["bppl.temperature=0.1", "bppl.center=false"],
    "T0.1_w0.1": ["bppl.temperature=0.1", "bppl.center=false", "bppl.weight=0.1"],
    "T0.3": ["bppl.temperature=0.3", "bppl.center=false"],
    "T0.3_w0.3": ["bppl.temperature=0.3", "bppl.center=false", "bppl.weight=0.3"],
    "T0.1_center_w0.1": ["bppl.temperature=0.1", "bppl.center=true", "bppl.weight=0.1"],
    "T0.1_center": ["bppl.temperature=0.1", "bppl.center=true"],
    "T0.05_center": ["bppl.temperature=0.05", "bppl.center=true"],
    "T0.1_center_pos": ["bppl.temperature=0.1", "bppl.center=true", "bppl.keep=positive", "bppl.tau1=0.98"],
    "T0.1_center_coords": ["bppl.temperature=0.1", "bppl.center=true", "model.comel.grouping=coords"],
    "default": [],  # whatever the shipped config says
}


# a smaller width than the shipped 512 so the sweep fits 2 CPU cores (BPPL's mechanism does not
# depend on it); --full-width runs the shipped architecture
SMALL = [
    "model.comel.embed_dim=128", "model.comel.heads=4", "model.comel.groups=64",
    "model.abmil.embed_dim=128", "model.transmil.embed_dim=128", "model.transmil.heads=4",
    "model.transmil.landmarks=64",
]  # fmt: skip


def run_one(
    root: Path, cohort, setting: str, seed: int, epochs: int, small: bool = True, extra: tuple[str, ...] = ()
) -> dict[str, float]:
    sets = [
        *(SMALL if small else []),
        f"data.manifest={cohort.manifest}",
        f"data.features_dir={cohort.root / 'features'}",
        "data.coords_dir=null",
        f"data.annotations={cohort.annotations_dir}",
        "data.num_workers=0",
        f"trainer.max_epochs={epochs}",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "evaluation.write_predictions=false",
        f"run.root={root / 'runs'}",
        f"run.name={setting}_s{seed}",
        f"seed={seed}",
        *SETTINGS[setting],
        *extra,
    ]
    config = load_config(TrainConfig, CONFIG, sets)
    start = time.perf_counter()
    run_dir = train(config)
    seconds = time.perf_counter() - start
    import json

    test = json.loads((run_dir / "test_metrics.json").read_text())
    curves = pd.read_csv(run_dir / "metrics.csv")
    last = curves.dropna(subset=["train/loss"]).iloc[-1] if "train/loss" in curves else {}
    kept = curves["train/bppl_kept_share"].dropna() if "train/bppl_kept_share" in curves else pd.Series([])
    precision = curves["train/bppl_precision"].dropna() if "train/bppl_precision" in curves else pd.Series([])
    return {
        "bag_auc": test.get("bag_auc", float("nan")),
        "bag_acc": test.get("bag_accuracy", float("nan")),
        "bal_acc_valthr": test.get("bag_balanced_accuracy_at_val_threshold", float("nan")),
        "instance_auc": test.get("instance_auc", float("nan")),
        "tile_dice": test.get("tile_dice", float("nan")),
        "inst_auc_pos": test.get("instance_auc_positive_slides", float("nan")),
        "neg_alarms": test.get("negative_slide_alarm_share", float("nan")),
        "inst_auc_weighted": test.get("instance_auc_bag_weighted", float("nan")),
        "kept_share": float(kept.iloc[-1]) if len(kept) else float("nan"),
        "kept_epochs": int((kept > 0).sum()) if len(kept) else 0,
        "precision": float(precision.mean()) if len(precision) else float("nan"),
        "seconds": seconds,
        "_last": float(last.get("train/loss", float("nan"))) if len(last) else float("nan"),
    }


def fmt(values: list[float]) -> str:
    values = [v for v in values if v == v]
    if not values:
        return "—"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="main", choices=sorted(SCENARIOS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--seed-list", default=None, help="comma-separated seeds (to run seeds in parallel processes)"
    )
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--bags", default="40,12,16", help="train,val,test bags")
    parser.add_argument("--tiles", default="400,800")
    parser.add_argument("--dim", type=int, default=64, help="feature size D")
    parser.add_argument("--signal", type=float, default=None, help="override the scenario's lesion shift (σ)")
    parser.add_argument("--full-width", action="store_true", help="the shipped 512-wide models")
    parser.add_argument("--only", default=None, help="comma-separated settings (default: all)")
    parser.add_argument("--out", default=None, help="CSV of every run")
    parser.add_argument("--set", action="append", default=[], help="extra config override for every run")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    settings = args.only.split(",") if args.only else [s for s in SETTINGS if s != "default"]
    bags = tuple(int(v) for v in args.bags.split(","))
    tiles = tuple(int(v) for v in args.tiles.split(","))
    scenario = dict(SCENARIOS[args.scenario])
    if args.signal is not None:
        scenario["signal"] = args.signal
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        seeds = [int(v) for v in args.seed_list.split(",")] if args.seed_list else list(range(args.seeds))
        for seed in seeds:
            cohort = make_localization_cohort(
                Path(tmp) / f"cohort{seed}",
                n_bags=bags,
                tiles=tiles,
                seed=100 + seed,
                dim=args.dim,
                **scenario,
            )
            for setting in settings:
                result = run_one(
                    Path(tmp) / f"s{seed}",
                    cohort,
                    setting,
                    seed,
                    args.epochs,
                    not args.full_width,
                    tuple(args.set),
                )
                result.update(setting=setting, seed=seed, ideal=cohort.ideal_instance_auc)
                rows.append(result)
                if args.out:  # after every run, so a stopped sweep keeps what it finished
                    atomic_write_text(args.out, pd.DataFrame(rows).to_csv(index=False))
                print(
                    f"  seed {seed} {setting:20s} bag AUC {result['bag_auc']:.3f} inst AUC "
                    f"{result['instance_auc']:.3f} kept {result['kept_share']:.3f} "
                    f"({result['seconds']:.0f} s)",
                    file=sys.stderr,
                    flush=True,
                )
    frame = pd.DataFrame(rows)
    width = "512 (shipped)" if args.full_width else "128"
    print(
        f"scenario {args.scenario}: {scenario}, D {args.dim}, bags {bags}, tiles {tiles}, width {width}, "
        f"seeds {sorted(set(frame.seed))}, {args.epochs} epochs, overrides {args.set or 'none (lr 1e-4)'}"
    )
    print(f"ideal per-tile instance AUC {fmt(frame.groupby('seed')['ideal'].first().tolist())}")
    print(
        "| setting | bag AUC | bag acc @0.5 | bal. acc @val thr | instance AUC | inst. AUC, tumour bags "
        "| normal-bag tiles ≥ 0.5 | inst. AUC × bag prob. | tile Dice (positive bags) "
        "| kept share (last ep.) | epochs with kept | PL precision | s/run |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for setting in settings:
        g = frame[frame["setting"] == setting]
        print(
            f"| {setting} | {fmt(g.bag_auc.tolist())} | {fmt(g.bag_acc.tolist())} "
            f"| {fmt(g.bal_acc_valthr.tolist())} | {fmt(g.instance_auc.tolist())} "
            f"| {fmt(g.inst_auc_pos.tolist())} | {fmt(g.neg_alarms.tolist())} "
            f"| {fmt(g.inst_auc_weighted.tolist())} | {fmt(g.tile_dice.tolist())} "
            f"| {fmt(g.kept_share.tolist())} | {fmt(g.kept_epochs.tolist())} "
            f"| {fmt(g.precision.tolist())} | {g.seconds.mean():.0f} |"
        )


if __name__ == "__main__":
    main()
