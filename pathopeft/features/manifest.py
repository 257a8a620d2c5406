"""``OUT/manifest.csv``: one row per slide with what happened to it, merged across runs by slide_id.

The manifest is what a user (and ``pathopeft train``) reads to know which slides have features: its
``status`` is ``ok`` (coords, thumbnail and — unless ``--no-features`` — features written),
``empty`` (opened fine, no tissue tile; ``error`` says why) or ``error`` (one-line reason).

During a run the manifest is kept up to date as slides finish (:class:`LiveManifest`): every
process (each rank of each run) appends each finished row at once to its own journal,
``OUT/.pathopeft/journal-<host>-<pid>.jsonl``, and rank 0 folds the journals into
``manifest.csv`` at most every few seconds. Every rewrite takes ``OUT/.pathopeft/manifest.lock``,
re-reads the manifest on disk and merges the new journal lines into it (then writes a temporary
file and renames it), so two runs into one folder never drop each other's rows. A journal whose
writer is gone (see :mod:`pathopeft.features.runstate`) is merged and removed by the next process
that rewrites the manifest: a SIGKILLed run's finished slides are listed by the next run even
when its throttled rewrite never came, and without recomputing them.

At the end of a multi-device run rank 0 waits — without a collective, so without a collective
timeout — until every rank's journal ends with its ``done`` line (or that rank's process is gone),
and takes the run's rows from the journals.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from pathopeft.features.runstate import RunState
from pathopeft.files import atomic_write_text

__all__ = [
    "MANIFEST_COLUMNS",
    "LiveManifest",
    "SlideRecord",
    "merge_records",
    "read_manifest",
    "write_manifest",
]

log = logging.getLogger(__name__)

STATUSES = ("ok", "empty", "error")


@dataclass
class SlideRecord:
    """One manifest row (``reused`` is not written: it tells this run's summary what was skipped)."""

    slide_id: str
    path: str
    status: str = "error"
    n_tiles: int = 0
    mpp: float | None = None  # level-0 µm/px used
    target_mpp: float | None = None
    level: int | None = None  # pyramid level read
    tile_px: int | None = None
    backbone: str = ""  # empty when features were not computed (--no-features)
    seconds: float = 0.0
    error: str = ""  # the reason for error / empty
    reused: bool = False

    def row(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("reused")
        out["seconds"] = round(float(self.seconds), 3)
        return {k: ("" if v is None else v) for k, v in out.items()}


MANIFEST_COLUMNS = tuple(f.name for f in fields(SlideRecord) if f.name != "reused")


def write_manifest(path: str | Path, records: Iterable[SlideRecord]) -> None:
    """Write rows sorted by slide_id (the same file whatever the device count), atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(MANIFEST_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for rec in sorted(records, key=lambda r: r.slide_id):
        writer.writerow(rec.row())
    atomic_write_text(path, buf.getvalue())


def read_manifest(path: str | Path) -> list[SlideRecord]:
    """Rows of an earlier run; an unreadable manifest is logged and treated as empty (it is rewritten)."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        log.warning("%s: unreadable earlier manifest (%s); it will be rewritten", path, exc)
        return []
    return [_record(row) for row in rows if row.get("slide_id")]


def _record(row: dict[str, Any]) -> SlideRecord:
    """A row (CSV strings or journal JSON values) as a record; bad cells become empty."""
    text = {k: ("" if v is None else str(v)) for k, v in row.items()}
    return SlideRecord(
        slide_id=text["slide_id"],
        path=text.get("path", ""),
        status=text["status"] if text.get("status") in STATUSES else "error",
        n_tiles=_int(text.get("n_tiles")) or 0,
        mpp=_float(text.get("mpp")),
        target_mpp=_float(text.get("target_mpp")),
        level=_int(text.get("level")),
        tile_px=_int(text.get("tile_px")),
        backbone=text.get("backbone", ""),
        seconds=_float(text.get("seconds")) or 0.0,
        error=text.get("error", ""),
    )


def merge_records(earlier: Iterable[SlideRecord], current: Iterable[SlideRecord]) -> list[SlideRecord]:
    """This run's rows, plus earlier rows of slides this run did not touch."""
    merged = {r.slide_id: r for r in earlier}
    merged.update({r.slide_id: r for r in current})
    return sorted(merged.values(), key=lambda r: r.slide_id)


@dataclass
class _Journal:
    """What this process has read of one journal file."""

    offset: int = 0
    header: dict[str, Any] | None = None
    done: bool = False
    records: list[SlideRecord] | None = None  # kept only for journals of this run


class LiveManifest:
    """``manifest.csv`` kept current while slides finish, by every process of every run (module
    docstring).

    :meth:`open` starts this process's journal; :meth:`add` appends a row to it at once and, on
    rank 0, rewrites the manifest when ``min_interval`` seconds have passed since the last
    rewrite and at least ``cost_factor`` times the last rewrite's own duration (default 20: a
    cohort of 100k rows spends ≤ 5 % of its time rewriting); the first row is written at once.
    :meth:`flush` rewrites now; :meth:`finish` ends the journal (``done``) and, on rank 0, waits
    for the run's other ranks, writes the final manifest and returns the run's rows.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        rank: int = 0,
        world_size: int = 1,
        run_id: str = "",
        leader: str = "",
        state: RunState | None = None,
        min_interval: float = 2.0,
        cost_factor: float = 20.0,
        poll_s: float = 1.0,
    ) -> None:
        self.path = Path(path)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.state = state if state is not None else RunState(self.path.parent)
        self.run_id = run_id or self.state.tag
        self.leader = leader or self.state.tag  # rank 0's writer tag
        self.min_interval = float(min_interval)
        self.cost_factor = float(cost_factor)
        self.poll_s = float(poll_s)
        self.journal = self.state.dir / f"journal-{self.state.tag}.jsonl"
        self.records: list[SlideRecord] = []  # this process's rows
        self._fh: io.TextIOWrapper | None = None
        self._seen: dict[Path, _Journal] = {}
        self._last = -math.inf
        self._cost = 0.0
        self._dirty = False
        self.added = 0  # rows this process added in this run

    # --- this process's journal ---------------------------------------------------------------
    def open(self) -> None:
        """Start the journal (every rank, before the others may wait for it)."""
        if self._fh is not None:
            return
        self.state.dir.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.journal, "a", encoding="utf-8")  # noqa: SIM115
        header = {"journal": 1, "run": self.run_id, "rank": self.rank, "world": self.world_size}
        self._write({**header, "writer": self.state.tag, "leader": self.leader})

    def _write(self, obj: dict[str, Any]) -> None:
        assert self._fh is not None
        self._fh.write(json.dumps(obj) + "\n")
        self._fh.flush()  # in the OS's hands: a SIGKILL loses nothing written so far

    def start(self) -> None:
        """Open the journal; rank 0 also folds in journals of runs that are gone."""
        self.open()
        if self.rank == 0:
            self.flush(force=True)
            self._last = -math.inf  # the run's first row is still written at once

    def add(self, rec: SlideRecord) -> None:
        self.open()
        self.added += 1
        self.records.append(rec)
        self._write({"t": time.time(), "row": rec.row(), "reused": bool(rec.reused)})
        if self.rank != 0:
            return
        self._dirty = True
        now = time.monotonic()
        if now - self._last >= max(self.min_interval, self.cost_factor * self._cost):
            self.flush()

    # --- merging ------------------------------------------------------------------------------
    def flush(self, *, force: bool = False) -> None:
        """Rank 0: merge every journal's new lines into the manifest on disk now (no-op elsewhere)."""
        if self.rank != 0 or not (self._dirty or force or self._journals_changed()):
            return
        start = time.monotonic()
        with self.state.manifest_lock():
            self._merge()
        self._last = time.monotonic()
        self._cost, self._dirty = self._last - start, False

    def _journals(self) -> list[Path]:
        return sorted(self.state.dir.glob("journal-*.jsonl"))

    def _journals_changed(self) -> bool:
        for path in self._journals():
            seen = self._seen.get(path)
            with contextlib.suppress(OSError):
                if seen is None or path.stat().st_size != seen.offset:
                    return True
        return False

    def _merge(self, *, remove_run: bool = False) -> None:
        """Under the manifest lock: manifest on disk + new journal lines → manifest; journals whose
        writers (and their run's rank 0) are gone are removed once merged (``remove_run``: this
        run's too)."""
        new: list[tuple[float, SlideRecord]] = []
        removable = []
        for path in self._journals():
            seen = self._seen.setdefault(path, _Journal())
            new += self._read(path, seen)
            header = seen.header or {}
            mine = header.get("run") == self.run_id and header.get("leader") == self.leader
            if mine:
                if remove_run:
                    removable.append(path)
            elif path != self.journal and self._abandoned(header):
                removable.append(path)
        if new or removable:
            rows = {r.slide_id: r for r in read_manifest(self.path)}
            for _, rec in sorted(new, key=lambda item: item[0]):
                rows[rec.slide_id] = rec
            write_manifest(self.path, rows.values())
        for path in removable:
            path.unlink(missing_ok=True)
            if self._seen[path].records is None:  # this run's stay: their rows make the summary
                del self._seen[path]

    def _abandoned(self, header: dict[str, Any]) -> bool:
        """A journal nobody will come back for: its writer is gone, and so is its run's rank 0."""
        tags = {str(header.get("writer", "")), str(header.get("leader", ""))}
        for tag in tags:
            host, _, pid = tag.rpartition("-")
            if not host or not pid.isdigit():
                return True  # no header (torn at its first line): nothing to wait for
            if self.state.writer_gone(host, int(pid)) is not True:
                return False
        return True

    def _read(self, path: Path, seen: _Journal) -> list[tuple[float, SlideRecord]]:
        """The complete lines after ``seen.offset`` (a torn last line waits for its newline)."""
        try:
            with open(path, "rb") as fh:
                fh.seek(seen.offset)
                data = fh.read()
        except OSError:
            return []
        end = data.rfind(b"\n") + 1
        seen.offset += end
        out = []
        for line in data[:end].decode("utf-8", errors="replace").splitlines():
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if not isinstance(obj, dict):
                continue
            if "journal" in obj and seen.header is None:
                seen.header = obj
                if obj.get("run") == self.run_id and obj.get("leader") == self.leader:
                    seen.records = []
            elif obj.get("done"):
                seen.done = True
            elif isinstance(obj.get("row"), dict) and obj["row"].get("slide_id"):
                rec = _record(obj["row"])
                rec.reused = bool(obj.get("reused"))
                out.append((float(obj.get("t") or 0.0), rec))
                if seen.records is not None:
                    seen.records.append(rec)
        return out

    # --- the end ------------------------------------------------------------------------------
    def finish(self) -> list[SlideRecord]:
        """End this process's part; rank 0: wait for every rank, write the final manifest, and
        return the whole run's rows (other ranks: their own)."""
        if self._fh is None and self.journal.exists():
            self._fh = open(self.journal, "a", encoding="utf-8")  # noqa: SIM115
        if self._fh is not None:
            self._write({"done": True, "n": self.added})
        self.close()
        if self.rank != 0:
            return list(self.records)
        for _ in self._wait_for_ranks():
            time.sleep(self.poll_s)
        with self.state.manifest_lock():
            self._merge(remove_run=True)
        self._dirty = False
        return self.run_records()

    def _wait_for_ranks(self) -> Iterator[None]:
        """Yield (the caller sleeps) until every other rank's journal is done or its writer gone."""
        if self.world_size == 1:
            return
        waited = 0.0
        warned: set[int] = set()
        while True:
            gone = self._gone_ranks()  # before reading: a gone writer's last lines are then all read
            with self.state.manifest_lock():
                self._merge()  # rows of ranks still working reach the manifest meanwhile
            done = {rank for rank, seen in self._run_journals().items() if seen.done}
            for rank in sorted(gone - done - warned):
                log.warning("rank %d stopped before finishing; its finished slides are kept", rank)
                warned.add(rank)
            pending = sorted(set(range(1, self.world_size)) - done - gone)
            if not pending:
                return
            if waited and waited % 60 < self.poll_s:
                log.info("waiting for rank(s) %s to finish their slides", pending)
            yield
            waited += self.poll_s

    def _run_journals(self) -> dict[int, _Journal]:
        """This run's journals read so far, by rank."""
        out = {}
        for seen in self._seen.values():
            header = seen.header or {}
            if seen.records is not None and isinstance(header.get("rank"), int):
                out[int(header["rank"])] = seen
        return out

    def _gone_ranks(self) -> set[int]:
        gone = set()
        for rank, seen in self._run_journals().items():
            host, _, pid = str((seen.header or {}).get("writer", "")).rpartition("-")
            if rank and not seen.done and pid.isdigit() and self.state.writer_gone(host, int(pid)) is True:
                gone.add(rank)
        return gone

    def run_records(self) -> list[SlideRecord]:
        """This run's rows from every rank's journal read so far (rank order)."""
        parts = [
            (int((seen.header or {}).get("rank", 0)), seen.records)
            for seen in self._seen.values()
            if seen.records is not None
        ]
        out = [rec for _, recs in sorted(parts, key=lambda p: p[0]) for rec in (recs or [])]
        return out or list(self.records)

    def abort(self) -> None:
        """A run stopped early: its rows into the manifest now; the journal stays for the next run
        only if that fails."""
        self.close()
        if self.rank != 0:
            return
        with self.state.manifest_lock():
            self._merge()
            if self.world_size == 1:
                self.journal.unlink(missing_ok=True)

    def close(self) -> None:
        if self._fh is not None:
            with contextlib.suppress(OSError):
                self._fh.close()
            self._fh = None


def _float(text: str | None) -> float | None:
    try:
        value = float(text) if text not in (None, "") else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def _int(text: str | None) -> int | None:
    value = _float(text)
    return int(value) if value is not None else None
