"""Multi-process feature extraction: ``pathopeft tile --devices 2`` (CPU DDP, gloo) gives the same
outputs as one device. Run as a real subprocess: Lightning re-launches ``sys.argv`` for rank 1."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from pathopeft.cli import main
from pathopeft.wsi.synth import make_synthetic_slide

ARGS = [
    "--backbone", "resnet18", "--no-pretrained", "--tile-px", "64", "--target-mpp", "1.0",
    "--set", "features.resize_to=tile", "--workers", "0", "--no-progress", "--accelerator", "cpu",
]  # fmt: skip


def _tile(slides: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    exe = shutil.which("pathopeft")
    cmd = [exe] if exe else [sys.executable, "-c", "from pathopeft.cli import main; main()"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [*cmd, "tile", str(slides), "--out", str(out), *ARGS, *extra],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        row.pop("seconds")
    return rows


@pytest.mark.slow
@pytest.mark.ddp
def test_two_process_ddp_matches_one_device(tmp_path) -> None:
    slides = tmp_path / "slides"
    for i in range(3):
        make_synthetic_slide(slides / f"s{i}.tiff", width=1024, height=768, seed=10 + i, tile=128)
    (slides / "broken.svs").write_bytes(b"")  # failures are gathered from every rank too

    # one device in-process (nothing is spawned for --devices 1), two devices as a real subprocess
    one = CliRunner().invoke(main, ["tile", str(slides), "--out", str(tmp_path / "one"), *ARGS])
    assert one.exit_code == 0, one.output
    two = _tile(slides, tmp_path / "two", "--devices", "2", "--strategy", "ddp")
    assert "Starting with 2 processes" in two.stderr + two.stdout  # really two ranks

    assert _rows(tmp_path / "one") == _rows(tmp_path / "two")
    # rank 1's live-manifest journal was merged and removed: only the outputs (and the hidden
    # coordination folder, without journals) remain
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [
        ".pathopeft",
        "coords",
        "features",
        "manifest.csv",
        "thumbnails",
    ]
    assert not list((tmp_path / "two" / ".pathopeft").glob("journal-*"))
    statuses = {r["slide_id"]: r["status"] for r in _rows(tmp_path / "two")}
    assert statuses == {"broken": "error", "s0": "ok", "s1": "ok", "s2": "ok"}
    assert "3 ok (0 reused), 0 empty, 1 error" in two.stdout and "3 ok" in one.stdout
    for sid in ("s0", "s1", "s2"):
        with (
            h5py.File(tmp_path / "one" / "features" / "resnet18" / f"{sid}.h5", "r") as a,
            h5py.File(tmp_path / "two" / "features" / "resnet18" / f"{sid}.h5", "r") as b,
        ):
            assert len(a["features"]) > 0
            np.testing.assert_array_equal(a["coords"][:], b["coords"][:])
            np.testing.assert_allclose(a["features"][:], b["features"][:], rtol=1e-5, atol=1e-6)
            assert a.attrs["features_fingerprint"] == b.attrs["features_fingerprint"]


SLOW_RANK = textwrap.dedent(
    """
    import datetime, sys, time
    import torch.distributed as dist
    import pathopeft.features.processor as processor
    from pathopeft.cli import main

    original = processor.SlideProcessor.process
    first = [True]

    def process(self, source, on_tiles=None):
        if first[0]:  # every rank is past the start-up collectives: make the rest trip fast
            first[0] = False
            dist.distributed_c10d._get_default_group().set_timeout(datetime.timedelta(seconds=3))
        if source.slide_id == "s1":  # rank 1's slide takes far longer than the collective timeout
            time.sleep(15)
        return original(self, source, on_tiles)

    processor.SlideProcessor.process = process
    main(["tile", *sys.argv[1:]])
    """
)


@pytest.mark.slow
@pytest.mark.ddp
def test_a_slow_rank_cannot_trip_a_collective_timeout(tmp_path) -> None:
    """Rank 1 finishes long after rank 0 (here 15 s against a 3 s process-group timeout; on a real
    cohort hours against Lightning's 30 min): rank 0 waits for rank 1's journal on disk instead of
    an all_gather under the timeout, and the manifest has every slide."""
    slides = tmp_path / "slides"
    for i in range(3):
        make_synthetic_slide(slides / f"s{i}.tiff", width=768, height=512, seed=20 + i, tile=128)
    script = tmp_path / "slow_rank.py"
    script.write_text(SLOW_RANK)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(script), str(slides), "--out", str(out), "--no-features", "--no-progress"]
    cmd += ["--accelerator", "cpu", "--devices", "2", "--strategy", "ddp", "--tile-px", "64"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "3 ok (0 reused)" in proc.stdout and "stopped before finishing" not in proc.stderr
    assert {r["slide_id"]: r["status"] for r in _rows(out)} == {"s0": "ok", "s1": "ok", "s2": "ok"}
    assert not list((out / ".pathopeft").glob("journal-*"))
