"""``OUT/manifest.csv``: one row per slide with what happened to it, merged across runs by slide_id.

The manifest is what a user (and ``pathopeft train``) reads to know which slides have features: its
``status`` is ``ok`` (coords, thumbnail and — unless ``--no-features`` — features written),
``empty`` (opened fine, no tissue tile; ``error`` says why) or ``error`` (one-line reason).

During a run the manifest is kept up to date as slides finish (:class:`LiveManifest`), so a run
that is interrupted (Ctrl-C, a killed job) leaves rows for every slide it finished: rank 0
rewrites it atomically, at most every few seconds; other ranks append their rows to a hidden
per-rank journal (``.manifest-rank<r>.jsonl``) that rank 0 merges in. At the end the rows
gathered from all ranks are written and the journals removed; journals left by a killed run are
merged by the next run.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

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


class LiveManifest:
    """``manifest.csv`` kept current while slides finish, on one or many ranks (module docstring).

    Rank 0: :meth:`add` remembers the row and rewrites the manifest (earlier rows + other ranks'
    journals + this run's rows) when ``min_interval`` seconds have passed since the last rewrite,
    and at least ``cost_factor`` times the last rewrite's own duration (default 20: a cohort of
    100k rows spends ≤ 5 % of its time rewriting). The first row is written at once.
    :meth:`flush` rewrites now (the pipeline calls it when a run stops early); :meth:`finish`
    writes the final manifest from every rank's rows and removes the journals. Other ranks:
    :meth:`add` appends one JSON line to their journal and flushes it to the OS, so a killed
    process loses nothing it finished.
    """

    def __init__(
        self, path: str | Path, *, rank: int = 0, min_interval: float = 2.0, cost_factor: float = 20.0
    ) -> None:
        self.path = Path(path)
        self.rank = int(rank)
        self.min_interval = float(min_interval)
        self.cost_factor = float(cost_factor)
        self._rows: list[SlideRecord] = []
        self._earlier: list[SlideRecord] = []
        self._journal: io.TextIOWrapper | None = None
        self._last = -math.inf
        self._cost = 0.0
        self._dirty = False
        self.added = 0  # rows this process added in this run

    def journal_path(self, rank: int) -> Path:
        return self.path.with_name(f".{self.path.stem}-rank{rank}.jsonl")

    def _journals(self) -> list[Path]:
        return sorted(self.path.parent.glob(f".{self.path.stem}-rank*.jsonl"))

    def start(self) -> None:
        """Rank 0, before other ranks write: fold journals of an interrupted run into the manifest."""
        if self.rank != 0:
            return
        leftovers = self._journals()
        self._earlier = merge_records(read_manifest(self.path), _read_journals(leftovers))
        if leftovers:
            write_manifest(self.path, self._earlier)
            for journal in leftovers:
                journal.unlink(missing_ok=True)
            log.info("%s: merged rows of an interrupted run", self.path)

    def add(self, rec: SlideRecord) -> None:
        self.added += 1
        if self.rank != 0:
            if self._journal is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._journal = open(self.journal_path(self.rank), "w", encoding="utf-8")  # noqa: SIM115
            self._journal.write(json.dumps(rec.row()) + "\n")
            self._journal.flush()
            return
        self._rows.append(rec)
        self._dirty = True
        now = time.monotonic()
        if now - self._last >= max(self.min_interval, self.cost_factor * self._cost):
            self.flush()

    def flush(self) -> None:
        """Rank 0: rewrite the manifest now with everything finished so far (no-op elsewhere)."""
        if self.rank != 0 or not (self._dirty or self._journals()):
            return
        start = time.monotonic()
        others = _read_journals(self._journals())
        write_manifest(self.path, merge_records(merge_records(self._earlier, others), self._rows))
        self._last = time.monotonic()
        self._cost, self._dirty = self._last - start, False

    def finish(self, records: Iterable[SlideRecord]) -> None:
        """Rank 0, after every rank finished: the final manifest from all ranks' rows; journals go."""
        self.close()
        if self.rank != 0:
            return
        write_manifest(self.path, merge_records(read_manifest(self.path), records))
        for journal in self._journals():
            journal.unlink(missing_ok=True)
        self._dirty = False

    def close(self) -> None:
        if self._journal is not None:
            with contextlib.suppress(OSError):
                self._journal.close()
            self._journal = None


def _read_journals(paths: Iterable[Path]) -> list[SlideRecord]:
    """Rows of rank journals; a torn last line (a process killed mid-write) is skipped."""
    records = []
    for path in paths:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            continue
        for line in lines:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and row.get("slide_id"):
                records.append(_record(row))
    return records


def _float(text: str | None) -> float | None:
    try:
        value = float(text) if text not in (None, "") else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def _int(text: str | None) -> int | None:
    value = _float(text)
    return int(value) if value is not None else None
