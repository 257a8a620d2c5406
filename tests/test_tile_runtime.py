"""The tile runtime: plain torch for one device (no Lightning import), Fabric for several; the
worker default follows the machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pathopeft.config import ConfigError
from pathopeft.features.runtime import FabricRuntime, Runtime, auto_workers, make_runtime
from pathopeft.wsi.synth import make_synthetic_slide

HEAVY = ("lightning", "lightning.fabric", "torchmetrics", "transformers", "timm", "torch")

PROBE = textwrap.dedent(
    """
    import json, sys
    from pathopeft.cli import main
    code = 0
    try:
        main(sys.argv[1:])
    except SystemExit as exc:
        code = exc.code
    print(json.dumps({"code": code, "loaded": [m for m in HEAVY_NAMES if m in sys.modules]}))
    """
).replace("HEAVY_NAMES", repr(HEAVY))


def _probe(tmp_path: Path, *args: str) -> dict:
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_single_device_tile_never_imports_lightning(tmp_path) -> None:
    """`pathopeft tile` on one device (features on and off) runs without importing Lightning Fabric
    and what it drags in (torchmetrics, transformers): seconds of start-up for nothing. With
    --no-features nothing runs on a device: not even torch (or timm) is imported."""
    slides = tmp_path / "slides"
    make_synthetic_slide(slides / "s0.tiff", width=768, height=512, seed=1, tile=128)
    common = ["tile", str(slides), "--no-progress", "--tile-px", "64", "--target-mpp", "1.0"]
    quick = _probe(tmp_path, *common, "--out", str(tmp_path / "a"), "--no-features")
    assert quick == {"code": 0, "loaded": []}
    feats = _probe(
        tmp_path, *common, "--out", str(tmp_path / "b"), "--backbone", "resnet18", "--no-pretrained",
        "--workers", "0", "--set", "features.resize_to=tile",
    )  # fmt: skip
    assert feats == {"code": 0, "loaded": ["timm", "torch"]}
    assert (tmp_path / "b" / "features" / "resnet18" / "s0.h5").is_file()


def test_make_runtime_picks_plain_torch_for_one_device_and_fabric_for_more() -> None:
    one = make_runtime("cpu", 1)
    assert type(one) is Runtime and one.device == torch.device("cpu")
    assert one.world_size == 1 and one.rank == 0 and one.broadcast("x") == "x"
    two = make_runtime("cpu", 2, strategy="ddp")  # set up, not launched: nothing is spawned
    assert isinstance(two, FabricRuntime) and two.world_size == 2
    assert isinstance(make_runtime("cpu", 1, precision="64-true"), FabricRuntime)  # not an autocast


def test_plain_runtime_autocast_and_bad_settings() -> None:
    rt = make_runtime("cpu", 1, precision="bf16-mixed")
    a = torch.randn(4, 4)
    with rt.autocast():
        assert (a @ a).dtype == torch.bfloat16
    with make_runtime("cpu", 1).autocast():
        assert (a @ a).dtype == torch.float32
    with pytest.raises(ConfigError, match="16-mixed"):
        make_runtime("cpu", 1, precision="16-mixed")
    with pytest.raises(ConfigError, match="accelerator='tpu-ish'"):
        Runtime("tpu-ish")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            make_runtime("cuda", 1)


def test_worker_default_follows_the_machine(monkeypatch) -> None:
    """features.num_workers defaults to null = usable cores per device, capped (was a fixed 2)."""
    import pathopeft.features.runtime as runtime
    from pathopeft.config.tile import TileConfig

    assert TileConfig().features.num_workers is None
    assert auto_workers(1, cores=16) == 8  # capped
    assert auto_workers(2, cores=16) == 8 and auto_workers(4, cores=16) == 4
    assert auto_workers(1, cores=2) == 2 and auto_workers(8, cores=2) == 1  # never 0
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5}, raising=False)
    assert runtime.usable_cores() == 6 and auto_workers(2) == 3  # a batch job's CPU share, not the node's
    assert TileConfig.model_validate({"features": {"num_workers": 0}}).features.num_workers == 0
