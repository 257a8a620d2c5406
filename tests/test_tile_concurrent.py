"""Several ``pathopeft tile`` processes on one output folder (real processes): no run drops another's
manifest rows or deletes its in-flight files, a slide is computed once, and a SIGKILLed run's
finished slides are listed by the next run without being recomputed."""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from filelock import FileLock

from pathopeft.features.runstate import RunState
from pathopeft.files import PARTIAL_MARKER, host_name, remove_stale_partials
from pathopeft.wsi.synth import make_synthetic_slide

ARGS = ["--no-features", "--no-progress", "--tile-px", "64", "--target-mpp", "1.0"]

WORKER = textwrap.dedent(
    """
    import functools, os, signal, sys, time
    from pathlib import Path
    import pathopeft.features.pipeline as pipeline
    import pathopeft.wsi as wsi
    from pathopeft.cli import main
    from pathopeft.features.manifest import LiveManifest
    from pathopeft.files import atomic_path

    sync = Path(os.environ["SYNC"])
    hold = os.environ.get("HOLD", "")  # slide:marker  hold that slide's coords (in flight) until marker
    kill = os.environ.get("KILL_AT", "")  # SIGKILL while writing this slide's coords
    interval = float(os.environ.get("MIN_INTERVAL", "0"))
    pipeline.LiveManifest = functools.partial(LiveManifest, min_interval=interval, cost_factor=0.0)
    original = wsi.write_coords

    def wait_for(marker):
        deadline = time.time() + 300
        while not (sync / marker).exists() and time.time() < deadline:
            time.sleep(0.05)

    def patched(path, grid, extra=None):
        sid = grid.slide_id
        (sync / f"coords-{sid}-{os.getpid()}").touch()
        if hold.split(":")[0] == sid:
            with atomic_path(path) as tmp:  # an in-flight file another run must not delete
                tmp.write_bytes(b"in flight")
                (sync / f"{sid}-held").touch()
                wait_for(hold.split(":")[1])
        if sid == kill:
            with atomic_path(path) as tmp:
                tmp.write_bytes(b"half a file")
                os.kill(os.getpid(), signal.SIGKILL)
        if os.environ.get("BOTH"):  # both runs reach their first slide before either goes on
            (sync / f"go-{os.getpid()}").touch()
            deadline = time.time() + 300
            while len(list(sync.glob("go-*"))) < 2 and time.time() < deadline:
                time.sleep(0.05)
        return original(path, grid, extra)

    wsi.write_coords = patched
    main(["tile", *sys.argv[1:]])
    """
)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cohort")
    for i in range(4):
        make_synthetic_slide(folder / f"s{i}.tiff", width=768, height=512, seed=20 + i, tile=128)
    return folder


def _start(tmp_path: Path, inputs: list[Path], out: Path, **env: str) -> subprocess.Popen:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    sync = tmp_path / "sync"
    sync.mkdir(exist_ok=True)
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "SYNC": str(sync), **env}
    cmd = [sys.executable, str(script), *map(str, inputs), "--out", str(out), *ARGS]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env)


def _finish(proc: subprocess.Popen) -> str:
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output
    return output


def _wait(path: Path) -> None:
    for _ in range(6000):  # bounded poll for the other process to get there (not a speed check)
        if path.exists():
            return
        time.sleep(0.05)
    raise AssertionError(f"{path} never appeared")


def _rows(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "manifest.csv", newline="") as fh:
        return {row["slide_id"]: row for row in csv.DictReader(fh)}


def _partials(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if PARTIAL_MARKER in p.name]


def test_a_second_run_keeps_the_first_runs_rows_and_in_flight_files(tmp_path, cohort) -> None:
    """Run B (s1-s3) is writing s2's coords when run A (s0) starts and finishes in the same folder.
    Before: A's start deleted B's in-flight file (B's s2 failed) and B's next manifest rewrite,
    from B's own view, dropped A's row for s0."""
    out = tmp_path / "out"
    b = _start(tmp_path, [cohort / f"s{i}.tiff" for i in (1, 2, 3)], out, HOLD="s2:a-done")
    _wait(tmp_path / "sync" / "s2-held")  # B has finished s1 and holds a partial s2 file
    a = _start(tmp_path, [cohort / "s0.tiff"], out)
    assert "1 ok (0 reused)" in _finish(a)
    (tmp_path / "sync" / "a-done").touch()
    assert "3 ok (0 reused)" in _finish(b)
    rows = _rows(out)
    assert set(rows) == {"s0", "s1", "s2", "s3"} and {r["status"] for r in rows.values()} == {"ok"}
    assert not _partials(out)
    assert not list((out / ".pathopeft").glob("journal-*"))


def test_two_runs_on_one_cohort_compute_each_slide_once(tmp_path, cohort) -> None:
    """The same command started twice at once: each slide is computed by one run (the other waits
    for the slide and reuses it), and the manifest has every slide."""
    out = tmp_path / "out"
    runs = [_start(tmp_path, [cohort], out, BOTH="1") for _ in range(2)]
    outputs = [_finish(proc) for proc in runs]
    computed = 0
    for output in outputs:
        ok, reused = map(int, re.search(r"(\d+) ok \((\d+) reused\)", output).groups())
        assert ok == 4
        computed += ok - reused
    assert computed == 4, outputs
    assert len(list((tmp_path / "sync").glob("coords-*"))) == 4  # coords written once per slide
    assert {r["status"] for r in _rows(out).values()} == {"ok"} and len(_rows(out)) == 4


def test_sigkilled_run_is_listed_by_the_next_run_without_recomputing(tmp_path, cohort) -> None:
    """Killed (SIGKILL) while the manifest rewrite is throttled: s1 is complete on disk but not in
    manifest.csv. The next run — even one over other slides — lists it from the dead run's journal,
    and a full rerun reuses it."""
    out = tmp_path / "out"
    killed = _start(tmp_path, [cohort], out, KILL_AT="s2", MIN_INTERVAL="3600")
    killed.communicate(timeout=600)
    assert killed.returncode == -signal.SIGKILL
    assert set(_rows(out)) == {"s0"}  # the first row is written at once, s1's rewrite never came
    assert (out / "coords" / "s1.h5").is_file()

    other = _start(tmp_path, [cohort / "s3.tiff"], out)
    assert "1 ok (0 reused)" in _finish(other)
    rows = _rows(out)
    assert set(rows) == {"s0", "s1", "s3"} and rows["s1"]["status"] == "ok"
    assert not _partials(out)  # the dead run's half-written s2 is gone

    before = len(list((tmp_path / "sync").glob("coords-s1-*")))
    rerun = _start(tmp_path, [cohort], out)
    assert "4 ok (3 reused)" in _finish(rerun)  # only s2 is computed
    assert len(list((tmp_path / "sync").glob("coords-s1-*"))) == before
    assert {r["status"] for r in _rows(out).values()} == {"ok"} and len(_rows(out)) == 4


def test_only_partials_of_gone_writers_are_removed(tmp_path) -> None:
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    me = host_name()
    folder = tmp_path / "coords"
    folder.mkdir()

    def partial(name: str, writer: str) -> Path:
        path = folder / f".{name}.h5{PARTIAL_MARKER}{writer}-abcd"
        path.write_bytes(b"x")
        return path

    try:
        with RunState(tmp_path) as state:
            keep = [
                partial("live", f"{me}-{live.pid}"),
                partial("mine", f"{me}-{os.getpid()}"),
                partial("fresh-foreign", "elsewhere-77"),  # another machine, cannot tell: recent
                partial("held-foreign", "node9-42"),  # another machine whose writer lock is held
            ]
            lock = FileLock(state.writer_lock("node9", 42))
            lock.acquire(timeout=0)
            gone = [
                partial("dead", f"{me}-{dead.pid}"),
                partial("legacy-dead", f"{dead.pid}"),  # an older version's name (no host)
                partial("released-foreign", "node8-43"),  # its writer lock is free: the writer is gone
                partial("old-foreign", "elsewhere-78"),
            ]
            state.writer_lock("node8", 43).touch()  # a lock file nobody holds
            old = time.time() - 3 * 24 * 3600
            os.utime(gone[-1], (old, old))
            assert state.remove_stale_partials() == len(gone)
            lock.release()
        assert all(p.exists() for p in keep) and not any(p.exists() for p in gone)
        assert remove_stale_partials(tmp_path) == 0  # the default rule keeps them too
    finally:
        live.kill()
        live.wait()
