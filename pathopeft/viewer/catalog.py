"""Find heatmap export folders and index their slides by id (never by path from the client)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pathopeft.viewer import geojson_read
from pathopeft.wsi.discovery import discover_slides

log = logging.getLogger(__name__)

SCORE_COLUMNS = ("x", "y", "width", "height", "score")


class NoTileScores(ValueError):
    """The export has neither ``<slide_id>.csv`` nor tile features in its GeoJSON."""


@dataclass
class SlideEntry:
    """One exported slide of one task: its score contract, tile scores, and where its slide file is.

    ``slide_path`` is None and ``error`` says why when the slide file was found nowhere: the
    slide is still listed (its export is there) but has no tiles to show.
    """

    key: str  # "<task>/<slide_id>", the only handle the browser ever sends
    slide_id: str
    task: str
    folder: Path
    meta: dict
    slide_path: Path | None
    error: str | None = None
    _scores: pd.DataFrame | None = field(default=None, repr=False)
    _scores_source: str | None = field(default=None, repr=False)
    _regions: dict | None = field(default=None, repr=False)

    @property
    def geojson_path(self) -> Path | None:
        """The exported ``<slide_id>.geojson`` (or ``.geojson.gz``), or None when it was not exported."""
        for name in (f"{self.slide_id}.geojson", f"{self.slide_id}.geojson.gz"):
            if (self.folder / name).is_file():
                return self.folder / name
        return None

    @property
    def bounds(self) -> tuple[float, float]:
        """``openslide.bounds-x/y`` from the JSON: what the GeoJSON's coordinates are relative to."""
        bx, by = (float(v) for v in (self.meta.get("bounds") or (0, 0)))
        return bx, by

    def _geojson_text(self, path: Path) -> str:
        try:
            return geojson_read.read_text(path)
        except (OSError, ValueError) as err:  # UnicodeDecodeError, gzip.BadGzipFile
            raise ValueError(f"{path}: not a readable GeoJSON file ({err!r})") from err

    def exported_regions(self) -> dict:
        """The export's region annotations as drawn in QuPath, in full-frame level-0 px.

        Regions are the exporter's (smoothing, ``min_region_tiles``, cut at the export threshold),
        so the viewer shows the same outlines a pathologist would import, not a recomputation.
        The file's coordinates are relative to ``openslide.bounds-x/y`` (QuPath's frame); the
        JSON's ``bounds`` are added back because the DeepZoom layers show the full frame.
        """
        if self._regions is None:
            path = self.geojson_path
            feats: list[dict] = []
            if path is not None:
                text = self._geojson_text(path)
                bx, by = self.bounds
                try:
                    feats = [
                        geojson_read.region(f, bx, by) for f in geojson_read.features_of(text, "annotation")
                    ]
                except (KeyError, TypeError, ValueError) as err:  # JSONDecodeError: a ValueError
                    raise ValueError(f"{path}: not a readable GeoJSON file ({err!r})") from err
            self._regions = {
                "type": "FeatureCollection",
                "source": path.name if path is not None else None,
                "threshold": self.meta.get("threshold"),
                "features": feats,
            }
        return self._regions

    @property
    def scores(self) -> pd.DataFrame:
        """Tile scores (x, y, width, height, score in full-frame px), loaded lazily.

        From ``<slide_id>.csv``; an export made without ``csv`` in ``formats`` falls back to the
        GeoJSON's tile features (the same shown score). Neither: :class:`NoTileScores`.
        """
        if self._scores is None:
            path = self.folder / f"{self.slide_id}.csv"
            gj = self.geojson_path
            if path.is_file():
                df = pd.read_csv(path)
                missing = set(SCORE_COLUMNS) - set(df.columns)
                if missing:
                    raise ValueError(f"{path}: missing columns {sorted(missing)}")
                source = path.name
            elif gj is not None:
                text = self._geojson_text(gj)
                ts = int(self.meta.get("tile_size") or 0)
                if ts <= 0:
                    raise ValueError(
                        f"{self.folder / (self.slide_id + '.json')}: no tile_size for {gj.name}'s tiles"
                    )
                try:
                    df = geojson_read.tile_scores(text, *self.bounds, ts)
                except (KeyError, TypeError, ValueError, IndexError) as err:
                    raise ValueError(f"{gj}: not a readable GeoJSON file ({err!r})") from err
                if df.empty:
                    raise NoTileScores(self._no_scores(f"{gj.name} has no tile features"))
                source = gj.name
            else:
                raise NoTileScores(self._no_scores("no GeoJSON either"))
            self._scores, self._scores_source = df, source
        return self._scores

    def _no_scores(self, why: str) -> str:
        return (
            f"{self.key}: no per-tile scores in {self.folder}: no {self.slide_id}.csv and {why}; "
            "the heatmap layer, the threshold outline and the score under the cursor need them "
            "(re-export with csv in the heatmap formats)"
        )

    @property
    def scores_source(self) -> str | None:
        """The file the tile scores came from (``s1.csv`` or ``s1.geojson``), or None without any."""
        try:
            _ = self.scores
        except NoTileScores:
            return None
        return self._scores_source

    def score_grid(self) -> tuple[np.ndarray, int, int, int]:
        """Scores on the regular tile grid: (grid[ny, nx] with NaN = no tile, origin x, origin y, size)."""
        df = self.scores
        ts = int(self.meta.get("tile_size") or int(df["width"].iloc[0]))
        ox = int(df["x"].min()) % ts
        oy = int(df["y"].min()) % ts
        gx = ((df["x"].to_numpy() - ox) // ts).astype(int)
        gy = ((df["y"].to_numpy() - oy) // ts).astype(int)
        w, h = self.meta.get("level0_size") or [int(gx.max() + 1) * ts, int(gy.max() + 1) * ts]
        nx = max(int(gx.max()) + 1, -(-int(w) // ts))
        ny = max(int(gy.max()) + 1, -(-int(h) // ts))
        grid = np.full((ny, nx), np.nan, dtype=np.float32)
        grid[gy, gx] = df["score"].to_numpy(dtype=np.float32)
        return grid, ox, oy, ts


class Catalog:
    """All slides under one export folder or a parent of several (one per task).

    ``slides``: a folder searched (recursively, the tile stage's rules) for each exported slide
    by its id, so an export still opens after the slides moved, or a slide CSV (``path``,
    ``slide_id``) for ids that are not file names; the JSON's ``slide_path`` is the fallback.
    The paths found here are the only ones the server ever opens.
    """

    def __init__(self, root: str | Path, slides: str | Path | None = None) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"heatmap folder not found: {self.root}")
        self.slides_dir = Path(slides).expanduser().resolve() if slides is not None else None
        self._by_id: dict[str, Path] = {}
        if self.slides_dir is not None:
            # a folder, or a slide CSV (path, slide_id) as `pathopeft tile` takes: ids not from file names
            is_csv = self.slides_dir.suffix.lower() == ".csv" and self.slides_dir.is_file()
            if not (self.slides_dir.is_dir() or is_csv):
                raise FileNotFoundError(f"slide folder not found: {self.slides_dir}")
            self._by_id = {s.slide_id: s.path for s in discover_slides([self.slides_dir])}
        folders = (
            [self.root]
            if (self.root / "manifest.csv").is_file()
            else sorted(p.parent for p in self.root.glob("*/manifest.csv"))
        )
        if not folders:
            raise FileNotFoundError(f"{self.root}: no manifest.csv here or in a child folder")
        self.entries: dict[str, SlideEntry] = {}
        for folder in folders:
            self._load_folder(folder)

    def _find_slide(self, sid: str, recorded: str) -> tuple[Path | None, str | None]:
        """(path, None) for the slide file of ``sid``, or (None, why it was found nowhere)."""
        listed = self._by_id.get(sid)
        if listed is not None and listed.exists():  # a slide CSV may name a file that is gone
            return listed, None
        if recorded and Path(recorded).exists():
            return Path(recorded), None
        where = []
        if listed is not None:
            where.append(f"{self.slides_dir} lists {listed}, which does not exist")
        elif self.slides_dir:
            where.append(f"no slide with id {sid!r} in {self.slides_dir}")
        where.append(
            f"slide_path {recorded!r} does not exist" if recorded else "the export records no slide_path"
        )
        hint = "" if self.slides_dir else " (pass --slides DIR if the slides moved)"
        return None, f"slide file not found: {'; '.join(where)}{hint}"

    def _load_folder(self, folder: Path) -> None:
        manifest = pd.read_csv(folder / "manifest.csv", dtype=str, keep_default_na=False)
        for col in ("slide_id", "status"):
            if col not in manifest.columns:
                raise ValueError(f"{folder / 'manifest.csv'}: missing column {col!r}")
        for row in manifest.to_dict("records"):
            if row["status"] != "ok":
                continue
            sid = row["slide_id"]
            meta_path = folder / f"{sid}.json"
            try:
                meta = json.loads(meta_path.read_text())
            except (OSError, json.JSONDecodeError) as err:
                log.warning("skipping slide %s: cannot read %s (%s)", sid, meta_path, err)
                continue
            task = str(meta.get("task") or row.get("task") or folder.name)
            key = f"{task}/{sid}"
            path, error = self._find_slide(sid, str(meta.get("slide_path") or row.get("slide_path") or ""))
            if error:
                log.warning("%s: %s", key, error)
            self.entries[key] = SlideEntry(
                key=key, slide_id=sid, task=task, folder=folder, meta=meta, slide_path=path, error=error
            )

    def get(self, task: str, slide_id: str) -> SlideEntry | None:
        """The entry for exactly this (task, id) pair, or None (never a filesystem lookup)."""
        return self.entries.get(f"{task}/{slide_id}")

    def listing(self) -> list[dict]:
        """What the slide list page shows (``error``: why the slide cannot be shown, else None)."""
        out = []
        for e in self.entries.values():
            m = e.meta
            out.append(
                {
                    "slide_id": e.slide_id,
                    "task": e.task,
                    "class": m.get("class"),
                    "bag_probability": m.get("bag_probability"),
                    "predicted_class": m.get("predicted_class"),
                    "threshold": m.get("threshold"),
                    "n_regions": m.get("n_regions"),
                    "error": e.error,
                }
            )
        return out
