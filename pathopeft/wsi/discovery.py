"""Which slides a command was given: folders (recursive), slide files, or a CSV with a ``path`` column.

Rules (DESIGN's command-line contract):

* a **folder** is searched recursively for files with a slide extension (``SLIDE_SUFFIXES``);
  everything else — sidecars (.json .csv .xml .txt .geojson .ini), and also plain images (.png
  .jpg: in a slide folder they are labels, macros or exports, not whole-slide images) — is
  ignored, not reported as a broken slide. Hidden files/folders and MRXS companion folders are
  skipped. A folder holding ``.dcm`` files is ONE DICOM slide (``slide_id`` = folder name);
* a **file** named explicitly is taken whatever its extension (``pathopeft tile scan.png`` means it);
* a **CSV** (``.csv``) has a ``path`` column, optional ``slide_id`` and ``mpp``; relative paths are
  resolved against the CSV's folder. A row whose file is missing is still returned (the tile
  processor records it as an ``error`` row) so one typo does not abort a cohort;
* the result is in a deterministic order (inputs in the given order, sorted paths within a
  folder), duplicates of the same path are merged, and two different slides with the same
  ``slide_id`` are an error that lists them (outputs are named by slide id).
"""

from __future__ import annotations

import csv
import math
import os
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from pathopeft.config.base import ConfigError

__all__ = ["SLIDE_SUFFIXES", "DiscoveryError", "SlideSource", "discover_slides", "slide_id_for"]

# Extensions OpenSlide opens as whole-slide images (.dcm handled as folders): one list for all stages.
from pathopeft.suffixes import SLIDE_SUFFIXES


class DiscoveryError(ConfigError):
    """The slide inputs themselves are wrong (missing folder, bad CSV, duplicate ids): exit 2."""


@dataclass(frozen=True)
class SlideSource:
    """One slide to process: where it is, its id (output file names), and an optional µm/px."""

    path: Path
    slide_id: str
    mpp: float | None = None


def slide_id_for(path: Path) -> str:
    """File name without its extension (``.ome.tiff`` counts as one); a DICOM folder's own name."""
    name = path.name
    lower = name.lower()
    for suffix in (".ome.tiff", ".ome.tif"):
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name if path.is_dir() else path.stem


def discover_slides(inputs: Sequence[str | Path]) -> list[SlideSource]:
    """Expand ``inputs`` (folders, files, CSVs) into slide sources; see the module docstring."""
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    found: list[SlideSource] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            folder = list(_scan_folder(path))
            if not folder:
                raise DiscoveryError(
                    f"{path}: no slides found "
                    f"(looked for {', '.join(sorted(SLIDE_SUFFIXES))} and DICOM folders)"
                )
            found.extend(folder)
        elif path.suffix.lower() == ".csv" and path.is_file():
            found.extend(_read_csv(path))
        elif path.exists():
            found.append(SlideSource(path, slide_id_for(path)))
        else:
            raise DiscoveryError(f"{path}: no such file or folder")
    return _deduplicate(found)


def _scan_folder(root: Path) -> Iterator[SlideSource]:
    # os.walk goes top-down; sorting dirnames in place fixes the visiting order.
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        files = sorted(f for f in filenames if not f.startswith("."))
        if any(f.lower().endswith(".dcm") for f in files):
            yield SlideSource(here, slide_id_for(here))
        mrxs_stems = {Path(f).stem for f in files if f.lower().endswith(".mrxs")}
        # MIRAX companion folders (slide.mrxs + slide/) hold tiles, not slides.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in mrxs_stems)
        for name in files:
            if Path(name).suffix.lower() in SLIDE_SUFFIXES:
                path = here / name
                yield SlideSource(path, slide_id_for(path))


def _read_csv(path: Path) -> list[SlideSource]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            fields = [f.strip() for f in reader.fieldnames or []]
            if "path" not in fields:
                raise DiscoveryError(f"{path}: the CSV needs a 'path' column (found {fields})")
            # (extra cells beyond the header land under the key None: ignored)
            rows = [
                {k.strip(): (v or "").strip() for k, v in row.items() if isinstance(k, str)} for row in reader
            ]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DiscoveryError(f"{path}: cannot read the slide CSV ({exc})") from None
    sources = []
    for line, row in enumerate(rows, start=2):
        if not row.get("path"):
            raise DiscoveryError(f"{path}: line {line}: empty 'path'")
        slide_path = Path(row["path"]).expanduser()
        if not slide_path.is_absolute():
            slide_path = path.parent / slide_path
        sources.append(
            SlideSource(
                slide_path, row.get("slide_id") or slide_id_for(slide_path), _mpp(row.get("mpp"), path, line)
            )
        )
    return sources


def _mpp(text: str | None, path: Path, line: int) -> float | None:
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise DiscoveryError(f"{path}: line {line}: mpp {text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise DiscoveryError(
            f"{path}: line {line}: mpp must be a positive number of µm per pixel, got {text}"
        )
    return value


def _deduplicate(sources: list[SlideSource]) -> list[SlideSource]:
    seen: dict[Path, SlideSource] = {}
    ordered = []
    for src in sources:
        key = src.path.resolve() if src.path.exists() else src.path.absolute()
        if key in seen:  # the same file named twice (a folder and a file in it): first wins
            continue
        seen[key] = src
        ordered.append(key)
    result = [seen[k] for k in ordered]
    by_id: dict[str, list[Path]] = defaultdict(list)
    for src in result:
        by_id[src.slide_id].append(src.path)
    dupes = {sid: paths for sid, paths in by_id.items() if len(paths) > 1}
    if dupes:
        listing = "; ".join(
            f"{sid}: {', '.join(str(p) for p in paths)}" for sid, paths in sorted(dupes.items())
        )
        raise DiscoveryError(
            f"duplicate slide_id for different slides ({listing}); "
            "give them distinct ids with a CSV 'slide_id' column"
        )
    return result
