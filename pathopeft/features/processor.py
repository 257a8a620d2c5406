"""The tile processor: per slide open → tissue → grid → coords h5 → thumbnail → features, with resume.

Each slide is processed independently and ends in exactly one manifest row (``ok`` / ``empty`` /
``error``); an exception in one slide is recorded, never raised, so one bad file cannot stop a
cohort. Output files always match the row: ``ok`` has coords, thumbnail and (unless features are
off) the feature bag; ``empty`` has only its QC thumbnail; ``error`` has none of them. Every file
is written atomically, so a killed run leaves no file that looks finished.

Resume: a slide whose outputs exist and carry the current parameter fingerprint (see
:mod:`pathopeft.features.fingerprint`) is skipped; coords with a matching fingerprint are reused
when only the features are missing (a ``--no-features`` run followed by a feature run).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py

from pathopeft import __version__
from pathopeft.bags import FeatureBag, write_bag
from pathopeft.config.tile import TileConfig
from pathopeft.features.fingerprint import features_fingerprint, source_size, tiling_fingerprint
from pathopeft.features.manifest import SlideRecord
from pathopeft.wsi import open_slide
from pathopeft.wsi.slide import Slide, one_line

if TYPE_CHECKING:
    from pathopeft.features.extract import FeatureExtractor

__all__ = ["OutputLayout", "SlideProcessor", "safe_slide_id"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OutputLayout:
    """Where one run's files go (DESIGN.md "Data flow and formats")."""

    root: Path
    features_name: str | None  # folder under features/, None when features are off

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.csv"

    def coords(self, slide_id: str) -> Path:
        return self.root / "coords" / f"{slide_id}.h5"

    def thumbnail(self, slide_id: str) -> Path:
        return self.root / "thumbnails" / f"{slide_id}.png"

    def features(self, slide_id: str) -> Path | None:
        if self.features_name is None:
            return None
        return self.root / "features" / self.features_name / f"{slide_id}.h5"


class SlideProcessor:
    """Turns one slide source into outputs + a :class:`SlideRecord`, never raising for a bad slide."""

    def __init__(self, config: TileConfig, layout: OutputLayout, extractor: FeatureExtractor | None) -> None:
        self.config = config
        self.layout = layout
        self.extractor = extractor

    # --- public -------------------------------------------------------------------------------
    def process(self, source: Any, on_tiles: Callable[[int], None] | None = None) -> SlideRecord:
        """Process one ``SlideSource`` (path, slide_id, mpp); the record says how it went."""
        start = time.perf_counter()
        rec = SlideRecord(slide_id=source.slide_id, path=str(source.path))
        if not safe_slide_id(source.slide_id):
            rec.error = f"slide_id {source.slide_id!r} is not a plain file name (outputs are named by it)"
            log.warning("%s: error: %s", source.slide_id, rec.error)
            return rec
        self._recomputing = False
        try:
            self._process(source, rec, on_tiles)
        except Exception as exc:  # one bad slide never stops the cohort
            log.debug("%s failed", source.slide_id, exc_info=True)
            rec.status, rec.error, rec.n_tiles, rec.reused = "error", one_line(exc), 0, False
            if self._recomputing:  # an open/read failure before that decision keeps finished outputs
                self._remove(source.slide_id, thumbnail=True)
        rec.seconds = time.perf_counter() - start
        if rec.status != "ok":
            log.warning("%s: %s: %s", source.slide_id, rec.status, rec.error)
        return rec

    # --- steps --------------------------------------------------------------------------------
    def _open(self, source: Any) -> Slide:
        cfg = self.config
        mpp = getattr(source, "mpp", None)
        if mpp is None and cfg.slides.mpp is not None and cfg.slides.mpp_override:
            mpp = cfg.slides.mpp
        slide = open_slide(
            source.path,
            slide_id=source.slide_id,
            mpp=mpp,
            backend=cfg.reader.backend,
            cache_mb=cfg.reader.cache_mb,
        )
        if mpp is None and slide.native_mpp is None and cfg.slides.mpp is not None:
            slide.close()  # no metadata: reopen with the configured fallback µm/px
            slide = open_slide(
                source.path,
                slide_id=source.slide_id,
                mpp=cfg.slides.mpp,
                backend=cfg.reader.backend,
                cache_mb=cfg.reader.cache_mb,
            )
        return slide

    def _process(self, source: Any, rec: SlideRecord, on_tiles: Callable[[int], None] | None) -> None:
        from pathopeft.wsi import TileGrid, detect_tissue, render_thumbnail, write_coords

        cfg, sid = self.config, source.slide_id
        with self._open(source) as slide:
            mpp = slide.mpp  # MissingMppError (one line, names the file) when nothing says
            rec.mpp, rec.target_mpp, rec.tile_px = mpp, cfg.grid.target_mpp, cfg.grid.tile_px
            fp_tiling = tiling_fingerprint(
                cfg.tissue.model_dump(mode="json"),
                cfg.grid.model_dump(mode="json"),
                mpp,
                source_size(source.path),
            )
            fp_features = None
            if self.extractor is not None:
                fp_features = features_fingerprint(fp_tiling, self.extractor.fingerprint(cfg.grid.tile_px))

            grid = None if cfg.output.overwrite else self._reusable_grid(sid, fp_tiling)
            if grid is not None and self._features_done(sid, fp_features, len(grid.coords)):
                rec.status, rec.n_tiles, rec.level, rec.reused = "ok", len(grid.coords), int(grid.level), True
                rec.backbone = self.extractor.backbone.name if self.extractor else ""
                log.info("%s: complete with the same parameters, skipped", sid)
                return
            self._recomputing = True  # from here on the outputs are being replaced

            if grid is None:
                mask = detect_tissue(slide, cfg.tissue)
                grid = TileGrid.from_tissue(slide, mask, cfg.grid)
                if cfg.output.thumbnails:
                    render_thumbnail(
                        slide, mask, grid, self.layout.thumbnail(sid), max_px=cfg.output.thumbnail_px
                    )
                if len(grid.coords) == 0:
                    rec.status = "empty"
                    rec.error = _empty_reason(mask, cfg)
                    self._remove(sid, thumbnail=False)
                    return
                self._remove(sid, thumbnail=False)  # stale coords/features of other parameters
                write_coords(self.layout.coords(sid), grid, {"tiling_fingerprint": fp_tiling})
            else:
                log.info("%s: reusing coords (same tiling parameters)", sid)

            rec.n_tiles, rec.level = len(grid.coords), int(grid.level)
            if self.extractor is not None and fp_features is not None:
                self._extract(slide, grid, fp_tiling, fp_features, rec, on_tiles)
            rec.status = "ok"

    def _extract(
        self,
        slide: Slide,
        grid: Any,
        fp_tiling: str,
        fp_features: str,
        rec: SlideRecord,
        on_tiles: Callable[[int], None] | None,
    ) -> None:
        assert self.extractor is not None
        ex, cfg = self.extractor, self.config
        feats = ex.extract(slide, grid.coords, grid.level, grid.read_size, grid.tile_px, on_batch=on_tiles)
        mpp = float(rec.mpp or 0.0)
        attrs = {
            "backbone": ex.backbone.name,
            "weights": ex.backbone.weights_id,
            "weights_tensors_sha256": ex.backbone.tensors_sha256 or "",
            "feature_dim": int(feats.shape[1]),
            "mpp": mpp,
            "target_mpp": float(grid.target_mpp),
            "patch_size": int(grid.tile_px),
            "patch_size_level0": round(grid.tile_px * grid.target_mpp / mpp) if mpp else 0,
            "patch_level": int(grid.level),
            "downsample": float(grid.downsample),
            "bounds_x": int(grid.bounds_offset[0]),  # openslide.bounds-x/y: QuPath's frame (GeoJSON)
            "bounds_y": int(grid.bounds_offset[1]),
            "input_px": int(ex.out_size(grid.tile_px)[0]),
            "precision": ex.precision,
            "tiling_fingerprint": fp_tiling,
            "features_fingerprint": fp_features,
            "source": str(Path(slide.path).resolve()),
            "pathopeft_version": __version__,
        }
        path = self.layout.features(rec.slide_id)
        assert path is not None
        write_bag(path, FeatureBag(rec.slide_id, feats, grid.coords, attrs), dtype=cfg.features.dtype)
        rec.backbone = ex.backbone.name

    # --- resume -------------------------------------------------------------------------------
    def _reusable_grid(self, slide_id: str, fp_tiling: str) -> Any | None:
        """The stored grid when coords (and the thumbnail, if wanted) exist with this fingerprint."""
        from pathopeft.wsi import read_coords

        path = self.layout.coords(slide_id)
        if not path.is_file():
            return None
        if self.config.output.thumbnails and not self.layout.thumbnail(slide_id).is_file():
            return None
        stored = _attr(path, "tiling_fingerprint")
        if stored != fp_tiling:
            log.info("%s: tiling parameters changed since %s was written; recomputing", slide_id, path.name)
            return None
        try:
            return read_coords(path)
        except Exception as exc:
            log.info("%s: %s unreadable (%s); recomputing", slide_id, path, one_line(exc))
            return None

    def _features_done(self, slide_id: str, fp_features: str | None, n_tiles: int) -> bool:
        if fp_features is None:  # --no-features: coords + thumbnail are all there is
            return True
        path = self.layout.features(slide_id)
        if path is None or not path.is_file():
            return False
        try:
            with h5py.File(path, "r") as h5:
                stored = h5.attrs.get("features_fingerprint")
                rows = int(h5["features"].shape[0])
                dtype = str(h5["features"].dtype)
        except Exception:
            return False
        if isinstance(stored, bytes):
            stored = stored.decode()
        if stored != fp_features:
            log.info("%s: encoder/parameters changed since %s was written; recomputing", slide_id, path.name)
            return False
        if dtype != self.config.features.dtype:  # storage only: not in the fingerprint, still honoured
            log.info(
                "%s: features stored as %s, %s requested; recomputing",
                slide_id,
                dtype,
                self.config.features.dtype,
            )
            return False
        return rows == n_tiles

    def _remove(self, slide_id: str, *, thumbnail: bool) -> None:
        """Remove this slide's outputs so the folder matches its manifest row."""
        paths = [self.layout.coords(slide_id), self.layout.features(slide_id)]
        if thumbnail:
            paths.append(self.layout.thumbnail(slide_id))
        for path in paths:
            if path is not None:
                path.unlink(missing_ok=True)


def safe_slide_id(slide_id: str) -> bool:
    """Outputs are ``<dir>/<slide_id>.h5``: an id must not climb out of, or into, folders."""
    return bool(slide_id) and slide_id not in {".", ".."} and not any(c in slide_id for c in "/\\\0")


def _attr(path: Path, key: str) -> str | None:
    try:
        with h5py.File(path, "r") as h5:
            value = h5.attrs.get(key)
            if value is None and "coords" in h5:
                value = h5["coords"].attrs.get(key)
    except Exception:
        return None
    if isinstance(value, bytes):
        value = value.decode()
    return None if value is None else str(value)


def _empty_reason(mask: Any, cfg: TileConfig) -> str:
    reason = getattr(mask, "reason", None)
    if reason:
        return str(reason)
    return (
        f"no tile has at least {cfg.grid.min_tissue_fraction:.0%} tissue "
        f"(grid.min_tissue_fraction; tile {cfg.grid.tile_px} px at {cfg.grid.target_mpp} µm/px)"
    )
