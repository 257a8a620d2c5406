"""Several ``pathopeft tile`` processes on one output folder: who is writing, and what they hold.

A lab runs several jobs on one cohort folder (two array jobs, a rerun started while the first is
still going, the ranks of a multi-GPU run). Everything they coordinate through lives in the
hidden folder ``OUT/.pathopeft/``:

* ``writer-<host>-<pid>.lock`` — held (an OS file lock) by every tile process while it runs. A
  writer whose lock can be taken is gone (killed, crashed, finished), on any machine that shares
  the folder; this is how a run decides that a partial file, a journal or a slide claim is
  abandoned rather than in flight;
* ``journal-<host>-<pid>.jsonl`` — that process's finished manifest rows
  (:mod:`pathopeft.features.manifest`);
* ``manifest.lock`` — taken for every read-merge-write of ``manifest.csv``;
* ``slides/<slide_id>.lock`` — held while a process works on a slide, so two runs never compute
  (and delete and rewrite) the same slide's outputs at once: the second run does the slides
  nobody holds first and then waits for the held ones, which it finds complete.

Locks are ``filelock.FileLock`` (``fcntl.flock`` on POSIX; released by the OS when a process dies,
SIGKILL included). On NFS this needs a server with working locks (NFSv4, or v3 with lockd).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from pathopeft.files import host_name, pid_alive, remove_stale_partials

__all__ = ["STATE_DIR", "RunState"]

log = logging.getLogger(__name__)

STATE_DIR = ".pathopeft"


class RunState:
    """This process's membership of an output folder (module docstring); use as a context manager."""

    def __init__(self, root: str | Path, *, pid: int | None = None) -> None:
        self.root = Path(root)
        self.dir = self.root / STATE_DIR
        self.host = host_name()
        self.pid = os.getpid() if pid is None else int(pid)  # another pid: tests acting as another run
        self.tag = f"{self.host}-{self.pid}"
        self._alive: FileLock | None = None

    # --- membership ---------------------------------------------------------------------------
    def __enter__(self) -> RunState:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "slides").mkdir(exist_ok=True)
        self._alive = FileLock(self.writer_lock(self.host, self.pid))
        self._alive.acquire(timeout=0)  # unique name: nobody else can hold it
        return self

    def __exit__(self, *exc: object) -> None:
        lock, self._alive = self._alive, None
        if lock is not None:
            lock.release()
            with contextlib.suppress(OSError):
                Path(lock.lock_file).unlink()

    def writer_lock(self, host: str, pid: int) -> Path:
        return self.dir / f"writer-{host}-{pid}.lock"

    def writer_gone(self, host: str, pid: int) -> bool | None:
        """Whether the process ``pid`` on ``host`` no longer writes here (``None``: cannot tell).

        Its writer lock decides where it exists (any machine); without one, a process on this
        machine is gone when its pid is, and another machine's cannot be told.
        """
        if host == self.host and pid == self.pid:
            return False
        path = self.writer_lock(host, pid)
        if path.exists():
            probe = FileLock(path)
            try:
                probe.acquire(timeout=0)
            except Timeout:
                return False
            probe.release()
            with contextlib.suppress(OSError):
                path.unlink()  # its owner is gone; the name is unique to it
            return True
        if host == self.host:
            return not pid_alive(pid)
        return None

    def remove_stale_partials(self) -> int:
        """Partial files of gone writers only (another live run's in-flight files are kept)."""
        return remove_stale_partials(self.root, writer_gone=self.writer_gone)

    # --- shared files -------------------------------------------------------------------------
    def manifest_lock(self) -> FileLock:
        """Held for every read-merge-write of ``manifest.csv`` (waits as long as the holder takes)."""
        return FileLock(self.dir / "manifest.lock")

    @contextlib.contextmanager
    def claim(self, slide_id: str, *, wait: bool) -> Iterator[bool]:
        """Hold ``slide_id`` for this process; yields False when another process holds it and
        ``wait`` is false (the caller comes back to it later)."""
        lock = FileLock(self.dir / "slides" / f"{slide_id}.lock")
        try:
            lock.acquire(timeout=-1 if wait else 0)
        except Timeout:
            yield False
            return
        try:
            yield True
        finally:
            lock.release()
