"""End to end, as a user types it: synth → tile → manifest → train (shipped CoMEL config).

Random features on a six-slide cohort cannot be expected to classify well; this checks that the
commands chain with their defaults (``tiles/`` → ``configs/camelyon_comel.yaml``) and that every
output exists with finite, in-range metrics, including the tile-level ones from the synthetic
lesion GeoJSON.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from pathopeft.cli import main

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "camelyon_comel.yaml"


def _run(args: list[str]) -> str:
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, f"pathopeft {' '.join(args)} failed:\n{result.output}"
    return result.output


@pytest.mark.slow
def test_synth_tile_manifest_train(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _run(["synth", "slides", "--n", "6", "--seed", "0", "--size", "2048"])
    tile = ["tile", "slides", "--backbone", "resnet18", "--no-pretrained", "--target-mpp", "2.0"]
    _run([*tile, "--tile-px", "32", "--set", "features.resize_to=tile", "--workers", "0", "--no-progress"])
    assert Path("tiles/manifest.csv").is_file()
    manifest = ["manifest", "tiles", "--labels", "slides/labels.csv", "--out", "manifest.csv"]
    _run([*manifest, "--val-fraction", "0.34", "--test-fraction", "0.34"])
    splits = pd.read_csv("manifest.csv")
    assert len(splits) == 6 and set(splits["split"]) == {"train", "val", "test"}
    sets = ["data.manifest=manifest.csv", "data.annotations=slides/annotations", "data.num_workers=0"]
    sets += ["trainer.max_epochs=1", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false"]
    _run(["train", str(CONFIG), *[arg for s in sets for arg in ("--set", s)]])

    run = Path("runs/comel_camelyon16")
    report = json.loads((run / "test_metrics.json").read_text())
    assert report["split"] == "test" and report["n_slides"] == 2
    for key in (
        "bag_accuracy",
        "bag_auc",
        "bag_balanced_accuracy",
        "bag_f1",
        "instance_auc",
        "tile_dice",
        "tile_iou",
    ):
        assert isinstance(report[key], float) and math.isfinite(report[key]) and 0.0 <= report[key] <= 1.0, (
            key
        )
    assert (run / "best.ckpt").is_file() and (run / "plots" / "learning_curves.png").is_file()
    metrics = pd.read_csv(run / "metrics.csv")
    assert metrics["val/instance_auc"].notna().any() and metrics["val/bag_auc"].notna().any()
    test_ids = sorted(splits.loc[splits["split"] == "test", "slide_id"])
    tiles = pd.read_csv(run / "predictions" / f"{test_ids[0]}.csv")
    coords = pd.read_csv("tiles/manifest.csv").set_index("slide_id").loc[test_ids[0], "n_tiles"]
    assert len(tiles) == coords and tiles["x"].notna().all() and tiles["label"].isin([0, 1]).all()
    # a tumour slide's lesion is in its tile labels (from the synth GeoJSON, level-0 px)
    labelled = pd.concat(pd.read_csv(run / "predictions" / f"{s}.csv") for s in test_ids)
    assert labelled["label"].sum() > 0
