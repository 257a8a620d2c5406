"""An interrupted ``pathopeft tile`` run (Ctrl-C, SIGTERM, SIGKILL) leaves a valid manifest with the
slides it finished and no temporary files (SIGKILL: the rerun removes them), and the rerun
completes the cohort reusing the finished slides. Plus the live manifest itself (ranks, journals)."""

from __future__ import annotations

import csv
import functools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from pathopeft.cli import main
from pathopeft.features.manifest import LiveManifest, SlideRecord, read_manifest, write_manifest
from pathopeft.features.runstate import RunState
from pathopeft.files import PARTIAL_MARKER, atomic_path
from pathopeft.wsi.synth import make_synthetic_slide

FAST = [
    "--backbone", "resnet18", "--no-pretrained", "--tile-px", "64", "--target-mpp", "1.0",
    "--set", "features.resize_to=tile", "--workers", "0", "--no-progress",
]  # fmt: skip


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cohort")
    for i in range(4):
        make_synthetic_slide(folder / f"s{i}.tiff", width=768, height=512, seed=20 + i, tile=128)
    return folder


def _rows(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "manifest.csv", newline="") as fh:
        return {row["slide_id"]: row for row in csv.DictReader(fh)}


def _partials(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if PARTIAL_MARKER in p.name]


def _record(sid: str, status: str = "ok") -> SlideRecord:
    return SlideRecord(slide_id=sid, path=f"/x/{sid}.svs", status=status, n_tiles=3, mpp=0.5, seconds=1.0)


def test_sigterm_mid_slide_keeps_finished_rows_and_the_rerun_completes(tmp_path, cohort, monkeypatch) -> None:
    """SIGTERM (``kill``, a cancelled job) while a bag is being written: the signal becomes
    KeyboardInterrupt (the same path as Ctrl-C), clean-up runs, the manifest gets its final flush."""
    import pathopeft.features.pipeline as pipeline
    import pathopeft.features.processor as processor

    out = tmp_path / "out"
    write_manifest(out / "manifest.csv", [_record("earlier")])  # a row of an earlier run survives
    # throttled so that only the first finished slide is written live: s1's row must come from the
    # flush on the way out
    monkeypatch.setattr(pipeline, "LiveManifest", functools.partial(LiveManifest, min_interval=3600.0))
    seen_live: list[set[str]] = []
    original_write = processor.write_bag

    def interrupted_write(path, bag, dtype="float32"):
        seen_live.append(set(_rows(out)))  # what a user sees in manifest.csv meanwhile
        if bag.slide_id == "s2":
            with atomic_path(path) as tmp:  # the signal arrives in the middle of writing the bag
                tmp.write_bytes(b"half a bag")
                # (without the run's handler SIGTERM would end pytest itself: fail the slide instead)
                assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL, "SIGTERM not handled"
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(30)  # never reached: the handler raises first
        return original_write(path, bag, dtype=dtype)

    monkeypatch.setattr(processor, "write_bag", interrupted_write)
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as in a plain `pathopeft` process
    try:
        result = CliRunner().invoke(main, ["tile", str(cohort), "--out", str(out), *FAST])
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is removed again
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert result.exit_code == 1 and "Aborted" in result.output
    assert (
        "interrupted after 2 of 4 slide(s)" in result.output and "Run the same command again" in result.output
    )
    assert seen_live == [{"earlier"}, {"earlier", "s0"}, {"earlier", "s0"}]  # s0 written as it finished
    rows = _rows(out)
    assert set(rows) == {"earlier", "s0", "s1"} and rows["s1"]["status"] == "ok"
    assert not _partials(out)
    assert not (out / "features" / "resnet18" / "s2.h5").exists()
    assert (out / "coords" / "s2.h5").is_file()  # its finished tiling is kept for the rerun

    monkeypatch.setattr(processor, "write_bag", original_write)
    rerun = CliRunner().invoke(main, ["tile", str(cohort), "--out", str(out), *FAST])
    assert rerun.exit_code == 0, rerun.output
    assert "4 ok (2 reused)" in rerun.output and "s2: reusing coords" in rerun.output
    rows = _rows(out)
    assert set(rows) == {"earlier", "s0", "s1", "s2", "s3"}
    assert {rows[s]["status"] for s in ("s0", "s1", "s2", "s3")} == {"ok"}


KILLER = textwrap.dedent(
    """
    import functools, os, signal, sys, time
    import pathopeft.features.pipeline as pipeline
    import pathopeft.wsi as wsi
    from pathopeft.cli import main
    from pathopeft.features.manifest import LiveManifest
    from pathopeft.files import atomic_path

    victim = sys.argv[1]
    pipeline.LiveManifest = functools.partial(LiveManifest, min_interval=0.0, cost_factor=0.0)
    original = wsi.write_coords

    def dying(path, grid, extra=None):
        if grid.slide_id == victim:
            with atomic_path(path) as tmp:  # killed in the middle of writing a file
                tmp.write_bytes(b"half a file")
                os.kill(os.getpid(), signal.SIGKILL)
                time.sleep(30)
        return original(path, grid, extra)

    wsi.write_coords = dying
    main(["tile", *sys.argv[2:]])
    """
)


def test_sigkilled_run_leaves_a_valid_manifest(tmp_path, cohort) -> None:
    """SIGKILL (out of memory, a job past its grace period): nothing can clean up, but every slide
    finished before is already in the manifest, and the rerun removes the half-written file."""
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(script), "s2", str(cohort), "--out", str(out), *FAST, "--no-features"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    rows = _rows(out)
    assert set(rows) == {"s0", "s1"} and {r["status"] for r in rows.values()} == {"ok"}
    assert [p.name.split(PARTIAL_MARKER)[0] for p in _partials(out)] == [".s2.h5"]
    assert not (out / "coords" / "s2.h5").exists()

    rerun = CliRunner().invoke(main, ["tile", str(cohort), "--out", str(out), *FAST, "--no-features"])
    assert rerun.exit_code == 0, rerun.output
    assert "4 ok (2 reused)" in rerun.output
    assert not _partials(out)
    assert {r["status"] for r in _rows(out).values()} == {"ok"} and len(_rows(out)) == 4


def test_live_manifest_merges_ranks_journals_and_earlier_rows(tmp_path) -> None:
    """Rows reach each process's journal at once and the manifest on rank 0's (throttled) rewrites;
    every rewrite re-reads the manifest on disk, so rows another run wrote meanwhile survive."""
    path = tmp_path / "manifest.csv"
    write_manifest(path, [_record("old"), _record("s1", "error")])
    # live pids for the simulated other processes (their writer locks are held here)
    others = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]) for _ in range(2)]
    try:
        with (
            RunState(tmp_path) as s0,
            RunState(tmp_path, pid=others[0].pid) as s1,
            RunState(tmp_path, pid=others[1].pid) as s2,
        ):
            common = {"world_size": 2, "run_id": "run", "leader": s0.tag}
            rank0 = LiveManifest(path, rank=0, state=s0, min_interval=0.0, cost_factor=0.0, **common)
            rank1 = LiveManifest(path, rank=1, state=s1, **common)
            rank1.open()
            rank0.start()
            rank0.add(_record("s0"))
            assert {r.slide_id for r in read_manifest(path)} == {"old", "s0", "s1"}
            rank1.add(_record("s1"))  # rank 1's row reaches the disk at once (its journal) ...
            lines = rank1.journal.read_text().splitlines()
            assert json.loads(lines[-1])["row"]["slide_id"] == "s1"
            # another run rewrites the manifest meanwhile (its own row): it must survive
            write_manifest(path, [*read_manifest(path), _record("elsewhere")])
            rank0.add(_record("s2"))  # ... and into manifest.csv with rank 0's next rewrite
            rows = {r.slide_id: r for r in read_manifest(path)}
            assert set(rows) == {"old", "s0", "s1", "s2", "elsewhere"} and rows["s1"].status == "ok"

            # throttled: a rewrite at most every min_interval seconds; flush() writes now
            slow = LiveManifest(path, rank=0, state=s2, run_id="later", min_interval=3600.0)
            slow.add(_record("s4"))  # the first row is written at once
            slow.add(_record("s5"))
            assert "s5" not in {r.slide_id for r in read_manifest(path)}
            slow.flush()
            assert "s5" in {r.slide_id for r in read_manifest(path)}

            # the end of the run: rank 1 says it is done; rank 0 collects the run's rows, journals go
            assert [r.slide_id for r in rank1.finish()] == ["s1"]
            assert sorted(r.slide_id for r in rank0.finish()) == ["s0", "s1", "s2"]
            assert not rank1.journal.exists() and not rank0.journal.exists()
            slow.finish()
    finally:
        for proc in others:
            proc.kill()
            proc.wait()
    rows = {r.slide_id: r for r in read_manifest(path)}
    assert {"old", "s0", "s1", "s2", "s4", "s5", "elsewhere"} == set(rows)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".pathopeft", "manifest.csv"]
    assert not list((tmp_path / ".pathopeft").glob("journal-*"))
