"""The chain as a user types it: synth → tile (CNN features) → manifest → train → heatmap.

A 1-epoch model on random-init CNN features does not localise (the IoU tests use the model of
tests/_heatmap_cohort.py); the honest bound here is consistency: the heatmap's per-tile attention
and bag probability are exactly what ``pathopeft train`` wrote for the same checkpoint on its
test slides, and every slide of the cohort gets valid files.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest
from click.testing import CliRunner

from pathopeft.cli import main


def _run(args: list[str]) -> str:
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, f"pathopeft {' '.join(args)} failed:\n{result.output}"
    return result.output


@pytest.mark.slow
def test_train_then_heatmap_matches_the_run_predictions(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _run(["synth", "slides", "--n", "6", "--seed", "2", "--size", "2048"])
    tile = ["tile", "slides", "--backbone", "resnet18", "--no-pretrained", "--target-mpp", "2.0"]
    _run([*tile, "--tile-px", "32", "--set", "features.resize_to=tile", "--workers", "0", "--no-progress"])
    _run(
        [
            "manifest",
            "tiles",
            "--labels",
            "slides/labels.csv",
            "--out",
            "m.csv",
            "--val-fraction",
            "0.34",
            "--test-fraction",
            "0.34",
        ]
    )
    sets = ["data.manifest=m.csv", "data.num_workers=0", "trainer.max_epochs=1", "trainer.accelerator=cpu"]
    sets += ["trainer.enable_progress_bar=false", "model.abmil.embed_dim=32", "model.abmil.attn_hidden=16"]
    _run(["train", _abmil(), *[a for s in sets for a in ("--set", s)]])
    run = next(p for p in (tmp_path / "runs").iterdir() if p.is_dir())
    ckpt = run / "best.ckpt" if (run / "best.ckpt").is_file() else run / "last.ckpt"
    features = next((tmp_path / "tiles" / "features").iterdir())
    _run(["heatmap", str(ckpt), "--slides", "slides", "--features", str(features), "--out", "hm"])
    manifest = pd.read_csv("hm/manifest.csv")
    assert len(manifest) == 6 and (manifest["status"] == "ok").all()
    slides = pd.read_csv(run / "predictions" / "slides.csv").set_index("slide_id")
    for sid, row in slides.iterrows():
        ours = pd.read_csv(f"hm/{sid}.csv")
        theirs = pd.read_csv(run / "predictions" / f"{sid}.csv")
        assert ours[["x", "y"]].values.tolist() == theirs[["x", "y"]].values.tolist()
        assert ours["attention"].values == pytest.approx(theirs["attention"].values, abs=1e-5)
        meta = json.loads((tmp_path / "hm" / f"{sid}.json").read_text())
        assert meta["bag_probability"] == pytest.approx(row["prob_tumor"], abs=1e-5)
        assert meta["model"] == "abmil_gated" and meta["tile_size"] == 128


def _abmil() -> str:
    from pathlib import Path

    return str(Path(__file__).resolve().parents[1] / "configs" / "abmil.yaml")
