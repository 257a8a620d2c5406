"""Training: CoMEL learns planted positives, baselines train, the run folder, the CLI, DDP on CPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import lightning
import pandas as pd
import pytest
import torch
import yaml
from click.testing import CliRunner
from torchmetrics.functional.classification import binary_auroc

from pathopeft.bags import read_bag
from pathopeft.cli import main
from pathopeft.config import ConfigError, load_config
from pathopeft.config.train import TrainConfig
from pathopeft.mil.data import MILDataModule
from pathopeft.mil.module import MILModule
from pathopeft.mil.synthetic import make_synthetic_bags
from pathopeft.mil.train import build_module, train
from pathopeft.runs import load_checkpoint

SMALL_MODELS = [
    "model.comel.embed_dim=64",
    "model.comel.heads=4",
    "model.comel.groups=16",
    "model.abmil.embed_dim=64",
    "model.transmil.embed_dim=64",
    "model.transmil.heads=4",
    "model.transmil.landmarks=16",
    "optimizer.lr=1e-3",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """32 train / 8 val / 12 test bags of 36–81 tiles (D=32), half with a planted lesion."""
    return make_synthetic_bags(
        tmp_path_factory.mktemp("mil_cohort"), n_train=32, n_val=8, n_test=12, side=(6, 9), signal=1.0, seed=0
    )


def _config(cohort, *sets: str) -> TrainConfig:
    data = [
        f"data.manifest={cohort.manifest}",
        f"data.features_dir={cohort.root / 'features'}",
        "data.coords_dir=null",
        f"data.annotations={cohort.annotations_dir}",
    ]
    return load_config(TrainConfig, None, [*data, *SMALL_MODELS, *sets])


def _fit(cfg: TrainConfig, epochs: int, *, validate_first: bool = False, precision: str = "32-true"):
    """Model + data + a bare Trainer (no run folder): what the learning tests need, quickly."""
    lightning.seed_everything(cfg.seed, verbose=False)
    data = MILDataModule(cfg.data, seed=cfg.seed)
    data.prepare()
    module = build_module(cfg, data.in_dim)
    trainer = lightning.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=10**6,  # validate only when asked
    )
    before = trainer.validate(module, datamodule=data, verbose=False)[0] if validate_first else None
    trainer.fit(module, datamodule=data)
    after = trainer.validate(module, datamodule=data, verbose=False)[0] if validate_first else None
    trainer.test(module, datamodule=data, verbose=False)
    return module, before, after


def test_comel_trains_end_to_end_on_separable_bags(cohort):
    """A smoke test of the whole CoMEL loop (bag loss, BPPL, τ₂, tile metrics) on bags separable
    tile by tile. It cannot tell CoMEL from ABMIL or BPPL on from off (a review checked: all pass
    it), so it asserts only that training works; what BPPL adds is tested in
    test_mil_localization.py::test_bppl_on_localises_better_than_bppl_off_over_seeds."""
    module, _, _ = _fit(_config(cohort, "seed=0"), epochs=10)
    results = module.test_results
    assert results["bag_auc"] > 0.95, results
    assert results["instance_auc"] > 0.7, results
    assert 0.0 <= results["tile_dice"] <= 1.0 and 0.0 <= results["tile_iou"] <= results["tile_dice"]
    assert float(module.tau2) > 0.5  # τ₂ moved with q


@pytest.mark.parametrize(("name", "epochs", "min_auc"), [("abmil", 3, 0.9), ("transmil", 6, 0.75)])
def test_baselines_train(cohort, name, epochs, min_auc):
    module, before, after = _fit(
        _config(cohort, f"model.name={name}", "bppl.enabled=false"), epochs, validate_first=True
    )
    assert after["val/loss"] < before["val/loss"]
    assert module.test_results["bag_auc"] > min_auc, module.test_results
    assert 0.0 <= module.test_results["instance_auc"] <= 1.0


def test_bf16_mixed_precision_trains(cohort):
    module, _, _ = _fit(_config(cohort, "data.batch_size=2"), 1, precision="bf16-mixed")
    assert all(0.0 <= v <= 1.0 for v in module.test_results.values()), module.test_results


def test_train_writes_the_run_folder_and_loadable_checkpoints(cohort, tmp_path):
    cfg = _config(cohort, "trainer.max_epochs=2", f"run.root={tmp_path}", "run.name=r1")
    run = train(cfg)
    for name in ("config.yaml", "splits.csv", "best.ckpt", "last.ckpt", "metrics.csv", "test_metrics.json"):
        assert (run / name).is_file(), name
    assert (run / "plots" / "learning_curves.png").stat().st_size > 1000
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["in_dim"] == 32

    report = json.loads((run / "test_metrics.json").read_text())
    assert report["split"] == "test" and report["n_slides"] == 12 and report["model"] == "comel"
    for key in ("bag_accuracy", "bag_balanced_accuracy", "bag_auc", "bag_f1", "instance_auc", "tile_dice"):
        assert 0.0 <= report[key] <= 1.0, key

    # checkpoints load without unpickling code and rebuild the model from their own metadata
    ckpt = load_checkpoint(run / "best.ckpt")
    hp = ckpt["hyper_parameters"]
    (task,) = hp["tasks"]
    assert task["name"] == "camelyon16" and task["classes"] == ["normal", "tumor"]
    assert task["negative_class"] == 0 and task["backbone"] == "synthetic" and task["in_dim"] == 32
    assert task["manifest"] == [str(cohort.manifest.resolve())]
    assert hp["model"]["name"] == "comel" and hp["model"]["in_dim"] == 32
    assert "tau2" in ckpt["state_dict"]
    rebuilt = MILModule.from_checkpoint(run / "best.ckpt")
    assert rebuilt.tasks[0].classes == ("normal", "tumor") and not rebuilt.training
    bag = read_bag(cohort.features_dir / "test_001.h5")
    with torch.no_grad():
        out = rebuilt.model(torch.from_numpy(bag.features), coords=torch.from_numpy(bag.coords))
    written = pd.read_csv(run / "predictions" / "test_001.csv")  # the test pass used best.ckpt too
    assert out.scores[0].numpy() == pytest.approx(written["score"].to_numpy(), abs=1e-4)

    # per epoch: every training bag once, and τ₂ of epoch e = 0.5·(1 + 0.5·q of epoch e−1)
    metrics = pd.read_csv(run / "metrics.csv")
    epochs = metrics.dropna(subset=["train/q"]).set_index("epoch")
    assert set(epochs["train/bags"]) == {32.0}
    assert epochs.loc[0, "train/tau2"] == pytest.approx(0.5)
    assert epochs.loc[1, "train/tau2"] == pytest.approx(0.5 * (1 + 0.5 * epochs.loc[0, "train/q"]))
    assert epochs.loc[1, "train/tau2"] > 0.5
    assert {"val/bag_auc", "val/instance_auc", "val/tile_dice", "train/bppl"} <= set(metrics.columns)

    # per-tile predictions for the heatmap stage, consistent with the reported instance AUC
    slides = pd.read_csv(run / "predictions" / "slides.csv")
    assert sorted(slides["slide_id"]) == [f"test_{i:03d}" for i in range(12)]
    tiles = [pd.read_csv(run / "predictions" / f"{sid}.csv") for sid in slides["slide_id"]]
    assert all(list(t.columns) == ["tile", "x", "y", "score", "attention", "label"] for t in tiles)
    pooled = pd.concat(tiles)
    assert pooled["score"].between(0, 1).all() and pooled["label"].isin([0, 1]).all()
    auc = binary_auroc(torch.tensor(pooled["score"].values), torch.tensor(pooled["label"].values))
    assert float(auc) == pytest.approx(report["instance_auc"], abs=1e-4)

    with pytest.raises(ConfigError, match="already holds a run"):
        train(cfg)


def test_train_command_errors_exit_2(cohort, tmp_path):
    runner = CliRunner()
    missing = runner.invoke(main, ["train", str(tmp_path / "nope.yaml")])
    assert missing.exit_code == 2 and "not found" in missing.output
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"data": {"manifest": str(cohort.manifest)}, "modle": {}}))
    bad = runner.invoke(main, ["train", str(config)])
    assert bad.exit_code == 2 and "modle: unknown key" in bad.output
    manifest = tmp_path / "m.csv"
    manifest.write_text("slide_id,label\ntrain_000,normal\nghost_1,tumor\nghost_2,normal\n")
    config.write_text(
        yaml.safe_dump({"data": {"manifest": str(manifest), "features_dir": str(cohort.root / "features")}})
    )
    absent = runner.invoke(main, ["train", str(config), "--set", f"run.root={tmp_path}"])
    assert absent.exit_code == 2 and "ghost_1, ghost_2" in absent.output


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_on_two_cpu_processes_splits_bags_and_syncs_metrics(cohort, tmp_path):
    cfg = _config(cohort, "trainer.max_epochs=1", f"run.root={tmp_path}", "run.name=ddp")
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    exe = shutil.which("pathopeft") or str(Path(sys.executable).with_name("pathopeft"))
    cmd = [exe, "train", str(config)]
    cmd += ["--set", "trainer.devices=2", "--set", "trainer.strategy=ddp", "--set", "trainer.accelerator=cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "ddp"
    metrics = pd.read_csv(run / "metrics.csv")
    # the two ranks saw different bags: together, each training bag once per epoch (not twice)
    assert set(metrics["train/bags"].dropna()) == {32.0}
    report = json.loads((run / "test_metrics.json").read_text())
    slides = pd.read_csv(run / "predictions" / "slides.csv")
    # every test slide evaluated exactly once across the ranks
    assert sorted(slides["slide_id"]) == [f"test_{i:03d}" for i in range(12)] and report["n_slides"] == 12
    # synced metrics equal the metrics of all slides' predictions pooled
    accuracy = (slides["label"] == slides["prediction"]).mean()
    assert report["bag_accuracy"] == pytest.approx(accuracy, abs=1e-6)
    tumour = slides.set_index("slide_id")["prob_tumor"]
    pooled = pd.concat(
        pd.read_csv(run / "predictions" / f"{s}.csv").assign(tumour=tumour[s]) for s in slides["slide_id"]
    )
    labels = torch.tensor(pooled["label"].values)
    auc = binary_auroc(torch.tensor(pooled["score"].values), labels)
    assert report["instance_auc"] == pytest.approx(float(auc), abs=1e-4)
    # and the map the heatmap shows by default (score × the slide's tumour probability), pooled
    gated_auc = binary_auroc(torch.tensor((pooled["score"] * pooled["tumour"]).values), labels)
    assert report["instance_auc_bag_weighted"] == pytest.approx(float(gated_auc), abs=5e-3)  # binned state
