"""Run-folder helpers shared by `train` and `segment train`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pathopeft.config import ConfigError
from pathopeft.runs import load_checkpoint, plot_learning_curves, prepare_run_dir, validate_trainer_kwargs


def test_trainer_keys_checked_against_lightning() -> None:
    assert validate_trainer_kwargs({"max_epochs": 2, "devices": 1}) == {"max_epochs": 2, "devices": 1}
    with pytest.raises(ConfigError, match="max_epoch"):
        validate_trainer_kwargs({"max_epoch": 2})
    with pytest.raises(ConfigError, match="logger"):
        validate_trainer_kwargs({"logger": False})


def test_run_dir_refuses_to_mix_runs(tmp_path: Path) -> None:
    run = prepare_run_dir(tmp_path, "exp")
    (run / "last.ckpt").write_bytes(b"x")
    with pytest.raises(ConfigError, match="already holds a run"):
        prepare_run_dir(tmp_path, "exp")
    again = prepare_run_dir(tmp_path, "exp", overwrite=True)
    assert not (again / "last.ckpt").exists()
    with pytest.raises(ConfigError):
        prepare_run_dir(tmp_path, "../escape")


def test_learning_curves_png(tmp_path: Path) -> None:
    csv = tmp_path / "metrics.csv"
    csv.write_text(
        "epoch,step,train/loss,val/loss,val/auc\n0,9,1.0,,\n0,9,,0.9,0.6\n1,19,0.5,,\n1,19,,0.7,0.8\n"
    )
    out = plot_learning_curves(csv, tmp_path / "plots" / "curves.png")
    assert out is not None and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_learning_curves(tmp_path / "absent.csv", tmp_path / "x.png") is None


def test_checkpoint_loading_refuses_pickled_code(tmp_path: Path) -> None:
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "hyper_parameters": {"lr": 0.1}}, good)
    assert load_checkpoint(good)["hyper_parameters"] == {"lr": 0.1}

    bad = tmp_path / "bad.ckpt"
    torch.save({"obj": Path("x")}, bad)  # an arbitrary class instance would need unpickling
    with pytest.raises(ValueError, match="not a loadable checkpoint"):
        load_checkpoint(bad)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.ckpt")
