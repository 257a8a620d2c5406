"""``OUT/manifest.csv``: one row per slide with what happened to it, merged across runs by slide_id.

The manifest is what a user (and ``pathopeft train``) reads to know which slides have features: its
``status`` is ``ok`` (coords, thumbnail and — unless ``--no-features`` — features written),
``empty`` (opened fine, no tissue tile; ``error`` says why) or ``error`` (one-line reason).
"""

from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from pathopeft.files import atomic_write_text

__all__ = ["MANIFEST_COLUMNS", "SlideRecord", "merge_records", "read_manifest", "write_manifest"]

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
    records = []
    for row in rows:
        if not row.get("slide_id"):
            continue
        records.append(
            SlideRecord(
                slide_id=row["slide_id"],
                path=row.get("path") or "",
                status=row.get("status") if row.get("status") in STATUSES else "error",
                n_tiles=_int(row.get("n_tiles")) or 0,
                mpp=_float(row.get("mpp")),
                target_mpp=_float(row.get("target_mpp")),
                level=_int(row.get("level")),
                tile_px=_int(row.get("tile_px")),
                backbone=row.get("backbone") or "",
                seconds=_float(row.get("seconds")) or 0.0,
                error=row.get("error") or "",
            )
        )
    return records


def merge_records(earlier: Iterable[SlideRecord], current: Iterable[SlideRecord]) -> list[SlideRecord]:
    """This run's rows, plus earlier rows of slides this run did not touch."""
    merged = {r.slide_id: r for r in earlier}
    merged.update({r.slide_id: r for r in current})
    return sorted(merged.values(), key=lambda r: r.slide_id)


def _float(text: str | None) -> float | None:
    try:
        value = float(text) if text not in (None, "") else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def _int(text: str | None) -> int | None:
    value = _float(text)
    return int(value) if value is not None else None
