"""``pathopeft heatmap``: score every slide's bag and write the files of HEATMAP_CONTRACT.md.

One slide at a time: bag → :func:`~pathopeft.heatmaps.scoring.score_bag` → shown score → score
raster → GeoJSON / CSV / PNG / TIFF, then the JSON contract last (its presence marks the slide
done). ``manifest.csv`` is rewritten atomically after every slide, so a viewer (or a killed run)
always sees a consistent table. A problem with one slide (missing bag or slide, wrong feature size
or backbone, unknown task, unreadable file) is an error row; every other slide completes.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from pathopeft import __version__
from pathopeft.bags import read_bag
from pathopeft.config.heatmap import HeatmapConfig
from pathopeft.files import atomic_write_json, atomic_write_text, sha256_file
from pathopeft.heatmaps import froc as froc_mod
from pathopeft.heatmaps.geojson import build_feature_collection, write_geojson
from pathopeft.heatmaps.overlay import render_overlay, write_png
from pathopeft.heatmaps.pyramid import write_pyramid
from pathopeft.heatmaps.raster import build_grid, region_geometries
from pathopeft.heatmaps.scoring import (
    AUTO_TASK,
    RAW_SCORE,
    check_routable,
    display_scores,
    resolve_task,
    route_task,
    scale_sentence,
    score_bag,
)
from pathopeft.heatmaps.slides import Pair, check_coords, pair_inputs, read_geometry, tile_size_of

__all__ = ["MANIFEST_COLUMNS", "HeatmapResult", "run_heatmaps"]

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = [
    "slide_id",
    "status",
    "error",
    "task",
    "class",
    "bag_probability",
    "predicted_class",
    "n_tiles",
    "n_regions",
    "slide_path",
    "files",
]


@dataclass
class HeatmapResult:
    out: Path
    rows: list[dict[str, Any]]
    froc: dict[str, Any] | None = None
    seconds: float = 0.0
    froc_slides: list[froc_mod.SlideFroc] = field(default_factory=list, repr=False)

    @property
    def n_ok(self) -> int:
        return sum(r["status"] == "ok" for r in self.rows)

    @property
    def n_error(self) -> int:
        return sum(r["status"] == "error" for r in self.rows)


def _expected_backbone(checkpoint: Path, cfg: HeatmapConfig) -> str | None:
    """The config's backbone, else ``data.backbone`` of the run's ``config.yaml`` next to the checkpoint."""
    if cfg.backbone:
        return cfg.backbone
    import yaml

    for folder in (checkpoint.parent, checkpoint.parent.parent):
        path = folder / "config.yaml"
        if path.is_file():
            try:
                data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            except yaml.YAMLError:
                return None
            value = (data.get("data") or {}).get("backbone")
            return str(value) if value else None
    return None


def _settings(cfg: HeatmapConfig) -> dict[str, Any]:
    """The options that change a slide's files (a rerun with the same ones reuses them)."""
    return cfg.model_dump(mode="json", exclude={"overwrite", "annotations", "froc"})


def _write_manifest(out: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k, "") for k in MANIFEST_COLUMNS})
    atomic_write_text(out / "manifest.csv", buf.getvalue())


def _error_row(pair: Pair, task: str, message: str) -> dict[str, Any]:
    return {
        "slide_id": pair.slide_id,
        "status": "error",
        "error": message.replace("\n", " "),
        "task": task,
        "slide_path": str(pair.slide_path) if pair.slide_path else "",
        "files": "",
    }


def _reusable(out: Path, slide_id: str, sha: str, settings: dict[str, Any]) -> dict[str, Any] | None:
    path = out / f"{slide_id}.json"
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    files = meta.get("files") or []
    if meta.get("checkpoint_sha256") != sha or meta.get("settings") != settings:
        return None
    if not all((out / f).is_file() for f in files):
        return None
    return meta


def _csv_text(coords: np.ndarray, tile: int, shown: np.ndarray, raw: dict[str, np.ndarray]) -> str:
    cols = ["x", "y", "width", "height", "score", *raw]
    table = np.column_stack(
        [coords[:, 0], coords[:, 1], np.full(len(coords), tile), np.full(len(coords), tile)]
    )
    buf = io.StringIO()
    buf.write(",".join(cols) + "\n")
    floats = np.column_stack([shown, *raw.values()])
    ints = table.astype(np.int64)
    for i in range(len(coords)):
        buf.write(",".join(map(str, ints[i])) + "," + ",".join(f"{v:.6g}" for v in floats[i]) + "\n")
    return buf.getvalue()


def run_heatmaps(
    checkpoint: str | Path,
    slides: str | Path,
    features: str | Path,
    out: str | Path,
    cfg: HeatmapConfig,
    *,
    on_slide: Callable[[dict[str, Any]], None] | None = None,
) -> HeatmapResult:
    """Export every slide; returns the manifest rows (and the FROC when ``cfg.annotations`` is set)."""
    from pathopeft.mil.module import MILModule

    start = time.perf_counter()
    checkpoint, out = Path(checkpoint).resolve(), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    module = MILModule.from_checkpoint(checkpoint)
    sha = sha256_file(checkpoint)
    model_name = str(module.hparams.get("model", {}).get("name", type(module.model).__name__))
    in_dim = int(module.model.in_dim)
    backbone = _expected_backbone(checkpoint, cfg)
    settings = _settings(cfg)
    task_label = cfg.task or module.model.tasks[-1].name
    try:
        if cfg.task == AUTO_TASK:  # routed per slide in _export_slide
            check_routable(module, cfg.class_name)
            task, classes, class_index = AUTO_TASK, (), -1
        else:
            task, classes, class_index = resolve_task(module, cfg.task, cfg.class_name)
        task_error = None
    except ValueError as exc:
        task, classes, class_index, task_error = task_label, (), -1, str(exc)
    pairs = pair_inputs(Path(slides), Path(features))
    rows: list[dict[str, Any]] = []
    froc_slides: list[froc_mod.SlideFroc] = []
    froc_notes: dict[str, list[str]] = {"assumed_normal": [], "excluded": []}
    for pair in pairs:
        try:
            if task_error:
                raise ValueError(task_error)
            if pair.bag_path is None:
                raise FileNotFoundError(f"no feature bag for slide {pair.slide_path} in {features}")
            if pair.slide_path is None:
                raise FileNotFoundError(f"feature bag {pair.bag_path} has no slide in {slides}")
            meta = None if cfg.overwrite else _reusable(out, pair.slide_id, sha, settings)
            if meta is not None and not cfg.annotations:
                row = _row_from_meta(meta)
            else:
                row, slide_froc = _export_slide(
                    pair, module, cfg, out, task, classes, class_index, in_dim, backbone, checkpoint, sha,
                    model_name, settings, froc_notes,
                )  # fmt: skip
                if slide_froc is not None:
                    froc_slides.append(slide_froc)
        except Exception as exc:  # one bad slide is a row, not a crash
            log.debug("slide %s failed", pair.slide_id, exc_info=True)
            row = _error_row(pair, task, f"{type(exc).__name__}: {exc}")
        rows.append(row)
        _write_manifest(out, rows)
        if on_slide is not None:
            on_slide(row)
    result = HeatmapResult(out, rows, froc_slides=froc_slides)
    if cfg.annotations:
        result.froc = _froc_report(out, froc_slides, cfg, froc_notes, task)
    result.seconds = time.perf_counter() - start
    return result


def _row_from_meta(meta: dict[str, Any]) -> dict[str, Any]:
    return {
        "slide_id": meta["slide_id"],
        "status": "ok",
        "error": "",
        "task": meta["task"],
        "class": meta["class"],
        "bag_probability": meta["bag_probability"],
        "predicted_class": meta["predicted_class"],
        "n_tiles": meta["n_tiles"],
        "n_regions": meta["n_regions"],
        "slide_path": meta["slide_path"],
        "files": ";".join(meta["files"]),
    }


def _export_slide(
    pair: Pair,
    module: Any,
    cfg: HeatmapConfig,
    out: Path,
    task: str,
    classes: tuple[str, ...],
    class_index: int,
    in_dim: int,
    backbone: str | None,
    checkpoint: Path,
    sha: str,
    model_name: str,
    settings: dict[str, Any],
    froc_notes: dict[str, list[str]],
) -> tuple[dict[str, Any], froc_mod.SlideFroc | None]:
    assert pair.bag_path is not None and pair.slide_path is not None
    bag = read_bag(pair.bag_path, pair.slide_id)
    if bag.coords is None:
        raise ValueError(f"{pair.bag_path}: the bag has no tile coordinates (a CLAM .pt? use its .h5)")
    if bag.dim != in_dim:
        raise ValueError(
            f"{pair.bag_path}: {bag.dim}-dimensional features but the checkpoint expects {in_dim} "
            "(a bag from another backbone?)"
        )
    bag_backbone = bag.attrs.get("backbone")
    if backbone and bag_backbone and str(bag_backbone) != backbone:
        raise ValueError(
            f"{pair.bag_path}: features from backbone {bag_backbone!r}, the checkpoint's are {backbone!r}"
        )
    geo = read_geometry(pair.slide_path, cfg.overlay.max_px, pair.mpp)
    tile = tile_size_of(bag, cfg.tile_size)
    check_coords(bag, geo.width, geo.height, tile)
    if cfg.smooth_um > 0 and not geo.mpp:
        raise ValueError(f"{pair.slide_path}: smooth_um needs the slide's µm/px, which it does not have")

    routing = None
    if task == AUTO_TASK:
        task, posterior = route_task(module, bag.features)
        task, classes, class_index = resolve_task(module, task, None)
        routing = {"task_posterior": posterior}
    scores = score_bag(module, bag.features, bag.coords, task)
    class_name = classes[class_index]
    bag_probability = float(scores.bag_probs[class_index])
    raw = {"attention": scores.attention, "probability": scores.tile_probs[:, class_index]}
    shown = display_scores(raw[cfg.score], cfg.normalize, cfg.gate, bag_probability)
    coords = np.asarray(bag.coords, dtype=np.int64)
    sigma = cfg.smooth_um / geo.mpp if cfg.smooth_um > 0 and geo.mpp else 0.0
    grid = build_grid(coords, tile, shown, geo.width, geo.height, smooth_sigma_px=sigma)
    regions = region_geometries(grid, cfg.threshold, min_cells=cfg.min_region_tiles)
    sid = pair.slide_id
    files: list[str] = []
    if "csv" in cfg.formats:
        atomic_write_text(out / f"{sid}.csv", _csv_text(coords, tile, shown, raw))
        files.append(f"{sid}.csv")
    if "geojson" in cfg.formats:
        collection = build_feature_collection(
            sid,
            coords,
            tile,
            {"score": shown, **raw},
            regions,
            class_name=class_name,
            bounds=geo.bounds,
            size=(geo.width, geo.height),
            mpp=geo.mpp,
        )
        path = write_geojson(out / f"{sid}.geojson", collection, gzip_it=cfg.geojson_gzip)
        del collection  # ~3 kB of Python objects per tile: not kept while the TIFF is written
        files.append(path.name)
    label = f"{cfg.score}" + (f" x P({class_name})" if cfg.gate == "bag_probability" else "")
    if "png" in cfg.formats:
        image = render_overlay(
            geo.thumbnail,
            grid,
            colormap=cfg.colormap,
            threshold=cfg.threshold,
            label=label,
            alpha=cfg.overlay.alpha,
            outline_px=cfg.overlay.outline_px,
        )
        write_png(out / f"{sid}.png", image)
        files.append(f"{sid}.png")
    if "tiff" in cfg.formats:
        t = cfg.tiff
        write_pyramid(
            out / f"{sid}.tiff",
            grid,
            colormap=cfg.colormap,
            mpp=geo.mpp,
            tile=t.tile,
            compression=t.compression,
            quality=t.quality,
            nodata=t.nodata_rgb,
            workers=t.workers,
        )
        files.append(f"{sid}.tiff")
    if "ome_tiff" in cfg.formats:
        from pathopeft.heatmaps.ome import write_ome_scores

        write_ome_scores(out / f"{sid}.ome.tiff", grid, mpp=geo.mpp, tile=cfg.tiff.tile)
        files.append(f"{sid}.ome.tiff")
    meta = {
        "slide_id": sid,
        "slide_path": str(pair.slide_path),
        "task": task,
        "class": class_name,
        "classes": list(classes),
        "model": model_name,
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": sha,
        "score": cfg.score,
        "raw_score": RAW_SCORE[cfg.score],
        "scale": scale_sentence(cfg.score, cfg.normalize, cfg.gate, class_name),
        "bag_probability": bag_probability,
        "predicted_class": scores.predicted_class,
        "normalize": cfg.normalize,
        "threshold": cfg.threshold,
        "colormap": cfg.colormap,
        "tile_size": tile,
        "mpp": geo.mpp,
        "level0_size": [geo.width, geo.height],
        "bounds": list(geo.bounds),
        "n_tiles": len(coords),
        "n_regions": len(regions),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "pathopeft_version": __version__,
        # fields beyond the contract's minimum
        "gate": cfg.gate,
        "bag_probabilities": {c: float(p) for c, p in zip(classes, scores.bag_probs)},
        "grid": {"origin": list(grid.origin), "cell": grid.cell, "shape": list(grid.values.shape)},
        "smooth_um": cfg.smooth_um,
        "tiff_nodata_rgb": list(cfg.tiff.nodata_rgb),
        "files": files,
        "settings": settings,
        "routing": routing,  # task=auto: the router's p(task | bag); null when the task was named
    }
    atomic_write_json(out / f"{sid}.json", meta)
    row = _row_from_meta(meta)
    slide_froc = (
        _slide_froc(pair, cfg, coords, tile, shown, geo, out, froc_notes) if cfg.annotations else None
    )
    return row, slide_froc


def _slide_froc(
    pair: Pair,
    cfg: HeatmapConfig,
    coords: np.ndarray,
    tile: int,
    shown: np.ndarray,
    geo: Any,
    out: Path,
    notes: dict[str, list[str]],
) -> froc_mod.SlideFroc | None:
    from pathopeft.wsi.annotations import find_annotation, read_annotations, tumor_geometry

    f = cfg.froc
    mpp = geo.mpp or f.mpp
    if not mpp:
        notes["excluded"].append(f"{pair.slide_id}: no µm/px (set froc.mpp)")
        return None
    assert cfg.annotations is not None
    path = find_annotation(cfg.annotations, pair.slide_id)
    if path is None:
        notes["assumed_normal"].append(pair.slide_id)
        tumour = None
    else:
        tumour = tumor_geometry(read_annotations(path, bounds_offset=geo.bounds))
    probs, xy = froc_mod.nms_detections(
        coords, tile, shown, f.nms_radius_um / mpp, min_score=f.min_score, max_detections=f.max_detections
    )
    froc_mod.write_detections(out / "froc" / f"{pair.slide_id}.csv", probs, xy)
    mask, itc = froc_mod.evaluation_mask(
        tumour, (geo.width, geo.height), mpp, level=f.eval_level, grow_um=f.grow_um, itc_um=f.itc_um
    )
    return froc_mod.SlideFroc(pair.slide_id, probs, xy, mask, itc)


def _froc_report(
    out: Path,
    slides: list[froc_mod.SlideFroc],
    cfg: HeatmapConfig,
    notes: dict[str, list[str]],
    task: str,
) -> dict[str, Any]:
    report: dict[str, Any] = {"task": task, "score": cfg.score, **notes}
    try:
        report.update(
            froc_mod.froc_score(slides, level=cfg.froc.eval_level, eval_thresholds=cfg.froc.eval_thresholds)
        )
    except ValueError as exc:
        report["froc"] = None
        report["error"] = str(exc)
    report["settings"] = cfg.froc.model_dump(mode="json")
    atomic_write_json(out / "froc.json", report)
    return report
