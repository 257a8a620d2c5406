"""``segment train`` with Lightning DDP on CPU: 2 processes (gloo), run through the real CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from pathopeft.config import load_config
from pathopeft.config.segment import SegmentTrainConfig
from pathopeft.seg.predict import predict_masks
from pathopeft.seg.synth import make_shapes_dataset
from pathopeft.seg.train import load_splits

REPO = Path(__file__).resolve().parents[1]


def _cli() -> list[str]:
    script = Path(sys.executable).with_name("pathopeft")
    found = str(script) if script.is_file() else shutil.which("pathopeft")
    if found is None:
        pytest.skip("the pathopeft console script is not installed")
    return [found]


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_on_two_cpu_processes_trains(tmp_path: Path) -> None:
    data = make_shapes_dataset(tmp_path / "shapes", 13, size=(32, 32), num_classes=3, seed=3)
    sets = [
        f"data.root={data}",
        "data.masks_dir=masks",
        "data.num_classes=3",
        "data.num_workers=0",
        "data.batch_size=4",
        "data.samples_per_image=1",
        "model.encoder=vit_tiny_patch16_224",
        "model.weights=none",
        "model.img_size=32",
        "model.encoder_kwargs={depth: 2, embed_dim: 32, num_heads: 2}",
        "model.decoder=pup",
        "model.decoder_channels=1",
        "adapter.options={rank: 2}",
        "trainer.max_epochs=2",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        "trainer.enable_progress_bar=false",
        f"run.root={tmp_path / 'runs'}",
        "run.name=ddp",
    ]
    cmd = [*_cli(), "segment", "train", str(REPO / "configs" / "seg_lora.yaml")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [*cmd, *[a for s in sets for a in ("--set", s)]], capture_output=True, text=True, env=env, timeout=600
    )
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in log and "GLOBAL_RANK: 1, MEMBER: 2/2" in log
    run = tmp_path / "runs" / "ddp"
    metrics = pd.read_csv(run / "metrics.csv")
    assert metrics["val_dice"].notna().sum() == 2
    # 7 training images over 2 ranks × batch 4 → 1 optimizer step per epoch (2 on one process)
    assert metrics["step"].max() <= 4
    test = json.loads((run / "test_metrics.json").read_text())
    # each test image is scored exactly once (unpadded shards), not padded to a multiple of 2
    splits = load_splits(load_config(SegmentTrainConfig, REPO / "configs" / "seg_lora.yaml", sets))
    assert len(splits["test"]) % 2 == 1, "the split should give the ranks uneven shards"
    assert test["n_images"] == len(splits["test"]) and 0 <= test["dice"] <= 1
    assert len(test["dice_per_class"]) == 2  # multi-class: foreground classes 1 and 2
    assert (run / "best.ckpt").is_file() and (run / "adapter" / "adapter_model.safetensors").is_file()

    # multi-class masks are written as label values, at the input's size
    written = predict_masks(run / "best.ckpt", [data / "images"], tmp_path / "pred")
    assert len(written) == 13
    mask = cv2.imread(str(written[0]), cv2.IMREAD_UNCHANGED)
    assert mask.shape == (32, 32) and set(np.unique(mask)) <= {0, 1, 2}
